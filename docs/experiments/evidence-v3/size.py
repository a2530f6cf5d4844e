"""Sizing protocol v3 on a world seed that the protocol does not use (1; the protocol's is 0).

Reads only what the issue allows sizing to read: the LM's answers from context (text only),
lambda = 1's own L_a curve and its held-out L_a at the criterion temperature (the treatment
measure, not an endpoint), lambda = 0's caption loss. No endpoint (truth match, answers,
learning curve) is computed here.

    python docs/experiments/evidence-v3/size.py OUT LM_STEPS STAGE1_EPOCHS [TAU0 ...]
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from seacore.config import load_config
from trainer.config import PretrainConfig
from trainer.runlog import read_metrics
from trainer.train import build, train
from world import metrics
from world.evidence import PRESETS, Evidence
from world.models import LMSpec


def main(out: str, lm_steps: int, epochs: int, taus: list[float]) -> None:
    base = PRESETS["full"]
    p = replace(base, world_seed=1, runner="local", seeds=(0,), stage2=False,
                lm=LMSpec(steps=lm_steps, scene_documents=True), lm_small=None, stage1_epochs=epochs)
    ev = Evidence(p, out, progress=False, device="cpu")
    res = {"world_seed": 1, "lm_steps": lm_steps, "stage1_epochs": epochs}
    ev.worlds()
    ev.models()
    res["lm"] = ev.results["lm"]
    print(json.dumps({"lm_reads_context": {c: {t: round(a["accuracy"], 3) for t, a in v.items()}
                                           for c, v in ev.results["lm"]["reads_context"].items()}}), flush=True)
    ev.labels()
    res["best_mode"] = ev.results["best_mode_by_list"]
    arms = [a for a in ev.arms() if a["primary"]]
    runs = {}
    for tau in [None, *taus]:
        arm = dict(arms[0 if tau is None else 1])
        if tau is not None:
            arm["log_tau_init"] = math.log(tau)
        labels = ev.train_labels[(arm["mode"], arm["list"])]
        name = "lambda0" if tau is None else f"lambda1-tau{tau:g}"
        cfg = load_config(PretrainConfig, None, [
            f"vision.model={ev.clip}", "vision.pretrained=null", f"llm.path={ev.llm}",
            f"data.image_root={ev.train_dir / 'images'}", "data.num_workers=0",
            f"data.json={ev.train_dir / 'captions-mllm.json'}", f"data.shards={labels}",
            f"data.holdout_images={p.holdout}", f"optim.epochs={epochs}", f"optim.lr={p.stage1_lr}",
            f"optim.global_batch_size={p.global_batch}", f"optim.micro_batch_size={p.micro_batch}",
            "optim.seed=0", f"sea.weight={arm['weight']}", f"sea.log_tau_init={arm.get('log_tau_init', 0.0)}",
            f"sea.wordlist={ev._wordlist(arm['list'])}", f"sea.top_k={arm['top_k']}",
            f"sea.tau_lr_scale={p.tau_lr_scale}", "log.eval_every=0", "log.save_every=100000",
            "log.overwrite=true", "log.progress=false", "log.report_to=[]", "device=cpu", "log.every=1",
            f"log.output={Path(out) / 'runs' / name}"])
        t0 = time.time()
        parts = build(cfg, "pretrain")
        r = train(cfg, "pretrain", parts=parts)
        secs = time.time() - t0
        tr = [x for x in read_metrics(Path(cfg.log.output) / "metrics.jsonl") if x.get("kind") == "train"]
        row = {"steps": r["step"], "seconds": round(secs, 1), "seconds_per_step": round(secs / r["step"], 3),
               "watcher_fired": r["align_at_chance"],
               "train_loss_curve": _every(tr, "lm_loss"), "tau_final": r.get("tau")}
        if tau is not None:
            row["align_curve"] = _every(tr, "align_loss")
            row["chance_curve"] = _every(tr, "align_chance")
            row["tau_curve"] = _every(tr, "tau")
        parts.task.mllm.eval()
        row["heldout_align"] = ev.heldout_align(parts, arm["mode"], arm["list"], arm["top_k"])
        row["caption_loss_heldout"] = metrics.caption_loss(parts.task.mllm, parts.tokenizer,
                                                           parts.encoder.preprocess, ev.test_dir)
        runs[name] = row
        print(json.dumps({name: {k: v for k, v in row.items() if not k.endswith("curve")}}), flush=True)
    res["runs"] = runs
    (Path(out) / "sizing.json").write_text(json.dumps(res, indent=1, default=str))


def _every(rows: list[dict], key: str, points: int = 20) -> list[list[float]]:
    """(step, mean of ``key`` over the steps since the previous point) at ``points`` points."""
    n = len(rows)
    edges = np.linspace(0, n, points + 1).astype(int)
    return [[rows[b - 1]["step"], float(np.mean([r[key] for r in rows[a:b] if key in r] or [np.nan]))]
            for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), [float(x) for x in sys.argv[4:]])
