"""Tiny random encoders for tests and the demo, saved as open_clip ``local-dir:`` folders so
they load through exactly the same code as real weights.

- ``clip``: an open_clip VisionTransformer (class token, ``ln_post``, ``proj``) and a causal
  text tower with the real CLIP BPE tokenizer (bundled with open_clip, no download).
- ``siglip``: a timm ViT trunk with an attention-pool (``map``) head and no class token, as
  SigLIP, with the same text tower.
- ``vitb16``: ViT-B/16's vision shape (random weights) with a small text tower, for benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from seacore.files import atomic_path

TINY_TIMM_NAME = "sea_tiny_siglip_vit"

_TEXT_SMALL = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}

CONFIGS = {
    "clip": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 3, "width": 64, "head_width": 32,
                       "patch_size": 8},
        "text_cfg": _TEXT_SMALL,
    },
    "siglip": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "timm_model_name": TINY_TIMM_NAME,
                       "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "linear"},
        "text_cfg": _TEXT_SMALL,
    },
    "vitb16": {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2,
                     "layers": 2},
    },
}


def register_tiny_siglip() -> None:
    """Register the tiny SigLIP-style timm trunk with timm, in this process, before open_clip
    asks for it by name. Test-only: the tests call it where they build or load that model
    (tests/conftest.py); the product's weight resolver knows nothing of it (issue 36), so the
    tiny SigLIP is not offered by ``python -m pipeline tiny``. Not done at import: importing
    the package has no side effects."""
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    if timm.is_model(TINY_TIMM_NAME):
        return

    def sea_tiny_siglip_vit(pretrained=False, **kwargs):
        # SigLIP's layout: no class token, attention-pool head ('map'), final norm in trunk.
        args = dict(img_size=64, patch_size=8, embed_dim=64, depth=3, num_heads=2,
                    class_token=False, global_pool="map")
        skip = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")  # timm factory plumbing
        args.update({k: v for k, v in kwargs.items() if k not in skip})
        model = VisionTransformer(**args)
        model.pretrained_cfg = model.default_cfg = {"input_size": (3, 64, 64)}
        return model

    sea_tiny_siglip_vit.__name__ = TINY_TIMM_NAME
    register_model(sea_tiny_siglip_vit)


def save_tiny(kind: str, out_dir: str | Path, seed: int = 0) -> str:
    """Build a random model of ``kind`` with a fixed seed, save it as an open_clip local dir,
    and return the ``local-dir:`` model string. Idempotent: an existing folder is reused.
    """
    import open_clip
    from safetensors.torch import save_file

    out = Path(out_dir)
    weights = out / "open_clip_model.safetensors"
    spec = f"local-dir:{out}"
    if weights.is_file():
        return spec
    cfg = json.loads(json.dumps(CONFIGS[kind]))
    if kind == "siglip":
        register_tiny_siglip()
    out.mkdir(parents=True, exist_ok=True)
    name = f"tiny-{kind}-seed{seed}"
    (out / "open_clip_config.json").write_text(json.dumps({
        "name": name,
        "model_cfg": cfg,
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711]},
    }, indent=2))
    torch.manual_seed(seed)
    open_clip.factory._MODEL_CONFIGS[name] = cfg  # only to build it once; loading uses the dir
    from seacore.quiet import building_random_model

    try:
        with building_random_model():
            model = open_clip.create_model(name)
    finally:
        open_clip.factory._MODEL_CONFIGS.pop(name, None)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp))
    return spec


def save_tiny_hf_clip(folder, act: str = "quick_gelu", seed: int = 0) -> str:
    """A tiny random transformers ``CLIPModel`` (32 px, patch 8, OpenAI vocabulary) saved with
    ``save_pretrained`` plus its ``CLIPImageProcessor``: what ``hf-clip:`` loads. Returns the
    ``hf-clip:`` model string; an existing folder is reused."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "preprocessor_config.json").is_file():
        return f"hf-clip:{folder}"

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 77, "hidden_act": act, "eos_token_id": 49407,
                     "bos_token_id": 49406, "pad_token_id": 0},
        vision_config={"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3,
                       "num_attention_heads": 4, "image_size": 32, "patch_size": 8,
                       "hidden_act": act},
        projection_dim=24)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a swapped key cannot hide
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                       image_mean=[0.4, 0.5, 0.6], image_std=[0.2, 0.25, 0.3]).save_pretrained(folder)
    return f"hf-clip:{folder}"
