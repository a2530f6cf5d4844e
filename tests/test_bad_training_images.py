"""Undecodable training images are found as the run goes, not at its end: the rate is watched
against data.max_error_rate (the first step's batch included, before any step), the first files
are named, and the end of the run says how many samples were dropped and why."""

from __future__ import annotations

import json
import shutil

import pytest

from trainer import checkpoint
from trainer.train import train


def _break_images(sample, tmp_path, share: float):
    """A copy of the sample set whose images, a ``share`` of them, are not images."""
    js, root = sample
    new_root = tmp_path / "imgs"
    shutil.copytree(root, new_root)
    items = json.loads(js.read_text())
    broken = [it["image"] for it in items[: round(share * len(items))]]
    for rel in broken:
        (new_root / rel).write_text("not an image")
    return new_root, broken


def test_a_run_with_every_image_unreadable_stops_before_the_first_step(pretrain_cfg, sample,
                                                                      tmp_path):
    root, broken = _break_images(sample, tmp_path, 1.0)
    out = tmp_path / "run"
    with pytest.raises(ValueError) as e:
        train(pretrain_cfg(f"data.image_root={root}", "data.shards=null", "sea.weight=0",
                           "data.holdout_images=0", f"log.output={out}"))
    msg = str(e.value)
    assert "before step 1" in msg and "100.0%" in msg and "data.max_error_rate=0.05" in msg
    assert any(b in msg for b in broken) and "cannot decode" in msg
    assert not checkpoint.list_complete(out) and not (out / "final").exists()


def test_a_run_over_the_rate_stops_naming_files_and_rate(pretrain_cfg, sample, tmp_path):
    root, broken = _break_images(sample, tmp_path, 0.5)
    with pytest.raises(ValueError) as e:
        train(pretrain_cfg(f"data.image_root={root}", "data.shards=null", "sea.weight=0",
                           "data.holdout_images=0", "optim.epochs=2"))
    msg = str(e.value)
    assert "data.max_error_rate=0.05" in msg and any(b in msg for b in broken)


def test_a_run_under_the_rate_says_what_it_dropped(pretrain_cfg, sample, tmp_path, capfd):
    root, broken = _break_images(sample, tmp_path, 0.5)
    res = train(pretrain_cfg(f"data.image_root={root}", "data.shards=null", "sea.weight=0",
                             "data.holdout_images=0", "data.max_error_rate=0.9"))
    err = capfd.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("data: trained on")]
    assert len(line) == 1 and "unreadable" in line[0] and "cannot decode" in line[0], err[-2000:]
    assert res["dropped"]["unreadable"] > 0 and res["samples"] > 0


def test_one_unlucky_file_in_the_first_batch_does_not_stop_a_run():
    from trainer.watch import DropWatch, wilson_low

    w = DropWatch(0.05)
    w.add([{"input_ids": [0] * 15, "unreadable": ["a.jpg: cannot decode: x"]}])
    assert w.problem(w.seen, w.bad, 0, "d.json") is None  # 1 of 16: not surely above 5 %
    assert w.problem(w.seen, w.bad, 9, "d.json", final=True)  # but 6.2 % at the end is
    assert w.reasons == {"cannot decode": 1}
    # the interval itself, against its textbook value (Wilson 1927; 2 of 10 -> 0.0567)
    assert abs(wilson_low(2, 10) - 0.0567) < 1e-3 and abs(wilson_low(0, 10)) < 1e-12
