"""Command line: ``python -m pipeline {extract,demo,tiny} ...`` (also ``sea-pipeline``)."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.config import ConfigError, ExtractConfig, describe, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("extract", help="label every image's patches; write shards")
    ex.add_argument("--config", help="YAML config (see configs/extract.yaml)")
    ex.add_argument("--help-config", action="store_true", help="list every config key")
    ex.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    sm = sub.add_parser("submit", help="ray job submit the extraction to a cluster")
    sm.add_argument("--address", default=None, help="Ray dashboard address (default $RAY_ADDRESS)")
    sm.add_argument("--config", help="YAML config inside the repository")
    sm.add_argument("--no-wait", action="store_true", help="return once submitted")
    sm.add_argument("--python", default="python", help="python on the cluster nodes")
    sm.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    demo = sub.add_parser("demo", help="sample set + tiny model + labels, with a summary")
    demo.add_argument("--out", default="demo_out", help="where the demo writes everything")
    demo.add_argument("--images", type=int, default=48)
    tiny = sub.add_parser("tiny", help="save a tiny random encoder as an open_clip local dir")
    tiny.add_argument("kind", choices=["clip", "siglip", "vitb16"])
    tiny.add_argument("out")
    tiny.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "extract":
        if args.help_config:
            print("\n".join(describe(ExtractConfig)))
            return 0
        from pipeline.data import InputError
        from pipeline.encoders import WeightsNotFound
        from pipeline.extract import RunMismatch, run_problem
        from pipeline.lock import FolderLocked
        from pipeline.ray_runner import RayUnreachable
        from pipeline.runner import run
        from pipeline.stages import DeviceUnavailable

        try:
            cfg = load_config(ExtractConfig, args.config, args.overrides)
            summary = run(cfg)
        except (ConfigError, WeightsNotFound, RunMismatch, InputError, FolderLocked,
                RayUnreachable, DeviceUnavailable, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(summary, indent=2))
        problem = run_problem(summary, cfg.run.max_error_rate)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 1
        return 0 if summary["complete"] else 1
    if args.cmd == "submit":
        import os

        from pipeline.submit import submit

        address = args.address or os.environ.get("RAY_ADDRESS")
        if not address:
            print("error: give --address or set RAY_ADDRESS (e.g. http://127.0.0.1:8265)",
                  file=sys.stderr)
            return 2
        return submit(address, args.config, args.overrides, not args.no_wait, args.python)
    if args.cmd == "demo":
        from pipeline.demo_run import run_demo

        return run_demo(args.out, args.images)
    if args.cmd == "tiny":
        from pipeline.tiny import save_tiny

        print(save_tiny(args.kind, args.out, args.seed))
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
