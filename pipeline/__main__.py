"""Command line: ``python -m pipeline {extract,submit,ray-up,ray-down,tiny} ...`` (also ``sea-pipeline``)."""

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
    for name, text in (("ray-up", "start a single-machine Ray head of our own (own process group)"),
                       ("ray-down", "stop the head ray-up started, and nothing else")):
        r = sub.add_parser(name, help=text)
        r.add_argument("--temp-dir", default=".ray-head", help="the head's Ray temp dir and state")
        if name == "ray-up":
            r.add_argument("--port", type=int, default=6379, help="GCS port")
            r.add_argument("--dashboard-port", type=int, default=8265)
            r.add_argument("--num-cpus", type=int, default=None)
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
    if args.cmd == "ray-up":
        from pipeline.rayhead import start_head

        try:
            state = start_head(args.temp_dir, args.port, args.dashboard_port, args.num_cpus)
        except RuntimeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"Ray head up: dashboard {state['dashboard']}, GCS 127.0.0.1:{state['port']}, "
              f"process group {state['pgid']}; submit with RAY_ADDRESS={state['dashboard']}")
        return 0
    if args.cmd == "ray-down":
        from pipeline.rayhead import stop_head

        n = stop_head(args.temp_dir)
        print(f"stopped {n} processes of the head from {args.temp_dir}" if n else
              f"no head from {args.temp_dir} was running")
        return 0
    if args.cmd == "tiny":
        from pipeline.tiny import save_tiny

        print(save_tiny(args.kind, args.out, args.seed))
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
