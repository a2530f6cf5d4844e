"""Command line: ``python -m trainer {pretrain,finetune,eval-align,generate,export,report,plot,
tiny-llm}`` (also ``sea-trainer``). Multi-process: ``torchrun --nproc-per-node N -m trainer
finetune ...``. Config commands take ``--config FILE``, ``key.sub=value`` overrides,
``--print-config`` and ``--help-config``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from seacore import cli

CONFIG_COMMANDS = ("pretrain", "finetune", "eval-align")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in [("pretrain", "stage 1: adapter only, L = L_g + lambda * L_a"),
                        ("finetune", "stage 2: LLM + adapter (+ vision) on instruction data"),
                        ("eval-align", "token-level alignment of a run's held-out images")]:
        s = sub.add_parser(name, help=help_)
        if name == "eval-align":
            s.add_argument("--checkpoint", required=True,
                           help="a run dir (its latest checkpoint), a checkpoint dir, or 'latest' "
                                "(in log.output); the run's own saved config is used unless "
                                "--config is given")
            s.add_argument("--stage", default=None, choices=["pretrain", "finetune"],
                           help="default: the checkpoint's own")
        cli.add_config_args(s)
    g = sub.add_parser("generate", help="answer a prompt about an image with a trained model")
    g.add_argument("--checkpoint", required=True, help="a run dir or its final/ folder")
    g.add_argument("--image", help="image file (omit for a text-only prompt)")
    g.add_argument("--prompt", default=None,
                   help="stage-2 models: the question (default 'Describe the image.'); stage-1 "
                        "models caption the image and take no prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--device", default="auto")
    e = sub.add_parser("export", help="write a trained run for transformers (hf-llava) or the "
                                      "LLaVA codebase (llava)")
    e.add_argument("--run", required=True, help="a run dir or its final/ folder")
    e.add_argument("--format", required=True, choices=["hf-llava", "llava"])
    e.add_argument("--out", required=True, help="folder to write (must not hold files)")
    r = sub.add_parser("report", help="alignment maps (Figure 1): each visual token's nearest word "
                                      "beside its labels, runs side by side, as HTML")
    r.add_argument("--runs", nargs="+", required=True, help="training runs (or their final/)")
    r.add_argument("--shards", required=True, help="label run whose first images are shown")
    r.add_argument("--out", required=True, help="folder for alignment.html")
    r.add_argument("--images", type=int, default=16)
    r.add_argument("--names", nargs="*", default=None, help="column names (default: folder names)")
    r.add_argument("--image-root", default=None, help="default: the label run's image root")
    r.add_argument("--wordlist", default=None,
                   help="the label run's word list (default: found by its hash, the run's own "
                        "copy first), as pipeline show / stats / gallery take it")
    pl = sub.add_parser("plot", help="loss, L_a, temperature, lr and eval-align curves of runs")
    pl.add_argument("runs", nargs="+")
    pl.add_argument("--out", default="curves.png")
    t = sub.add_parser("tiny-llm", help="save a tiny random Llama + offline-trained tokenizer")
    t.add_argument("out")
    return p


def _config_class(stage: str):
    from trainer.config import FinetuneConfig, PretrainConfig

    return PretrainConfig if stage == "pretrain" else FinetuneConfig


def _eval_target(args) -> tuple[Path | None, dict | None, str]:
    """eval-align's checkpoint (None for 'latest': found after the config), the run's saved
    config, and its stage."""
    from trainer import checkpoint

    if args.checkpoint == "latest":
        return None, None, args.stage or "pretrain"
    path = Path(args.checkpoint)
    if not checkpoint.is_complete(path):
        found = checkpoint.latest(path)
        if found is None:
            raise FileNotFoundError(f"--checkpoint {path}: neither a complete checkpoint nor a run "
                                    f"dir holding one")
        path = found
    saved = json.loads((path / "config.json").read_text())
    stage = args.stage or json.loads((path / "state.json").read_text()).get("stage", "pretrain")
    return path, saved, stage


def _simple(args) -> int:
    """The commands without a typed config."""
    if args.cmd == "tiny-llm":
        from trainer.tiny import save_tiny_llm
        from wordlist import load_wordlist

        print(save_tiny_llm(args.out, list(load_wordlist().words)))
        return 0
    try:
        if args.cmd == "plot":
            from trainer.report import plot_runs

            print(plot_runs(args.runs, args.out))
        elif args.cmd == "report":
            from trainer.report import alignment_page

            summary = alignment_page(args.runs, args.shards, args.out, args.images,
                                     args.image_root, args.names, wordlist=args.wordlist)
            print(json.dumps(summary, indent=1))
            print(f"wrote {args.out}/alignment.html")
        elif args.cmd == "export":
            from trainer.export import export

            print(json.dumps(export(args.run, args.format, args.out), indent=1))
        elif args.cmd == "generate":
            from pipeline.data import MAX_PIXELS, BadImage, load_rgb
            from seacore.device import pick_device
            from trainer.final import load_final
            from trainer.generate import answer

            if args.image is not None:  # before the model loads: a wrong path fails at once
                try:
                    load_rgb(Path(args.image), MAX_PIXELS)
                except BadImage as e:
                    raise ValueError(f"--image {args.image}: {e}; give an image file") from None
            model = load_final(args.checkpoint, pick_device(args.device, key="--device"))
            if model[3]["stage"] == "pretrain" and args.prompt is not None:
                print("note: a stage-1 model captions the image (LLaVA's plain format); "
                      "--prompt is not used", file=sys.stderr)
            print(answer(*model, args.image, args.prompt or "Describe the image.",
                         args.max_new_tokens))
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    from seacore.config import ConfigError, describe, load_config
    from trainer.config import LLAVA_FLAGS

    parser = _parser()
    args = cli.parse(parser, argv,
                     lambda a: _config_class("pretrain" if a.cmd == "eval-align" else a.cmd)
                     if a.cmd in CONFIG_COMMANDS else None, LLAVA_FLAGS)
    if args.cmd not in CONFIG_COMMANDS:
        return _simple(args)
    from pipeline.encoders import WeightsNotFound
    from pipeline.shards import ShardMismatch
    from trainer import distributed
    from trainer.checkpoint import CheckpointError
    from trainer.llm import LLMNotFound

    errors = (ConfigError, WeightsNotFound, LLMNotFound, ShardMismatch, CheckpointError,
              FileNotFoundError, ValueError)
    try:
        path, saved, stage = (_eval_target(args) if args.cmd == "eval-align"
                              else (None, None, args.cmd))
        cls = _config_class(stage)
        cfg = load_config(cls, args.config, args.overrides, base=None if args.config else saved)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.help_config:
        print("\n".join(describe(cls, cfg)))
        return 0
    if args.print_config:
        cli.print_config(cfg)
        return 0
    from pipeline.lock import FolderLocked
    from trainer.faults import Preempted
    from trainer.train import build, eval_alignment, train

    errors = (*errors, FolderLocked)
    try:
        if args.cmd != "eval-align":
            result = train(cfg, stage)
            result.pop("losses", None)
        else:
            from trainer import checkpoint
            from trainer.manager import load_weights

            parts = build(cfg, stage)
            if path is None:
                path = checkpoint.latest(cfg.log.output)
                if path is None:
                    raise FileNotFoundError(f"no complete checkpoint under {cfg.log.output}")
            load_weights(parts.task, path)
            result = {"checkpoint": str(path), "stage": stage, "align": eval_alignment(parts)}
    except Preempted as e:  # 128 + the signal, as a process the signal had ended
        if distributed.from_env().is_main():
            print(f"preempted: {e}", file=sys.stderr)
        return 128 + e.signum
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        return cli.exit_if_disk_full(e, cfg.log.output, "log.output")
    except RuntimeError as e:
        if not distributed.from_env().enabled:
            raise
        print(f"error: {distributed.explain(e)}", file=sys.stderr)  # which rank, and why
        return 1
    finally:
        distributed.close()
    if distributed.from_env().is_main():
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
