"""A training run survives a cluster's stops: SIGTERM / SIGUSR1 end the step, save a complete
checkpoint and exit non-zero saying so, and resume=latest continues exactly; one writer per
log.output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _overrides(tiny_clip, tiny_llm, sample, label_run, out):
    js, root = sample
    return [f"vision.model={tiny_clip}", "vision.pretrained=null", f"llm.path={tiny_llm}",
            f"data.json={js}", f"data.image_root={root}", f"data.shards={label_run}",
            "data.holdout_images=4", "data.num_workers=0", "data.shuffle_window=2",
            "optim.global_batch_size=4", "optim.micro_batch_size=2", "optim.epochs=12",
            "optim.lr=1e-2", "log.eval_every=0", "log.save_every=1000", "log.every=1",
            "log.progress=false", "log.report_to=[]", f"log.output={out}"]


def _train_losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_clip, tiny_llm, sample, label_run, tmp_path_factory):
    from seacore.config import load_config
    from trainer.config import PretrainConfig
    from trainer.train import train

    out = tmp_path_factory.mktemp("full") / "run"
    return train(load_config(PretrainConfig, None, _overrides(
        tiny_clip, tiny_llm, sample, label_run, out)))["losses"]


@pytest.mark.slow  # two real CLI runs per signal (~13 s each): out of the fast lane
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_signal_saves_the_step_and_resume_continues_exactly(sig, tiny_clip, tiny_llm, sample,
                                                              label_run, uninterrupted, tmp_path):
    from trainer import checkpoint

    full = uninterrupted
    out = tmp_path / "stopped"
    args = [sys.executable, "-m", "trainer", "pretrain",
            *_overrides(tiny_clip, tiny_llm, sample, label_run, out)]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    os.kill(proc.pid, sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, err[-3000:]
    line = [x for x in err.splitlines() if x.startswith("preempted:")]
    assert len(line) == 1 and signal.Signals(sig).name in line[0] and "resume=latest" in line[0]
    stopped_at = checkpoint.latest(out)
    step = int(stopped_at.name.split("-")[1])
    assert 3 <= step < len(full) and f"after step {step}" in line[0]
    assert not (out / "final").exists() and not (out / ".lock").exists()
    r = subprocess.run(args + ["resume=latest"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _train_losses(out) == full  # every step once, identical floats on CPU


def test_a_second_writer_on_the_same_output_is_refused(pretrain_cfg, tmp_path):
    import socket

    from pipeline.lock import LOCK, FolderLocked
    from trainer.train import train

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        out.mkdir()
        (out / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                            "since": time.time()}))
        with pytest.raises(FolderLocked, match="log.output"):
            train(pretrain_cfg(f"log.output={out}", "resume=latest"))
        assert not (out / "metrics.jsonl").exists()  # refused before anything was written
    finally:
        holder.kill()
        holder.wait()
    res = train(pretrain_cfg(f"log.output={out}", "resume=latest", "optim.max_steps=1"))
    assert res["step"] == 1 and not (out / LOCK).exists()  # the dead holder's lock taken over
