"""The temperature learns at a rate of its own (sea.tau_lr_scale), and sea.top_k draws SEA's
pairs from each patch's best k labels only."""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.shards import SENTINEL
from trainer.sea_loss import Draws


def _final_tau(res) -> float:
    import json
    from pathlib import Path

    rows = [json.loads(x) for x in (Path(res["final"]).parent / "metrics.jsonl").read_text().splitlines()]
    return [r["tau"] for r in rows if "tau" in r][-1]


def test_the_temperature_moves_at_its_own_rate(pretrain_cfg):
    from trainer.train import train

    moved = {}
    for scale in (1, 10):
        res = train(pretrain_cfg("sea.weight=1", "optim.lr=1e-3", "optim.epochs=2", "log.every=1",
                                 "log.overwrite=true", f"sea.tau_lr_scale={scale}"))
        moved[scale] = abs(math.log(_final_tau(res)))
    # Adam moves a parameter about lr a step: ~10x further at 10x the rate (same gradients' sign)
    assert moved[1] > 0 and 5 < moved[10] / moved[1] < 15, moved


def test_the_temperature_has_its_own_param_group(pretrain_cfg):
    from trainer.train import build

    p = build(pretrain_cfg("sea.weight=1", "optim.lr=2e-3", "sea.tau_lr_scale=7"), "pretrain")
    groups = {id(q): g["initial_lr"] for g in p.optimizer.param_groups for q in g["params"]}
    assert groups[id(p.task.align.log_tau)] == 2e-3 * 7
    assert {lr for k, lr in groups.items() if k != id(p.task.align.log_tau)} == {2e-3}


def test_top_k_draws_only_the_best_k_labels():
    rng = np.random.default_rng(0)
    b, grid, n = 4, (4, 4), 5
    ids = np.stack([rng.permutation(50)[:n] for _ in range(b * 16)]).reshape(b, 16, n).astype(np.int32)
    scores = np.sort(rng.random((b, 16, n)), axis=-1)[..., ::-1].astype(np.float16)  # best first
    ids[0, 3] = SENTINEL  # a patch with no kept label stays skipped
    seen_all, seen_top = set(), set()
    for batch in range(40):
        for k, seen in ((0, seen_all), (1, seen_top)):
            m = Draws(grid, 2, "sampled", 0, k)(torch.from_numpy(ids), torch.from_numpy(scores.copy()),
                                                0, batch)
            for t, w in zip(m.token.tolist(), m.words.tolist(), strict=True):
                seen.add((t, w))
    first = {(i * 16 + p, int(ids[i, p, 0])) for i in range(b) for p in range(16) if ids[i, p, 0] != SENTINEL}
    assert seen_top <= first and len(seen_top) > 10
    assert not seen_all <= first  # without top_k, lower-ranked labels are drawn too
