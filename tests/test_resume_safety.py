"""resume=latest never restarts silently, reads a torn log, and compares paths as places."""

from __future__ import annotations

import json
import shutil

import pytest

from trainer import checkpoint
from trainer.checkpoint import CheckpointError
from trainer.train import train


def _stopped_run(pretrain_cfg, out, *extra):
    args = [f"log.output={out}", "log.save_every=2", "optim.epochs=2", *extra]
    part = train(pretrain_cfg(*args), "pretrain", stop_after=5)
    assert part["stopped_early"] and len(checkpoint.list_complete(out)) == 2
    return args


def test_resume_with_only_invalid_checkpoints_refuses_naming_each(pretrain_cfg, tmp_path, capfd):
    out = tmp_path / "run"
    args = _stopped_run(pretrain_cfg, out)
    ckpts = checkpoint.list_complete(out)
    (ckpts[0] / checkpoint.MARKER).unlink()  # incomplete
    with open(ckpts[1] / "state.json", "a") as f:  # altered in place, same size check fails
        f.write(" ")
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError) as e:
        train(pretrain_cfg(*args, "resume=latest"), "pretrain")
    msg = str(e.value)
    assert "none is valid" in msg and ckpts[0].name in msg and ckpts[1].name in msg
    assert "log.overwrite=true" in msg
    err = capfd.readouterr().err
    assert sum("skipping checkpoint" in ln for ln in err.splitlines()) == 2  # each named once
    assert (out / "metrics.jsonl").read_text() == before  # history untouched


def test_a_skipped_newer_checkpoint_is_named_and_the_older_one_used(pretrain_cfg, tmp_path, capfd):
    out = tmp_path / "run"
    args = _stopped_run(pretrain_cfg, out)
    newest = checkpoint.list_complete(out)[-1]
    (newest / checkpoint.MARKER).unlink()
    capfd.readouterr()
    res = train(pretrain_cfg(*args, "resume=latest"), "pretrain")
    err = capfd.readouterr().err
    assert f"skipping checkpoint {newest}" in err and "resumed from" in err and "step 2" in err
    assert res["step"] > 5


def test_a_torn_last_metrics_line_is_dropped_with_a_warning(pretrain_cfg, tmp_path, capfd):
    out = tmp_path / "run"
    args = _stopped_run(pretrain_cfg, out)
    metrics = out / "metrics.jsonl"
    text = metrics.read_text()
    metrics.write_text(text + text.splitlines()[-1][:40])  # a full disk cut the write
    capfd.readouterr()
    train(pretrain_cfg(*args, "resume=latest"), "pretrain")
    err = capfd.readouterr().err
    n = len(text.splitlines()) + 1
    assert f"{metrics} line {n} is cut short" in err
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert steps == sorted(set(steps))  # every step once


def test_a_bad_line_inside_the_log_names_the_file(tmp_path):
    from trainer.runlog import read_metrics

    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1}\n{"step": 2, "loss": 1.\n{"step": 3}\n')
    with pytest.raises(ValueError, match=rf"{p} line 2 is not JSON"):
        read_metrics(p)


def test_paths_are_compared_as_places(pretrain_cfg, sample, tmp_path):
    out = tmp_path / "run"
    args = _stopped_run(pretrain_cfg, out)
    link = tmp_path / "linked.json"
    link.symlink_to(sample[0])
    res = train(pretrain_cfg(*args, f"log.output={out}/", f"data.json={link}", "resume=latest"),
                "pretrain")
    assert res["step"] > 5


def test_resume_on_a_finished_run_logs_nothing_new(pretrain_cfg, tmp_path, capfd):
    out = tmp_path / "run"
    args = [f"log.output={out}", "optim.max_steps=3", "log.eval_every=0"]
    train(pretrain_cfg(*args), "pretrain")
    before = (out / "metrics.jsonl").read_text()
    final = (out / "final" / "adapter.safetensors").read_bytes()
    capfd.readouterr()
    res = train(pretrain_cfg(*args, "resume=latest"), "pretrain")
    assert res["step"] == 3 and "already finished at step 3" in capfd.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before
    assert (out / "final" / "adapter.safetensors").read_bytes() == final
    shutil.rmtree(out / "final")  # killed between the last checkpoint and final/: written again
    train(pretrain_cfg(*args, "resume=latest"), "pretrain")
    assert (out / "final" / "adapter.safetensors").is_file()
