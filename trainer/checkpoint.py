"""Atomic, verified, pickle-free, sharded checkpoints: ``<output>/checkpoints/step-00000123/``.

The tensors (trainable weights, optimizer moments) are saved with
``torch.distributed.checkpoint`` (DCP) in its safetensors format: every rank writes its own
part (``shards/shard-0000r-...safetensors``, offsets in the header), so no rank ever gathers
the model, and loading reshards to any world size. Everything else (data position,
scheduler, every rank's RNG, optimizer hyper-parameters) is JSON, with its few tensors in
``state.safetensors`` (``split_state`` / ``join_state``): loading a checkpoint never unpickles
(DCP's own ``.metadata`` file is a pickle; its safetensors storage does not need one).

A checkpoint is written into a hidden temporary folder, ``COMPLETE`` last (every file's
size and sha256, each rank hashing what it wrote), then renamed into place.
``list_complete`` only considers folders whose marker is there and whose files have the
recorded sizes, so a half-written or truncated save is never picked up; ``verify`` checks
every file's sha256 (split across the ranks), so one altered in place is refused by name.
The last ``keep`` are kept; stale temporary folders of killed saves are removed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from trainer import distributed as D
from wordlist import sha256_file

MARKER = "COMPLETE"
# DCP's safetensors writer builds each file in memory before writing it: files of about this
# many bytes (per rank) bound what a save adds to a rank's memory
FILE_BYTES = 1 << 30
FILES = ("state.safetensors", "state.json", "config.json")  # beside shards/
SHARDS = "shards"


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


@contextlib.contextmanager
def _dcp_quiet():
    """DCP warns on every single-process save and load that it assumes a single process:
    that is our intent (a world of one), not news for the user."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled|unavailable)",
                                category=UserWarning)
        yield


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def is_complete(d: Path) -> bool:
    try:
        sizes = json.loads((d / MARKER).read_text())["sizes"]
        return (set(FILES) <= set(sizes) and any(f.startswith(SHARDS + "/") for f in sizes)
                and all((d / f).stat().st_size == n for f, n in sizes.items()))
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
    """Temporary folders left by saves that were killed (called before a save starts its own)."""
    root = ckpt_root(output)
    stale = list(root.glob(".tmp-step-*"))
    for d in stale:
        shutil.rmtree(d, ignore_errors=True)
    return stale


def file_groups(tensors: dict[str, torch.Tensor], world: int, limit: int | None = None) -> dict[str, int]:
    """Each tensor's file number (from 1), so that a rank's files hold about ``limit`` bytes
    each; the same on every rank (from global shapes: a DTensor's part is its 1/world)."""
    limit = FILE_BYTES if limit is None else limit
    groups, size, index = {}, 0, 1
    for k, v in tensors.items():
        n = v.numel() * v.element_size() // (world if hasattr(v, "device_mesh") else 1)
        if size and size + n > limit:
            index, size = index + 1, 0
        groups[k] = index
        size += n
    return groups


def _hash_share(folder: Path, names: list[str], d: D.Dist) -> dict[str, tuple[int, str]]:
    """(size, sha256) of every file in ``names``, each hashed by one rank (round robin), on
    every rank."""
    mine = {n: ((folder / n).stat().st_size, sha256_file(folder / n))
            for i, n in enumerate(names) if i % d.world == d.rank}
    out: dict = {}
    for part in D.gather_objects(mine, d):
        out.update(part)
    return out


def save(output: str | Path, step: int, tensors: dict[str, torch.Tensor], state: dict,
         config: dict, keep: int = 3, d: D.Dist | None = None) -> Path:
    """Collective under torchrun (every rank calls it with its own ``tensors``: DTensor
    shards, or replicated tensors that DCP writes once); ``state`` and ``config`` are rank
    0's. Returns the checkpoint's folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    d = d or D.Dist()
    root = ckpt_root(output)
    final = root / f"step-{step:08d}"
    tmp = None
    if d.is_main():
        small: dict[str, torch.Tensor] = {}
        skeleton = split_state(state, small)  # first: what cannot be stored fails before any write
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
        remove_stale(output)
        tmp.mkdir()
    tmp = Path(D.gather_objects(str(tmp), d)[0])  # rank 0's name, on every rank
    writer = HuggingFaceStorageWriter(str(tmp / SHARDS), save_distributed=True,
                                      fqn_to_index_mapping=file_groups(tensors, d.world))
    with _dcp_quiet():
        dcp.save(tensors, storage_writer=writer, no_dist=not d.enabled)
    D.barrier(d)  # DCP's writer fsyncs each file it writes (sync_files)
    names = sorted(f"{SHARDS}/{f.name}" for f in (tmp / SHARDS).iterdir())
    sums = _hash_share(tmp, names, d)
    if d.is_main():
        save_file(small, str(tmp / "state.safetensors"))
        (tmp / "state.json").write_text(json.dumps(skeleton))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for f in FILES:
            _fsync(tmp / f)
            sums[f] = ((tmp / f).stat().st_size, sha256_file(tmp / f))
        (tmp / MARKER).write_text(json.dumps({
            "step": step, "world": d.world, "sizes": {f: n for f, (n, _) in sums.items()},
            "sha256": {f: h for f, (_, h) in sums.items()}}))
        _fsync(tmp / MARKER)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep > 0:
            for old in list_complete(output)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    D.barrier(d)
    return final


def verify(path: Path, d: D.Dist | None = None) -> None:
    """Refuse a checkpoint whose files do not match its marker's checksums (collective: each
    file is hashed by one rank, every rank gets the same answer)."""
    d = d or D.Dist()
    if (path / "state.pt").exists() or (path / "trainable.safetensors").exists():
        raise CheckpointError(f"{path} is in an older format (a single-process file, not "
                              f"{SHARDS}/), which this version does not resume; start the run over")
    if not is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (missing or mismatched "
                                f"{MARKER} marker)")
    want = json.loads((path / MARKER).read_text()).get("sha256", {})
    got = _hash_share(path, sorted(want), d)
    for f in sorted(want):
        if got[f][1] != want[f]:
            raise CheckpointError(f"{path / f}: sha256 differs from the one in {MARKER} "
                                  f"(altered or damaged); this checkpoint cannot be resumed")


def read_state(path: Path) -> dict:
    return join_state(json.loads((path / "state.json").read_text()),
                      load_file(str(path / "state.safetensors")))


def load(path: str | Path, tensors: dict[str, torch.Tensor] | None = None,
         d: D.Dist | None = None, check=None) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, state), after ``verify``; no pickle is ever read. ``tensors``: the state
    dict to fill in place (DTensors get this rank's part, resharded from however many ranks
    saved it); None: every tensor whole, in this process. ``check(path, state)`` may refuse
    the checkpoint before any tensor is read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    path = Path(path)
    verify(path, d)
    state = read_state(path)
    if check is not None:
        check(path, state)
    reader = HuggingFaceStorageReader(str(path / SHARDS))
    if tensors is None:
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        with _dcp_quiet():
            tensors = _load_state_dict_from_keys(storage_reader=reader)
    else:
        with _dcp_quiet():
            dcp.load(tensors, storage_reader=reader, no_dist=d is None or not d.enabled)
    return tensors, state


def load_latest(output: str | Path, tensors: dict[str, torch.Tensor] | None = None,
                d: D.Dist | None = None, check=None, warn=print) -> tuple[Path, dict, dict] | None:
    """The newest checkpoint that verifies; each newer one that does not (incomplete, altered,
    an older format) is named in one line with why. None when ``output`` holds no checkpoint
    at all (a fresh start); a ``CheckpointError`` listing every one found, and why, when it
    holds some and none is valid: such a run must never restart from step 0 on its own."""
    root = ckpt_root(output)
    found = sorted((p for p in root.glob("step-*") if p.is_dir()),
                   key=lambda p: int(p.name.split("-")[1])) if root.is_dir() else []
    why = []
    for path in reversed(found):
        try:
            return (path, *load(path, tensors, d, check))
        except (CheckpointError, FileNotFoundError) as e:
            why.append(str(e))
            warn(f"warning: skipping checkpoint {path}: {e}; trying the one before")
    if not found:
        return None
    raise CheckpointError(
        f"resume=latest found {len(found)} checkpoint(s) in {root} and none is valid: "
        + "; ".join(why) + ". Nothing was trained. To start this run over on purpose, run "
        "without resume and with log.overwrite=true (deletes them), or pick another log.output")
