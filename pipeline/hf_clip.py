"""Transformers CLIP checkpoints as open_clip towers, and back.

LLaVA-1.5 users have ``openai/clip-vit-large-patch14-336`` in the Hugging Face cache in
transformers' format (``CLIPModel``), not open_clip's. ``encoder.model`` / ``vision.model`` =
``hf-clip:<model id or folder>`` loads it with transformers and copies the weights into
open_clip's ``CLIP`` (visual and text towers, QuickGELU when the checkpoint says so, the
checkpoint's own resize/crop and mean/std), so labels and training use exactly the weights
LLaVA uses, through the same code as any open_clip tower. The text side uses open_clip's
bundled OpenAI BPE, the same vocabulary as these checkpoints (49,408 tokens; anything else is
refused), and pools at the end token as transformers does.

``open_clip_visual_to_hf`` is the way back, for the exports: an open_clip CLIP ViT as
``CLIPVisionModel`` weights and config.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

PREFIX = "hf-clip:"
OPENAI_VOCAB = 49408


def is_hf_clip(model: str) -> bool:
    return model.startswith(PREFIX)


def display_name(model: str) -> str:
    """The name recorded in shards and runs: the id's or folder's last part, so a label run
    made from the cache and a training run from a copied folder agree (the weights hash still
    has to match)."""
    return PREFIX + Path(model[len(PREFIX):].rstrip("/")).name


def resolve_dir(model: str, cache_dir: str | None = None, allow_download: bool = False,
                section: str = "encoder") -> Path:
    """A local folder as given, else the model id's snapshot in the Hugging Face cache."""
    from pipeline.weights import WeightsNotFound

    spec = model[len(PREFIX):]
    if os.path.isdir(os.path.expanduser(spec)):
        return Path(os.path.expanduser(spec))
    if spec.startswith(("/", ".", "~")):
        raise WeightsNotFound(f"{section}.model={model}: {spec} is not a folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec, cache_dir=cache_dir, local_files_only=not allow_download))
    except Exception as e:  # LocalEntryNotFoundError, or a bad id
        raise WeightsNotFound(
            f"{section}.model={model}: '{spec}' is not in the Hugging Face cache ({type(e).__name__}). "
            f"On a machine with network access run `huggingface-cli download {spec}` (fills "
            f"~/.cache/huggingface), or give hf-clip:/path/to/folder with config.json and the "
            f"weights.") from e


def weights_sha256(folder: Path) -> str:
    """sha256 of the weight file; of the files' hashes in order for a sharded checkpoint."""
    from pipeline.weights import file_sha256

    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{folder} holds no *.safetensors or pytorch_model*.bin")
    if len(files) == 1:
        return file_sha256(str(files[0]))
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}:{file_sha256(str(f))}\n".encode())
    return h.hexdigest()


# --- the weight map: (open_clip key, transformers key) ---------------------------------------


def _blocks(oc: str, hf: str, n: int) -> list[tuple[str, str]]:
    pairs = []
    for i in range(n):
        o, h = f"{oc}.transformer.resblocks.{i}", f"{hf}.encoder.layers.{i}"
        for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("attn.out_proj", "self_attn.out_proj"), ("mlp.c_fc", "mlp.fc1"),
                     ("mlp.c_proj", "mlp.fc2")):
            pairs += [(f"{o}.{a}.weight", f"{h}.{b}.weight"), (f"{o}.{a}.bias", f"{h}.{b}.bias")]
    return pairs


def _vision_pairs(n: int, oc: str = "visual", hf: str = "vision_model") -> list[tuple[str, str]]:
    pairs = [(f"{oc}.class_embedding", f"{hf}.embeddings.class_embedding"),
            (f"{oc}.positional_embedding", f"{hf}.embeddings.position_embedding.weight"),
            (f"{oc}.conv1.weight", f"{hf}.embeddings.patch_embedding.weight"),
            (f"{oc}.ln_pre.weight", f"{hf}.pre_layrnorm.weight"),
            (f"{oc}.ln_pre.bias", f"{hf}.pre_layrnorm.bias"),
            (f"{oc}.ln_post.weight", f"{hf}.post_layernorm.weight"),
            (f"{oc}.ln_post.bias", f"{hf}.post_layernorm.bias")] + _blocks(oc, hf, n)
    return [(a.lstrip("."), b.lstrip(".")) for a, b in pairs]


def _text_pairs(n: int) -> list[tuple[str, str]]:
    return [("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
            ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
            ("ln_final.weight", "text_model.final_layer_norm.weight"),
            ("ln_final.bias", "text_model.final_layer_norm.bias")] + _blocks("", "text_model", n)


def _qkv_to_open_clip(hf_sd: dict, hf: str, oc: str, n: int, out: dict) -> None:
    for i in range(n):
        a = f"{hf}.encoder.layers.{i}.self_attn"
        o = f"{oc}transformer.resblocks.{i}.attn"
        out[f"{o}.in_proj_weight"] = torch.cat([hf_sd[f"{a}.{x}_proj.weight"] for x in "qkv"])
        out[f"{o}.in_proj_bias"] = torch.cat([hf_sd[f"{a}.{x}_proj.bias"] for x in "qkv"])


def hf_to_open_clip_state(hf_sd: dict, n_vision: int, n_text: int) -> dict:
    """A transformers ``CLIPModel`` state dict -> open_clip ``CLIP``'s."""
    out = {oc: hf_sd[hf] for oc, hf in _vision_pairs(n_vision)}
    out.update({oc.lstrip("."): hf_sd[hf] for oc, hf in _text_pairs(n_text)})
    _qkv_to_open_clip(hf_sd, "vision_model", "visual.", n_vision, out)
    _qkv_to_open_clip(hf_sd, "text_model", "", n_text, out)
    out["visual.proj"] = hf_sd["visual_projection.weight"].t()
    out["text_projection"] = hf_sd["text_projection.weight"].t()
    out["logit_scale"] = hf_sd["logit_scale"].reshape(())
    return {k: v.contiguous() for k, v in out.items()}


def _act(name: str, where: str) -> bool:
    if name not in ("quick_gelu", "gelu"):
        raise ValueError(f"{where}: hidden_act '{name}' is not supported (quick_gelu or gelu)")
    return name == "quick_gelu"


def build_open_clip(config) -> torch.nn.Module:
    """An open_clip ``CLIP`` shaped like a transformers ``CLIPConfig`` (random weights)."""
    from open_clip.model import CLIP

    vc, tc = config.vision_config, config.text_config
    quick = _act(vc.hidden_act, "vision_config")
    if _act(tc.hidden_act, "text_config") != quick:
        raise ValueError("vision and text towers use different activations; open_clip has one")
    for name, c in (("vision_config", vc), ("text_config", tc)):
        if abs(c.layer_norm_eps - 1e-5) > 1e-12:
            raise ValueError(f"{name}.layer_norm_eps={c.layer_norm_eps}; open_clip's LayerNorm "
                             f"uses 1e-5")
    if tc.vocab_size != OPENAI_VOCAB:
        raise ValueError(f"text_config.vocab_size={tc.vocab_size}: only the OpenAI BPE vocabulary "
                         f"({OPENAI_VOCAB}) is supported, the tokenizer open_clip bundles")
    eos = getattr(tc, "eos_token_id", 2)
    if eos not in (2, OPENAI_VOCAB - 1):  # 2: transformers' legacy argmax pooling
        raise ValueError(f"text_config.eos_token_id={eos}: open_clip pools at the highest token "
                         f"id, which is the end token only for id {OPENAI_VOCAB - 1}")
    return CLIP(
        embed_dim=config.projection_dim,
        vision_cfg={"layers": vc.num_hidden_layers, "width": vc.hidden_size,
                    "head_width": vc.hidden_size // vc.num_attention_heads,
                    "mlp_ratio": vc.intermediate_size / vc.hidden_size,
                    "patch_size": vc.patch_size, "image_size": vc.image_size},
        text_cfg={"context_length": tc.max_position_embeddings, "vocab_size": tc.vocab_size,
                  "width": tc.hidden_size, "heads": tc.num_attention_heads,
                  "layers": tc.num_hidden_layers, "mlp_ratio": tc.intermediate_size / tc.hidden_size},
        quick_gelu=quick)


def preprocess_from(folder: Path, image_size: int):
    """The checkpoint's own ``preprocessor_config.json`` (shortest-side resize, centre crop,
    mean/std) as a torchvision transform; OpenAI's values when the folder has none."""
    import json

    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from open_clip.transform import _convert_to_rgb
    from torchvision import transforms as T

    pp = {}
    if (folder / "preprocessor_config.json").is_file():
        pp = json.loads((folder / "preprocessor_config.json").read_text())

    def edge(v, key):
        return v.get(key, v.get("height")) if isinstance(v, dict) else v

    short = edge(pp.get("size", image_size), "shortest_edge") or image_size
    crop = edge(pp.get("crop_size", image_size), "height") or image_size
    if crop != image_size:
        raise ValueError(f"{folder}/preprocessor_config.json crops to {crop}, the tower takes "
                         f"{image_size}")
    interp = {2: T.InterpolationMode.BILINEAR, 3: T.InterpolationMode.BICUBIC}.get(
        pp.get("resample", 3), T.InterpolationMode.BICUBIC)
    return T.Compose([T.Resize(short, interpolation=interp), T.CenterCrop(crop), _convert_to_rgb,
                      T.ToTensor(),
                      T.Normalize(pp.get("image_mean", OPENAI_DATASET_MEAN),
                                  pp.get("image_std", OPENAI_DATASET_STD))])


def load_hf_clip(model: str, device: str | torch.device = "cpu", cache_dir: str | None = None,
                 allow_download: bool = False, section: str = "encoder"):
    """-> (open_clip CLIP in eval mode, preprocess, tokenizer, weights sha256, folder)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPConfig, CLIPModel

    folder = resolve_dir(model, cache_dir, allow_download, section)
    config = CLIPConfig.from_pretrained(folder, local_files_only=True)
    if getattr(config, "model_type", "") != "clip":
        raise ValueError(f"{section}.model={model}: {folder} is a '{config.model_type}' "
                         f"checkpoint; hf-clip: takes a transformers CLIPModel")
    oc = build_open_clip(config)
    from seacore.quiet import no_loading_bars

    with no_loading_bars():
        hf = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    state = hf_to_open_clip_state(hf.state_dict(), config.vision_config.num_hidden_layers,
                                  config.text_config.num_hidden_layers)
    del hf
    oc.load_state_dict(state, strict=True)
    oc = oc.to(device).eval().requires_grad_(False)
    tokenizer = SimpleTokenizer(context_length=config.text_config.max_position_embeddings)
    return (oc, preprocess_from(folder, config.vision_config.image_size), tokenizer,
            weights_sha256(folder), folder)


# --- the way back: an open_clip CLIP ViT as transformers' CLIPVisionModel --------------------


def open_clip_visual_to_hf(visual: torch.nn.Module) -> tuple[dict, dict]:
    """-> (``CLIPVisionConfig`` kwargs, the vision transformer's state dict: ``embeddings.*``,
    ``encoder.*``, ...; load it with ``load_clip_vision``). Refuses towers that
    ``CLIPVisionModel`` cannot hold, saying which part."""
    from pipeline import dense

    if not dense.is_clip_vit(visual):
        raise ValueError(f"the vision tower is {type(visual).__name__} (e.g. SigLIP's timm trunk with "
                         f"an attention-pool head); transformers' CLIPVisionModel holds only "
                         f"CLIP-style ViTs (class token, ln_pre, ln_post), and this project does "
                         f"not convert other towers")
    blocks = visual.transformer.resblocks
    b0 = blocks[0]
    problems = []
    if not isinstance(visual.ln_pre, torch.nn.LayerNorm):
        problems.append("no ln_pre")
    if getattr(visual, "attn_pool", None) is not None:
        problems.append("an attentional pooler")
    if not isinstance(getattr(b0, "ls_1", torch.nn.Identity()), torch.nn.Identity):
        problems.append("layer scale")
    if not isinstance(getattr(b0, "attn", None), torch.nn.MultiheadAttention):
        problems.append("a custom attention block")
    if visual.conv1.bias is not None:
        problems.append("a patch-embedding bias")
    act = type(b0.mlp.gelu).__name__
    if act not in ("QuickGELU", "GELU"):
        problems.append(f"activation {act}")
    if problems:
        raise ValueError("the vision tower has " + ", ".join(problems) +
                         ", which CLIPVisionModel cannot hold")
    from pipeline.dense import image_size_of

    width = visual.transformer.width
    cfg = {"hidden_size": width, "intermediate_size": b0.mlp.c_fc.out_features,
           "num_hidden_layers": len(blocks), "num_attention_heads": b0.attn.num_heads,
           "image_size": image_size_of(visual)[0],
           "patch_size": visual.conv1.kernel_size[0], "num_channels": 3,
           "projection_dim": visual.proj.shape[1] if visual.proj is not None else width,
           "hidden_act": "quick_gelu" if act == "QuickGELU" else "gelu",
           "layer_norm_eps": visual.ln_pre.eps}
    sd = {k: v.detach() for k, v in visual.state_dict().items()}
    out = {hf: sd[oc] for oc, hf in _vision_pairs(len(blocks), oc="", hf="")}
    out = {k.lstrip("."): v for k, v in out.items()}
    for i in range(len(blocks)):
        a = f"encoder.layers.{i}.self_attn"
        w = sd[f"transformer.resblocks.{i}.attn.in_proj_weight"].chunk(3)
        b = sd[f"transformer.resblocks.{i}.attn.in_proj_bias"].chunk(3)
        for x, wx, bx in zip("qkv", w, b):
            out[f"{a}.{x}_proj.weight"], out[f"{a}.{x}_proj.bias"] = wx, bx
    return cfg, {k: v.contiguous().clone() for k, v in out.items()}


def load_clip_vision(model: torch.nn.Module, state: dict, assign: bool = False) -> None:
    """Load ``open_clip_visual_to_hf``'s weights into a ``CLIPVisionModel`` (its inner vision
    transformer in transformers 4, the model itself in 5), strictly but for buffers."""
    target = getattr(model, "vision_model", model)
    missing, unexpected = target.load_state_dict(state, strict=False, assign=assign)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"CLIPVisionModel weights do not fit: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
