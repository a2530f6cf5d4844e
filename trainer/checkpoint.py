"""Atomic, verified, pickle-free checkpoints: ``<output>/checkpoints/step-00000123/``.

A checkpoint is written into a hidden temporary folder, ``COMPLETE`` last (it lists every
file's size and sha256), then renamed into place. ``list_complete`` only considers folders
whose marker is there and whose files have the recorded sizes, so a half-written or
truncated save is never picked up; ``load`` also checks every file's sha256, so one altered in
place is refused by name. Nothing is pickled: tensors go to safetensors, everything else
(data position, scheduler, RNG states, optimizer scalars) to JSON, with tensors referenced by
key (``split_state`` / ``join_state``), so loading a checkpoint can never run code. The last
``keep`` are kept; stale temporary folders of killed saves are removed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from wordlist import sha256_file

MARKER = "COMPLETE"
FILES = ("trainable.safetensors", "state.safetensors", "state.json", "config.json")


class CheckpointError(ValueError):
    """A checkpoint that must not be resumed from (damaged, or an older pickled format)."""


def split_state(obj, tensors: dict[str, torch.Tensor], prefix: str = "s"):
    """A nested state (dicts, lists, tuples, scalars, tensors, numpy arrays) -> a JSON-able
    skeleton; tensors move into ``tensors`` under unique keys. Anything else is an error,
    never a pickle."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [split_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [split_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not any(k.startswith("__") for k in obj):
            return {k: split_state(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
        return {"__items__": [[split_state(k, tensors, f"{prefix}.k{i}"),
                               split_state(v, tensors, f"{prefix}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"checkpoint state at '{prefix}' is a {type(obj).__name__}: only tensors, "
                    f"arrays, numbers, strings and containers of them are saved")


def join_state(obj, tensors: dict[str, torch.Tensor]):
    """The inverse of ``split_state``."""
    if isinstance(obj, list):
        return [join_state(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], dtype=obj["dtype"])
        if "__tuple__" in obj:
            return tuple(join_state(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {join_state(k, tensors): join_state(v, tensors) for k, v in obj["__items__"]}
        return {k: join_state(v, tensors) for k, v in obj.items()}
    return obj


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


def remove_stale(output: str | Path) -> list[Path]:
    """Temporary folders left by saves that were killed (this process has none in flight)."""
    root = ckpt_root(output)
    stale = [d for d in root.glob(".tmp-step-*") if not d.name.endswith(f"-{os.getpid()}")]
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return stale


def save(output: str | Path, step: int, weights: dict[str, torch.Tensor], state: dict,
         config: dict, keep: int = 3) -> Path:
    root = ckpt_root(output)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale(output)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()},
              str(tmp / "trainable.safetensors"))
    tensors: dict[str, torch.Tensor] = {}
    skeleton = split_state(state, tensors)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(skeleton))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for f in FILES:
        with open(tmp / f, "rb") as fh:
            os.fsync(fh.fileno())
    sizes = {f: (tmp / f).stat().st_size for f in FILES}
    sums = {f: sha256_file(tmp / f) for f in FILES}
    (tmp / MARKER).write_text(json.dumps({"step": step, "sizes": sizes, "sha256": sums}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep > 0:
        for old in list_complete(output)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def verify(path: Path) -> None:
    """Refuse a checkpoint whose files do not match its marker's checksums."""
    if (path / "state.pt").exists():
        raise CheckpointError(f"{path} is in the older pickled format (state.pt), which is never "
                              f"loaded (unpickling can run code); start the run over")
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (missing or mismatched "
                                f"{MARKER} marker)")
    sums = json.loads((path / MARKER).read_text()).get("sha256", {})
    for f in FILES:
        if sums.get(f) != sha256_file(path / f):
            raise CheckpointError(f"{path / f}: sha256 differs from the one in {MARKER} "
                                  f"(altered or damaged); this checkpoint cannot be resumed")


def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(trainable weights, state), after ``verify``; no pickle is ever read."""
    path = Path(path)
    verify(path)
    state = join_state(json.loads((path / "state.json").read_text()),
                       load_file(str(path / "state.safetensors")))
    return load_file(str(path / "trainable.safetensors")), state


def load_latest(output: str | Path, warn=print) -> tuple[Path, dict, dict] | None:
    """The newest checkpoint that verifies; each newer one that does not (incomplete, altered,
    an older format) is named in one line with why. None when ``output`` holds no checkpoint
    at all (a fresh start); a ``CheckpointError`` listing every one found, and why, when it
    holds some and none is valid: such a run must never restart from step 0 on its own."""
    root = ckpt_root(output)
    found = sorted((d for d in root.glob("step-*") if d.is_dir()),
                   key=lambda d: int(d.name.split("-")[1])) if root.is_dir() else []
    why = []
    for path in reversed(found):
        try:
            return (path, *load(path))
        except (CheckpointError, FileNotFoundError) as e:
            why.append(str(e))
            warn(f"warning: skipping checkpoint {path}: {e}; trying the one before")
    if not found:
        return None
    raise CheckpointError(
        f"resume=latest found {len(found)} checkpoint(s) in {root} and none is valid: "
        + "; ".join(why) + ". Nothing was trained. To start this run over on purpose, run "
        "without resume and with log.overwrite=true (deletes them), or pick another log.output")
