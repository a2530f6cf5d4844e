"""Two gloo ranks where one has nothing to train on finish (no hang) with the single-process
gradients; a rank that never arrives ends the job on dist.timeout_s, naming the rank."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _run(nproc, mode, out, args, timeout=300):
    # a rank that hangs is killed, and cleans nothing up: temp files go to the test's folder
    tmp = Path(out).parent / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", TMPDIR=str(tmp))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(REPO / "tests" / "_empty_worker.py"), mode, str(out), *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("gather", [False, True], ids=["local-negatives", "gathered-negatives"])
def test_a_rank_with_an_empty_micro_batch_does_not_hang(gather, pretrain_cfg, tmp_path):
    """Local negatives: two ranks (one micro-batch each, rank 1's empty) optimise the mean of
    the two micro-batch losses, as one process holding both. Gathered negatives: every rank
    computes L_a over all ranks' pairs (here rank 0's alone) and DDP averages, so the objective
    is (L_g0 + 0) / 2 + L_a0, which one process gets from its two micro-batches at lambda = 2."""
    from test_finetune import _as_args

    common = ["optim.global_batch_size=4", "optim.micro_batch_size=2", "dist.timeout_s=120"]
    two_args = _as_args(pretrain_cfg(*common, "sea.weight=1",
                                     f"sea.gather_negatives={str(gather).lower()}"))
    one_args = _as_args(pretrain_cfg(*common, f"sea.weight={2 if gather else 1}"))
    import _empty_worker

    _empty_worker.main(["empty", str(tmp_path / "one.pt"), *one_args])  # the reference, in-process
    r2 = _run(2, "empty", tmp_path / "two.pt", two_args)
    assert r2.returncode == 0, r2.stderr[-4000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    # the step's loss is the mean over the ranks, the same on each (rank 1's own is 0 with
    # local negatives, L_a0 with gathered ones)
    assert two["losses"][0] == two["losses"][1] > 0
    assert two["losses"][0] == pytest.approx(one["losses"][0], rel=1e-5)
    assert one["grads"].keys() == two["grads"].keys() and "align.log_tau" in one["grads"]
    for name, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_a_stuck_rank_ends_the_job_on_the_timeout_naming_the_rank(pretrain_cfg, tmp_path):
    from test_finetune import _as_args

    args = _as_args(pretrain_cfg("dist.timeout_s=5"))
    r = _run(2, "stuck", tmp_path / "x.pt", args, timeout=120)
    assert r.returncode != 0
    assert "rank 0" in r.stderr and "dist.timeout_s=5" in r.stderr, r.stderr[-3000:]
