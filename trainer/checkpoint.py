"""Atomic, resumable checkpoints: ``<output>/checkpoints/step-000123/``.

Written to a hidden temporary folder, with ``COMPLETE`` written last, then renamed; only
folders with that marker count, so a half-written or corrupted save is never "latest".
The last ``keep`` are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MARKER = "COMPLETE"


def ckpt_root(output: str | Path) -> Path:
    return Path(output) / "checkpoints"


def list_complete(output: str | Path) -> list[Path]:
    root = ckpt_root(output)
    if not root.is_dir():
        return []
    found = []
    for d in root.glob("step-*"):
        if (d / MARKER).is_file() and (d / "trainable.safetensors").is_file() and (d / "state.pt").is_file():
            found.append(d)
    return sorted(found, key=lambda d: int(d.name.split("-")[1]))


def latest(output: str | Path) -> Path | None:
    done = list_complete(output)
    return done[-1] if done else None


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}


def save(output: str | Path, step: int, module: torch.nn.Module, state: dict, config: dict,
         keep: int = 3) -> Path:
    root = ckpt_root(output)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(trainable_state(module), str(tmp / "trainable.safetensors"))
    torch.save(state, tmp / "state.pt")
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / MARKER).write_text(str(step))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_complete(output)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: str | Path, module: torch.nn.Module) -> dict:
    path = Path(path)
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
    weights = load_file(str(path / "trainable.safetensors"))
    params = dict(module.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise ValueError(f"checkpoint {path} has parameters this model lacks: {missing[:3]}")
    with torch.no_grad():
        for n, w in weights.items():
            params[n].copy_(w.to(params[n].dtype))
    return torch.load(path / "state.pt", weights_only=False)
