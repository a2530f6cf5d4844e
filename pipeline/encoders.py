"""Loading open_clip encoders: a built-in name with a pretrained tag, a checkpoint file, a
``local-dir:`` folder, or a transformers CLIP checkpoint (``hf-clip:``, converted on load by
``pipeline.hf_clip``). Never downloads unless asked to; a missing weight file is an error that
says what to fetch and where to put it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.dense import image_size_of
from pipeline.weights import WeightsNotFound, file_sha256  # noqa: F401 (the public names)
from seacore.storage import fetch, is_url


@dataclass
class LoadedEncoder:
    model: torch.nn.Module  # the whole open_clip model (visual + text towers), eval mode
    preprocess: object  # open_clip's own validation transform for this model
    tokenizer: object
    name: str
    weights_tag: str  # pretrained tag, 'file', or 'local-dir'
    weights_sha256: str | None  # of the checkpoint file when weights come from a file
    image_size: tuple[int, int]
    grid: tuple[int, int]

    def identity(self) -> dict:
        return {
            "encoder": self.name,
            "weights_tag": self.weights_tag,
            "weights_sha256": self.weights_sha256,
            "image_size": list(self.image_size),
            "grid": list(self.grid),
        }


def _hf_cached_weights(pretrained_cfg: dict, cache_dir: str | None) -> str | None:
    """Path of a tag's weights in the Hugging Face cache, without touching the network."""
    from huggingface_hub import try_to_load_from_cache

    hub = pretrained_cfg.get("hf_hub", "")
    if not hub:
        return None
    # 'org/repo/' names the repo's default file; 'org/repo/file.bin' names a file.
    model_id, filename = os.path.split(hub)
    names = [filename] if filename else []
    names += ["open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
              "open_clip_pytorch_model.bin"]
    if filename.endswith(".bin"):
        names.insert(0, filename[:-4] + ".safetensors")
    for name in names:
        found = try_to_load_from_cache(model_id, name, cache_dir=cache_dir)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _missing_weights_message(model: str, tag: str, cfg: dict, section: str = "encoder") -> str:
    hub = cfg.get("hf_hub", "").rstrip("/")
    off = (f"({section}.allow_download=false)" if section == "encoder"
           else "(the trainer never downloads)")
    last = ("Or set encoder.allow_download=true." if section == "encoder" else
            "Use the same weights as the label run.")
    return (
        f"weights for {model} / '{tag}' are not on this machine and downloads are off "
        f"{off}. On a machine with network access run\n"
        f"  python -c \"import open_clip; open_clip.create_model('{model}', pretrained='{tag}')\"\n"
        f"which fills the Hugging Face cache (~/.cache/huggingface/hub, or $HF_HOME), then copy "
        f"that cache here; or download the checkpoint from https://huggingface.co/{hub} and pass "
        f"{section}.pretrained=/path/to/open_clip_model.safetensors. {last}"
    )


def resolve_checkpoint(model: str, pretrained: str | None, allow_download: bool,
                       cache_dir: str | None = None,
                       section: str = "encoder") -> tuple[str | None, str, dict]:
    """Return (checkpoint path or None, weights tag, the tag's settings) for a model spec.

    The tag's settings are its preprocessing (mean, std, ...) and ``quick_gelu``: OpenAI's
    weights were trained with QuickGELU, which open_clip 3.x only warns about when the
    built-in config says GELU; we build the model the way its weights were trained."""
    import open_clip

    if model.startswith("local-dir:"):
        return None, "local-dir", {}
    if model.startswith("hf-hub:"):
        if not allow_download:
            raise WeightsNotFound(f"{model}: hf-hub models need a download ({section}.model: "
                                  f"use a local-dir: path{' or encoder.allow_download=true' if section == 'encoder' else ''})")
        return None, "hf-hub", {}
    if not pretrained:
        return None, "random", {}
    if is_url(pretrained):  # a checkpoint file in a bucket: copied once per node, then a file
        try:
            return str(fetch(pretrained)), "file", {}
        except FileNotFoundError:
            raise WeightsNotFound(f"{section}.pretrained: {pretrained} does not exist") from None
    if os.path.isfile(pretrained):
        return pretrained, "file", {}
    cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model)
        raise WeightsNotFound(
            f"{section}.pretrained: '{pretrained}' is neither a file nor a known tag for {model} "
            f"(tags: {tags})")
    pp = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode", "quick_gelu")
          if k in cfg}
    path = _hf_cached_weights(cfg, cache_dir)
    if path is None:
        if not allow_download:
            raise WeightsNotFound(_missing_weights_message(model, pretrained, cfg, section))
        path = open_clip.download_pretrained(cfg, cache_dir=cache_dir)
    return path, pretrained, pp


def load_encoder(model: str, pretrained: str | None = None, allow_download: bool = False,
                 cache_dir: str | None = None, device: str | torch.device = "cpu",
                 section: str = "encoder") -> LoadedEncoder:
    import open_clip

    from pipeline.dense import patch_grid

    if model.startswith("hf-clip:"):
        from pipeline import hf_clip

        m, preprocess, tokenizer, sha, _ = hf_clip.load_hf_clip(model, device, cache_dir,
                                                                allow_download, section)
        size = image_size_of(m.visual)
        return LoadedEncoder(model=m, preprocess=preprocess, tokenizer=tokenizer,
                             name=hf_clip.display_name(model), weights_tag="hf-clip",
                             weights_sha256=sha, image_size=size, grid=patch_grid(m.visual, size))
    ckpt, tag, pp = resolve_checkpoint(model, pretrained, allow_download, cache_dir, section)
    kwargs = {"force_quick_gelu": bool(pp.pop("quick_gelu", False))}
    for key, arg in (("mean", "image_mean"), ("std", "image_std"),
                     ("interpolation", "image_interpolation"), ("resize_mode", "image_resize_mode")):
        if key in pp:
            kwargs[arg] = pp[key]
    if model.startswith(("local-dir:", "hf-hub:")):
        m, _, preprocess = open_clip.create_model_and_transforms(model, device=device, **kwargs)
    else:
        m, _, preprocess = open_clip.create_model_and_transforms(
            model, pretrained=ckpt, device=device, **kwargs)
    m.eval().requires_grad_(False)
    sha = None
    if model.startswith("local-dir:"):
        from open_clip.factory import _find_checkpoint_in_dir

        found = _find_checkpoint_in_dir(Path(model[len("local-dir:"):]))
        sha = file_sha256(found) if found else None
        name = _local_dir_name(model)
    else:
        sha = file_sha256(ckpt) if ckpt else None
        name = model
    tokenizer = open_clip.get_tokenizer(model)
    size = image_size_of(m.visual)
    return LoadedEncoder(model=m, preprocess=preprocess, tokenizer=tokenizer, name=name,
                         weights_tag=tag, weights_sha256=sha, image_size=size,
                         grid=patch_grid(m.visual, size))


def preprocess_geometry(preprocess) -> dict:
    """Where the encoder's transform puts an image: its resize (an int: shortest side; a pair:
    squash to h x w) and centre crop, read from the torchvision transforms themselves. Kept in
    every shard's metadata (``crop``) so an overlay of patch labels on the image is exact."""
    from torchvision import transforms as T

    geo = {"resize": None, "center_crop": None, "interpolation": None}
    for t in getattr(preprocess, "transforms", []):
        if isinstance(t, T.Resize):
            size = [t.size] if isinstance(t.size, int) else list(t.size)
            geo["resize"] = size[0] if len(size) == 1 else size
            geo["interpolation"] = t.interpolation.value
        elif isinstance(t, T.CenterCrop):
            geo["center_crop"] = list(t.size)
        elif type(t).__name__ == "ResizeKeepRatio":  # open_clip's 'longest' mode: not replayed
            geo["other"] = "ResizeKeepRatio"
    return geo


def _local_dir_name(model: str) -> str:
    """A local dir's model name: the ``name`` in its config if any, else the folder name."""
    path = Path(model[len("local-dir:"):])
    cfg = json.loads((path / "open_clip_config.json").read_text())
    return cfg.get("name", path.name)
