"""Issue 12, item 6: reruns of training are explicit, and a resume logs every step once."""

import json

import pytest

from trainer import checkpoint
from trainer.train import train


def _train_steps(out):
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x["step"] for x in lines if x["kind"] == "train"]


def test_rerun_into_a_used_folder_is_refused_and_resume_logs_each_step_once(pretrain_cfg, tmp_path):
    out = tmp_path / "run"
    args = ["optim.epochs=2", "log.save_every=2", f"log.output={out}"]
    part = train(pretrain_cfg(*args), "pretrain", stop_after=3)  # killed after step 3
    assert part["stopped_early"] and checkpoint.latest(out).name == "step-00000002"
    assert _train_steps(out) == [1, 2, 3]
    with pytest.raises(ValueError, match=rf"{out}.*resume=latest.*log.overwrite=true"):
        train(pretrain_cfg(*args), "pretrain")
    full = train(pretrain_cfg(*args, "resume=latest"), "pretrain")
    steps = _train_steps(out)
    assert steps == list(range(1, full["step"] + 1))  # step 3 once, not replayed twice
    # a finished run is refused too; log.overwrite starts over
    with pytest.raises(ValueError, match="already holds a run"):
        train(pretrain_cfg(*args), "pretrain")
    again = train(pretrain_cfg(*args, "log.overwrite=true"), "pretrain")
    assert again["losses"] == full_losses(part, full) and _train_steps(out) == steps


def full_losses(part, rest):
    return part["losses"][:2] + rest["losses"]
