"""Command line: ``python -m trainer {pretrain,finetune,eval-align,generate,tiny-llm}``
(also ``sea-trainer``). Multi-process: ``torchrun --nproc-per-node N -m trainer finetune ...``."""

from __future__ import annotations

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in [("pretrain", "stage 1: adapter only, L = L_g + lambda * L_a"),
                        ("finetune", "stage 2: LLM + adapter (+ vision) on instruction data"),
                        ("eval-align", "token-level alignment of a run's held-out images")]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", help="YAML config (configs/pretrain.yaml, configs/finetune.yaml)")
        s.add_argument("--help-config", action="store_true", help="list every config key")
        if name == "eval-align":
            s.add_argument("--checkpoint", required=True, help="checkpoint dir, or 'latest'")
            s.add_argument("--stage", default="pretrain", choices=["pretrain", "finetune"])
        s.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    g = sub.add_parser("generate", help="answer a prompt about an image with a trained model")
    g.add_argument("--checkpoint", required=True, help="a run dir or its final/ folder")
    g.add_argument("--image", help="image file (omit for a text-only prompt)")
    g.add_argument("--prompt", default="Describe the image.")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--device", default="auto")
    r = sub.add_parser("report", help="alignment maps (Figure 1): each visual token's nearest word "
                                      "beside its labels, runs side by side, as HTML")
    r.add_argument("--runs", nargs="+", required=True, help="training runs (or their final/)")
    r.add_argument("--shards", required=True, help="label run whose first images are shown")
    r.add_argument("--out", required=True, help="folder for alignment.html")
    r.add_argument("--images", type=int, default=16)
    r.add_argument("--names", nargs="*", default=None, help="column names (default: folder names)")
    r.add_argument("--image-root", default=None, help="default: the label run's image root")
    pl = sub.add_parser("plot", help="loss, L_a, temperature, lr and eval-align curves of runs")
    pl.add_argument("runs", nargs="+")
    pl.add_argument("--out", default="curves.png")
    t = sub.add_parser("tiny-llm", help="save a tiny random Llama + offline-trained tokenizer")
    t.add_argument("out")
    return p


def main(argv: list[str] | None = None) -> int:
    from seacore.config import ConfigError, describe, load_config
    from trainer.config import FinetuneConfig, PretrainConfig

    args = _parser().parse_args(argv)
    if args.cmd == "tiny-llm":
        from trainer.tiny import save_tiny_llm
        from wordlist import load_wordlist

        print(save_tiny_llm(args.out, list(load_wordlist().words)))
        return 0
    if args.cmd in ("report", "plot"):
        from trainer.report import alignment_page, plot_runs

        try:
            if args.cmd == "plot":
                print(plot_runs(args.runs, args.out))
                return 0
            summary = alignment_page(args.runs, args.shards, args.out, args.images, args.image_root,
                                     args.names)
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps(summary, indent=1))
        print(f"wrote {args.out}/alignment.html")
        return 0
    if args.cmd == "generate":
        import torch

        from trainer.generate import answer, load_final

        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        model = load_final(args.checkpoint, device)
        print(answer(*model, args.image, args.prompt, args.max_new_tokens))
        return 0
    stage = args.stage if args.cmd == "eval-align" else args.cmd
    cls = PretrainConfig if stage == "pretrain" else FinetuneConfig
    if args.help_config:
        print("\n".join(describe(cls)))
        return 0
    from pipeline.encoders import WeightsNotFound
    from pipeline.shards import ShardMismatch
    from trainer import distributed
    from trainer.checkpoint import CheckpointError
    from trainer.train import LLMNotFound, build, eval_alignment, train

    try:
        cfg = load_config(cls, args.config, args.overrides)
        if args.cmd != "eval-align":
            result = train(cfg, stage)
            result.pop("losses", None)
        else:
            from trainer import checkpoint

            parts = build(cfg, stage)
            path = checkpoint.latest(cfg.log.output) if args.checkpoint == "latest" else args.checkpoint
            if path is None:
                raise FileNotFoundError(f"no complete checkpoint under {cfg.log.output}")
            weights, _ = checkpoint.load(path)
            parts.task.load_state_dict(weights, strict=False)
            result = {"checkpoint": str(path), "align": eval_alignment(parts)}
    except (ConfigError, WeightsNotFound, LLMNotFound, ShardMismatch, CheckpointError,
            FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.close()
    if distributed.from_env().is_main():
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
