"""``python -m world {evidence,report,baseline,demo,scenes}``: the ground-truth world's command
line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m world", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    ev = sub.add_parser("evidence", help="the whole protocol -> EVIDENCE.md, results.json, figures")
    ev.add_argument("--preset", default="full", choices=["full", "quick", "demo"])
    ev.add_argument("--quick", action="store_true", help="same as --preset quick (under 3 min)")
    ev.add_argument("--out", default="evidence", help="results.json and figures")
    ev.add_argument("--work", default=None, help="scenes, models, shards, runs (default OUT/work)")
    ev.add_argument("--md", default="EVIDENCE.md", help="the report")
    ev.add_argument("--cache", default=None, help="trained-model cache (default $SEA_CACHE/world)")
    ev.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda: where "
                                                     "the world's models train and answer")
    rp = sub.add_parser("report", help="redraw the figures and the report from OUT/results.json")
    rp.add_argument("--out", default="evidence")
    rp.add_argument("--md", default="EVIDENCE.md")
    rp.add_argument("--command", default="make evidence", help="the command named in the report")
    bl = sub.add_parser("baseline", help="lambda = 0 only: does the MLLM learn to see, how fast "
                                         "(sizes the protocol; never trains a lambda = 1 arm)")
    bl.add_argument("--out", default="evidence_baseline")
    bl.add_argument("--preset", default="full", choices=["full", "quick"])
    bl.add_argument("--stage1-epochs", type=int, default=1)
    bl.add_argument("--stage2-epochs", type=int, default=5)
    bl.add_argument("--stage2-lr", type=float, default=5e-4)
    bl.add_argument("--global-batch", type=int, default=32)
    bl.add_argument("--seed", type=int, default=0)
    bl.add_argument("--curve-points", type=int, default=8, help="stage-2 curve: evaluations")
    bl.add_argument("--clip", action="append", default=[], metavar="FIELD=VALUE",
                    help="a world CLIP setting (world.models.ClipSpec), e.g. --clip steps=3000 "
                         "--clip shape_group=8; repeatable")
    bl.add_argument("--lm", action="append", default=[], metavar="FIELD=VALUE",
                    help="a world LM setting (world.models.LMSpec), e.g. --lm steps=2000; repeatable")
    bl.add_argument("--cache", default=None, help="trained-model cache (default $SEA_CACHE/world)")
    bl.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu | cuda")
    demo = sub.add_parser("demo", help="the world's short version: labels and stage 1, lambda 0 and 1")
    demo.add_argument("--out", default="demo_out")
    sc = sub.add_parser("scenes", help="only write scenes with ground truth")
    sc.add_argument("--out", required=True)
    sc.add_argument("-n", type=int, default=100)
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--image-size", type=int, default=64)
    sc.add_argument("--patch-size", type=int, default=8)
    args = ap.parse_args(argv)
    _quiet()
    if args.cmd == "scenes":
        from world.scenes import make_world

        g = args.image_size // args.patch_size
        print(make_world(args.out, args.n, args.seed, args.image_size, (g, g)))
        return 0
    if args.cmd == "baseline":
        from world.baseline import run_baseline

        res = run_baseline(args.out, args.stage1_epochs, args.stage2_epochs, args.stage2_lr,
                           args.global_batch, args.seed, args.curve_points, preset=args.preset,
                           clip=args.clip, cache=args.cache, device=args.device,
                           lm=args.lm)
        print(json.dumps({k: res[k] for k in res if k != "curve"}, indent=1))
        return 0
    if args.cmd == "demo":
        from world.demo import run_demo

        return run_demo(args.out)
    from world import report

    if args.cmd == "report":
        res = json.loads((Path(args.out) / "results.json").read_text())
        test_dir = Path(res["world"]["ground_truth"]).parent
        report.figures(res, Path(args.out), test_dir, test_dir.parent)
        cmd = args.command
    else:
        from world.evidence import run_evidence

        preset = "quick" if args.quick else args.preset
        res = run_evidence(preset, args.out, args.work, args.cache, device=args.device)
        cmd = "make evidence" + (" QUICK=1" if preset == "quick" else "") if preset in ("full", "quick") \
            else f"python -m world evidence --preset {preset}"
    md = Path(args.md)
    rel = os.path.relpath(Path(args.out).resolve(), md.resolve().parent)
    md.write_text(report.markdown(res, cmd, rel))
    print(f"wrote {md}, {args.out}/results.json and figures", file=sys.stderr)
    return 0


def _quiet() -> None:
    """transformers' per-load progress bars say nothing here."""
    try:
        from transformers.utils import logging

        logging.disable_progress_bar()
        logging.set_verbosity_error()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
