"""``python -m world baseline``: does the lambda = 0 model learn to see, and how fast?

The sizing step that comes before any comparison of arms: stage 1 and stage 2 of the
lambda = 0 model only (no labels are read), with the stage-2 learning curve in the training
format and the blind controls at the end. Its numbers size the evidence protocol; it never
trains a lambda = 1 arm, so it cannot tune the protocol toward a result.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

from world.evidence import PRESETS, Evidence, _curve_steps


def run_baseline(out: str, stage1_epochs: int, stage2_epochs: int, stage2_lr: float,
                 global_batch: int, seed: int = 0, curve_points: int = 8,
                 preset: str = "full", clip: list[str] = (), cache: str | None = None,
                 device: str = "auto", lm: list[str] = ()) -> dict:
    """``clip``, ``lm``: ``FIELD=VALUE`` changes to the preset's ClipSpec and LMSpec (a model
    variant is sized the same way), read like the trainer's config overrides."""
    from seacore.config import ConfigError, from_dict, load_config, parse_overrides
    from trainer.config import FinetuneConfig, PretrainConfig
    from trainer.train import build, train
    from world.models import ClipSpec, LMSpec

    base = PRESETS[preset]
    specs = {}
    for flag, cls, cur, given in (("clip", ClipSpec, base.clip, clip), ("lm", LMSpec, base.lm, lm)):
        try:
            specs[flag] = from_dict(cls, {**asdict(cur), **parse_overrides(list(given))})
        except ConfigError as e:
            raise SystemExit(f"--{flag}: {e}; expected FIELD=VALUE, a field of "
                             f"world.models.{cls.__name__}") from None
    proto = replace(base, stage1_epochs=stage1_epochs, stage2_epochs=stage2_epochs,
                    stage2_lr=stage2_lr, global_batch=global_batch, micro_batch=min(32, global_batch),
                    curve_points=curve_points, clip=specs["clip"], lm=specs["lm"])
    ev = Evidence(proto, out, cache=cache, progress=False, device=device)
    ev.worlds()
    ev.models()
    p, work = ev.p, Path(out) / "baseline-runs"
    common = [f"vision.model={ev.clip}", "vision.pretrained=null", f"llm.path={ev.llm}",
              f"data.image_root={ev.train_dir / 'images'}", "data.num_workers=0", "data.shards=null",
              f"optim.global_batch_size={p.global_batch}", f"optim.micro_batch_size={p.micro_batch}",
              f"optim.seed={seed}", "log.overwrite=true", "log.progress=false", "log.report_to=[]",
              f"device={ev.device}", "log.eval_every=0", "log.save_every=100000", "sea.weight=0"]
    t0 = time.time()
    s1 = load_config(PretrainConfig, None, common + [
        f"data.json={ev.train_dir / 'captions-mllm.json'}", f"optim.epochs={p.stage1_epochs}",
        f"optim.lr={p.stage1_lr}", "data.holdout_images=0", f"log.output={work / 's1'}"])
    r1 = train(s1, "pretrain")
    t1 = time.time()
    s2 = load_config(FinetuneConfig, None, common + [
        f"data.json={ev.train_dir / 'instruct-mllm.json'}", f"optim.epochs={p.stage2_epochs}",
        f"optim.lr={p.stage2_lr}", f"init_from={s1.log.output}", f"log.output={work / 's2'}"])
    parts = build(s2, "finetune")
    at = _curve_steps(parts.total_steps, p.curve_points)
    curve, evals = [], [0.0]

    def on_step(step: int) -> None:
        if step in at:
            t = time.time()
            curve.append({"step": step, **ev._curve_point(parts)})
            evals[0] += time.time() - t
            print(json.dumps(curve[-1]), flush=True)

    curve.append({"step": 0, **ev._curve_point(parts)})
    r2 = train(s2, "finetune", parts=parts, on_step=on_step)
    t2 = time.time()
    parts.task.eval()
    final = ev._answers(parts, blind=True)
    res = {"protocol": {**{k: getattr(p, k) for k in ("stage1_epochs", "stage2_epochs", "stage2_lr",
                                                     "global_batch", "micro_batch", "mllm_scenes")},
                        "clip": asdict(p.clip), "lm": asdict(p.lm)},
           "clip_zero_shot": ev.results["clip"]["zero_shot"],
           "seed": seed, "device": ev.device, "stage1_steps": r1["step"], "stage2_steps": r2["step"],
           "stage1_seconds": round(t1 - t0, 1), "stage2_seconds": round(t2 - t1 - evals[0], 1),
           "curve_eval_seconds": round(evals[0], 1), "final_eval_seconds": round(time.time() - t2, 1),
           "curve": curve, "final": {k: final[k] for k in ("answers", "answers_alone", "blind")}}
    Path(out, "baseline.json").write_text(json.dumps(res, indent=1))
    return res
