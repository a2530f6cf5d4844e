"""The temperature watch: a stage-1 run whose L_a stays at ln(pairs) says so, once, in one line
(stderr, progress bar, metrics); a run whose L_a falls says nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path

from trainer.watch import ChanceWatch


def test_the_watch_fires_once_after_the_settling_steps_and_a_full_window():
    w = ChanceWatch(total_steps=100, log_tau_init=0.0)
    chance = math.log(300)
    assert (w.start, w.window) == (10, 5)
    fired = [s for s in range(1, 101) if w.update(s, chance * 1.005, chance, 1.01)]
    assert fired == [15]  # steps 11-15 judged; the first 10 never are


def test_the_watch_needs_the_whole_window_at_chance():
    w = ChanceWatch(total_steps=100, log_tau_init=0.0)
    chance = math.log(300)
    losses = [chance] * 14 + [chance * 0.97] + [chance] * 4 + [chance * 0.95] * 81
    assert not any(w.update(s, v, chance, 1.0) for s, v in enumerate(losses, 1))
    # below chance by more than 1 % throughout: the tokens are aligning
    w = ChanceWatch(total_steps=100, log_tau_init=-2.66)
    assert not any(w.update(s, chance * 0.9, chance, 0.07) for s in range(1, 101))


def test_the_line_names_the_setting_and_the_start_value():
    w = ChanceWatch(total_steps=20, log_tau_init=0.0)
    lines = [w.update(s, 3.466, 3.466, 1.004) for s in range(1, 21)]
    line = next(x for x in lines if x)
    assert "sea.log_tau_init=0" in line and "tau = 1" in line and "now 1.004" in line
    assert "\n" not in line


def test_a_stage1_run_at_chance_says_so(pretrain_cfg, tmp_path, capfd):
    from trainer.train import train

    # lr 0: the adapter never moves, so L_a stays where a random adapter puts it at tau = 1
    res = train(pretrain_cfg("sea.weight=1", "optim.lr=0", "optim.epochs=3", "log.every=1",
                             "sea.learn_tau=false"))
    err = capfd.readouterr().err
    hits = [ln for ln in err.splitlines() if "stayed within 1 % of its chance level" in ln]
    assert len(hits) == 1 and "sea.log_tau_init=0" in hits[0], err[-2000:]
    rows = [json.loads(x) for x in (Path(res["final"]).parent / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r.get("kind", "train") == "train" and "align_at_chance" in r]
    assert train_rows and train_rows[-1]["align_at_chance"] == 1 and train_rows[0]["align_at_chance"] == 0
    assert all(r["align_chance"] > 0 for r in train_rows)
    assert res["align_at_chance"] is True  # and the run's result says so


def test_a_run_whose_alignment_moves_says_nothing(pretrain_cfg, capfd):
    from trainer.train import train

    res = train(pretrain_cfg("sea.weight=1", "sea.log_tau_init=-2.66", "optim.lr=0.05", "optim.epochs=3"))
    assert "chance level" not in capfd.readouterr().err and res["align_at_chance"] is False
