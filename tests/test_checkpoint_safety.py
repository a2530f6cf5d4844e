"""Issue 12, item 5: checkpoints hold no pickles, carry checksums, and are verified."""

import json
import pickle
import random

import numpy as np
import pytest
import torch

from trainer import checkpoint


class _Boom:
    """Unpickling this runs code: what a crafted state.pt could do."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_a_crafted_pickle_is_never_loaded(tmp_path):
    good = checkpoint.save(tmp_path, 2, {"a": torch.ones(2)}, {"x": 1}, {})
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in good.iterdir())
    target = tmp_path / "pwned"
    (good / "state.pt").write_bytes(pickle.dumps({"x": _Boom(target)}))
    with pytest.raises(checkpoint.CheckpointError, match="older format"):
        checkpoint.load(good)
    assert not target.exists()


def test_state_round_trips_without_pickle(tmp_path):
    from trainer.manager import rng_state

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    random.random()
    np.random.rand()
    state = {"train_state": {"step": 3, "epoch": 0}, "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "rng": [rng_state()], "world": 1}
    path = checkpoint.save(tmp_path, 3, dict(net.state_dict()), state, {})
    weights, back = checkpoint.load(path)
    assert torch.equal(weights["weight"], net.weight)
    assert back["train_state"] == state["train_state"] and back["world"] == 1
    st, bs = state["optimizer"]["state"][0], back["optimizer"]["state"][0]
    assert set(bs) == set(st) and all(torch.equal(bs[k], st[k]) for k in st)
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert back["scheduler"] == state["scheduler"]
    r0, r1 = state["rng"][0], back["rng"][0]
    assert torch.equal(r0["torch"], r1["torch"]) and r0["python"] == r1["python"]
    assert all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b
               for a, b in zip(r0["numpy"], r1["numpy"], strict=True))
    random.setstate(r1["python"])  # restorable as the interpreter expects it
    np.random.set_state(r1["numpy"])


def test_state_refuses_what_it_cannot_store_safely(tmp_path):
    with pytest.raises(TypeError, match="only tensors"):
        checkpoint.save(tmp_path, 1, {}, {"fn": object()}, {})


def test_a_corrupted_latest_is_reported_and_the_previous_used(tmp_path):
    w = {"a": torch.arange(1000, dtype=torch.float32)}
    prev = checkpoint.save(tmp_path, 2, w, {"x": 1}, {})
    last = checkpoint.save(tmp_path, 4, w, {"x": 2}, {})
    f = next((last / checkpoint.SHARDS).iterdir())
    data = bytearray(f.read_bytes())
    data[-10] ^= 0x01  # same size: only the checksum can tell
    f.write_bytes(bytes(data))
    warnings = []
    path, _, state = checkpoint.load_latest(tmp_path, warn=warnings.append)
    assert path == prev and state == {"x": 1}
    assert len(warnings) == 1 and str(f) in warnings[0] and "sha256" in warnings[0]
    with pytest.raises(checkpoint.CheckpointError, match="sha256"):
        checkpoint.load(last)  # resume=PATH refuses it


def test_stale_temporary_folders_are_removed(tmp_path):
    stale = tmp_path / "checkpoints" / ".tmp-step-00000004-99999999"
    stale.mkdir(parents=True)
    (stale / "trainable.safetensors").write_bytes(b"half")
    checkpoint.save(tmp_path, 6, {"a": torch.ones(1)}, {}, {})
    assert not stale.exists()
    marker = json.loads((tmp_path / "checkpoints" / "step-00000006" / checkpoint.MARKER).read_text())
    shards = {f"{checkpoint.SHARDS}/{f.name}" for f in (tmp_path / "checkpoints" / "step-00000006" / checkpoint.SHARDS).iterdir()}
    assert shards and set(marker["sha256"]) == set(checkpoint.FILES) | shards


def test_a_rank_part_is_split_into_files_that_load_back(tmp_path, monkeypatch):
    """DCP's safetensors writer builds each file in memory: a save writes files of about
    FILE_BYTES each (a 1B model's AdamW state was 11 GB in one file, twice in memory), and
    they load back to the same tensors."""
    monkeypatch.setattr(checkpoint, "FILE_BYTES", 3000)
    w = {f"t{i}": torch.randn(250) for i in range(8)}  # 1,000 bytes each
    path = checkpoint.save(tmp_path, 1, w, {"x": 1}, {})
    files = sorted((path / checkpoint.SHARDS).iterdir())
    assert len(files) == 3 and all(f.stat().st_size < 4000 for f in files)
    back, state = checkpoint.load(path)
    assert state == {"x": 1} and back.keys() == w.keys()
    assert all(torch.equal(back[k], w[k]) for k in w)
