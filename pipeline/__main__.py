"""Command line: ``python -m pipeline {extract,submit,show,stats,gallery,ray-up,ray-down,tiny} ...`` (also ``sea-pipeline``)."""

from __future__ import annotations

import argparse
import json
import sys

from pipeline.config import ExtractConfig
from seacore import cli
from seacore.config import ConfigError, describe, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    ex = sub.add_parser("extract", help="label every image's patches; write shards")
    cli.add_config_args(ex)
    sm = sub.add_parser("submit", help="ray job submit the extraction to a cluster")
    sm.add_argument("--address", default=None, help="Ray dashboard address (default $RAY_ADDRESS)")
    sm.add_argument("--no-wait", action="store_true", help="return once submitted")
    sm.add_argument("--python", default="python", help="python on the cluster nodes")
    cli.add_config_args(sm)  # --config: a YAML file inside the repository
    for name, text in (("ray-up", "start a single-machine Ray head of our own (own process group)"),
                       ("ray-down", "stop the head ray-up started, and nothing else")):
        r = sub.add_parser(name, help=text)
        r.add_argument("--temp-dir", default=".ray-head", help="the head's Ray temp dir and state")
        if name == "ray-up":
            r.add_argument("--port", type=int, default=6379, help="GCS port")
            r.add_argument("--dashboard-port", type=int, default=8265)
            r.add_argument("--num-cpus", type=int, default=None)
    sh = sub.add_parser("show", help="one image's labels: the grid of top-1 words, or a patch's words")
    sh.add_argument("--shards", required=True, help="label run folder")
    sh.add_argument("--image", required=True, help="image path (relative to the image root) or id")
    sh.add_argument("--patch", default=None, help="ROW,COL: that patch's kept words and scores")
    sh.add_argument("--wordlist", default=None, help="the run's word list (default: found by hash)")
    st = sub.add_parser("stats", help="label statistics (JSON and PNG plots), streamed")
    st.add_argument("--shards", required=True, help="label run folder")
    st.add_argument("--out", default=None, help="folder for stats.json and plots (default: print only)")
    st.add_argument("--wordlist", default=None, help="the run's word list (default: found by hash)")
    ga = sub.add_parser("gallery", help="a static, self-contained HTML gallery of the labels")
    ga.add_argument("--shards", required=True, help="label run folder")
    ga.add_argument("--out", required=True, help="folder for index.html and page-N.html")
    ga.add_argument("--limit", type=int, default=None, help="only the first N images")
    ga.add_argument("--page-size", type=int, default=48, help="images per page")
    ga.add_argument("--image-root", default=None, help="default: the run's input.image_root")
    ga.add_argument("--wordlist", default=None, help="the run's word list (default: found by hash)")
    tiny = sub.add_parser("tiny", help="save a tiny random encoder as an open_clip local dir")
    tiny.add_argument("kind", choices=["clip", "vitb16"])
    tiny.add_argument("out")
    tiny.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = cli.parse(parser, argv, lambda a: ExtractConfig if a.cmd in ("extract", "submit")
                     else None)
    if args.cmd in ("extract", "submit") and (args.help_config or args.print_config):
        try:
            cfg = load_config(ExtractConfig, args.config, args.overrides)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.help_config:
            print("\n".join(describe(ExtractConfig, cfg)))
        else:
            cli.print_config(cfg)
        return 0
    if args.cmd == "extract":
        from pipeline.data import InputError
        from pipeline.encoders import WeightsNotFound
        from pipeline.extract import RunMismatch, run_problem
        from pipeline.lock import FolderLocked
        from pipeline.ray_runner import RayUnreachable
        from pipeline.runner import run
        from seacore.device import DeviceUnavailable

        try:
            cfg = load_config(ExtractConfig, args.config, args.overrides)
            summary = run(cfg)
        except (ConfigError, WeightsNotFound, RunMismatch, InputError, FolderLocked,
                RayUnreachable, DeviceUnavailable, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except OSError as e:
            return cli.exit_if_disk_full(e, cfg.run.output, "run.output")
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
    if args.cmd == "gallery":
        from pipeline.gallery import build_gallery
        from pipeline.shards import ShardMismatch
        from wordlist import WordListError

        try:
            pages = build_gallery(args.shards, args.out, args.image_root, args.limit,
                                  args.page_size, wordlist=args.wordlist)
        except (FileNotFoundError, WordListError, ShardMismatch, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {len(pages)} page(s): {pages[0]}")
        return 0
    if args.cmd in ("show", "stats"):
        return _inspect(args)
    if args.cmd == "tiny":
        from pipeline.tiny import save_tiny

        print(save_tiny(args.kind, args.out, args.seed))
        return 0
    return 2


def _inspect(args) -> int:
    from pipeline.labelset import LabelSet, plot_statistics, statistics
    from pipeline.shards import ShardMismatch
    from wordlist import WordListError

    try:
        ls = LabelSet(args.shards, args.wordlist)
        if args.cmd == "stats":
            st = statistics(ls)
            if st["images"] == 0:
                print(f"error: {args.shards} holds no labelled image", file=sys.stderr)
                return 1
            if args.out:
                from pathlib import Path

                Path(args.out).mkdir(parents=True, exist_ok=True)
                (Path(args.out) / "stats.json").write_text(json.dumps(st, indent=1))
                plot_statistics(st, args.out)
            brief = {k: v for k, v in st.items() if k not in ("score", "top_words")}
            brief["top_words"] = [f"{w['word']} {w['share_of_labels']:.3f}" for w in st["top_words"][:10]]
            brief["score"] = {k: st["score"][k] for k in ("min", "max", "mean")}
            print(json.dumps(brief, indent=1))
            return 0
        img = ls.image(args.image)
    except (FileNotFoundError, KeyError, WordListError, ShardMismatch) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.patch:
        try:
            r, c = (int(x) for x in args.patch.split(","))
        except ValueError:
            print(f"error: --patch {args.patch}: give ROW,COL, two integers (e.g. --patch 3,5)",
                  file=sys.stderr)
            return 2
        if not (0 <= r < img.grid[0] and 0 <= c < img.grid[1]):
            print(f"error: --patch {args.patch} is outside the {img.grid[0]}x{img.grid[1]} grid: "
                  f"ROW in 0..{img.grid[0] - 1}, COL in 0..{img.grid[1] - 1}", file=sys.stderr)
            return 2
        print(f"{img.path} (id {img.image_id}), patch {r},{c} of {img.grid[0]}x{img.grid[1]}:")
        for w, s in img.patch(r, c):
            print(f"  {w:24} {s:+.4f}")
        return 0
    grid = img.top1_grid()
    width = max(len(w) for row in grid for w in row)
    print(f"{img.path} (id {img.image_id}): top-1 word per patch, {img.grid[0]}x{img.grid[1]}")
    for row in grid:
        print(" ".join(w.ljust(width) for w in row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
