"""Atomic, resumable checkpoints: ``<output>/checkpoints/step-00000123/``.

A checkpoint is written into a hidden temporary folder, ``COMPLETE`` last (it lists every
file's size), then renamed into place. ``latest`` only considers folders whose marker is
there and whose files still have the recorded sizes, so a half-written, truncated or
interrupted save is never picked up. The last ``keep`` are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MARKER = "COMPLETE"
FILES = ("trainable.safetensors", "state.pt", "config.json")


def ckpt_root(output: str | Path) -> Path:
    return Path(output) / "checkpoints"


def is_complete(d: Path) -> bool:
    try:
        sizes = json.loads((d / MARKER).read_text())["sizes"]
        return all((d / f).stat().st_size == n for f, n in sizes.items()) and set(sizes) == set(FILES)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def list_complete(output: str | Path) -> list[Path]:
    root = ckpt_root(output)
    if not root.is_dir():
        return []
    found = [d for d in root.glob("step-*") if is_complete(d)]
    return sorted(found, key=lambda d: int(d.name.split("-")[1]))


def latest(output: str | Path) -> Path | None:
    done = list_complete(output)
    return done[-1] if done else None


def save(output: str | Path, step: int, weights: dict[str, torch.Tensor], state: dict,
         config: dict, keep: int = 3) -> Path:
    root = ckpt_root(output)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()},
              str(tmp / "trainable.safetensors"))
    torch.save(state, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for f in FILES:
        with open(tmp / f, "rb") as fh:
            os.fsync(fh.fileno())
    sizes = {f: (tmp / f).stat().st_size for f in FILES}
    (tmp / MARKER).write_text(json.dumps({"step": step, "sizes": sizes}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep > 0:
        for old in list_complete(output)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (missing or mismatched "
                                f"{MARKER} marker)")
    return load_file(str(path / "trainable.safetensors")), torch.load(path / "state.pt",
                                                                      weights_only=False)
