"""Command line: ``python -m trainer {pretrain,eval-align,tiny-llm} ...`` (also ``sea-trainer``)."""

from __future__ import annotations

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, help_ in [("pretrain", "stage 1: adapter only, L = L_g + lambda * L_a"),
                        ("eval-align", "token-level alignment of a run's held-out images")]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", help="YAML config (see configs/pretrain.yaml)")
        s.add_argument("--help-config", action="store_true", help="list every config key")
        if name == "eval-align":
            s.add_argument("--checkpoint", required=True, help="checkpoint dir, or 'latest'")
        s.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    t = sub.add_parser("tiny-llm", help="save a tiny random Llama + offline-trained tokenizer")
    t.add_argument("out")
    return p


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import ConfigError, describe, load_config
    from trainer.config import PretrainConfig

    args = _parser().parse_args(argv)
    if args.cmd == "tiny-llm":
        from trainer.tiny import save_tiny_llm
        from wordlist import load_wordlist

        print(save_tiny_llm(args.out, list(load_wordlist().words)))
        return 0
    if args.help_config:
        print("\n".join(describe(PretrainConfig)))
        return 0
    from pipeline.encoders import WeightsNotFound
    from pipeline.shards import ShardMismatch
    from trainer import distributed
    from trainer.train import LLMNotFound, build, eval_alignment, train

    try:
        cfg = load_config(PretrainConfig, args.config, args.overrides)
        if args.cmd == "pretrain":
            result = train(cfg, "pretrain")
        else:
            from trainer import checkpoint

            parts = build(cfg, "pretrain")
            path = checkpoint.latest(cfg.log.output) if args.checkpoint == "latest" else args.checkpoint
            if path is None:
                raise FileNotFoundError(f"no complete checkpoint under {cfg.log.output}")
            checkpoint.load(path, parts.task)
            result = {"checkpoint": str(path), "align": eval_alignment(parts)}
    except (ConfigError, WeightsNotFound, LLMNotFound, ShardMismatch, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.close()
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
