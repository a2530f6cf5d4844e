"""``make demo``: a sample set, a tiny random CLIP, labels against the full 2of12 list."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import ExtractConfig, load_config


def demo_config(out: Path, spec: str) -> ExtractConfig:
    return load_config(ExtractConfig, None, [
        f"encoder.model={spec}", "encoder.pretrained=null",
        f"input.json={out / 'sample' / 'sample.json'}",
        f"input.image_root={out / 'sample' / 'images'}",
        f"run.output={out / 'shards'}", "run.chunk_size=16", "run.batch_size=16",
        f"labels.text_cache_dir={out / 'cache'}", "run.overwrite=true",
    ])


def run_demo(out_dir: str, n_images: int = 48) -> int:
    from pipeline.demo import make_sample
    from pipeline.extract import run_local
    from pipeline.tiny import save_tiny

    out = Path(out_dir).resolve()
    spec = save_tiny("clip", out / "models" / "tiny-clip")
    make_sample(out / "sample", n=n_images)
    cfg = demo_config(out, spec)
    summary = run_local(cfg)
    _print_labels_summary(summary, out)
    if not summary["complete"]:
        return 1
    _train_demo(out, spec)
    return 0


def pretrain_demo_config(out: Path, spec: str, llm: str, weight: float, *extra: str):
    from trainer.config import PretrainConfig

    return load_config(PretrainConfig, None, [
        f"vision.model={spec}", "vision.pretrained=null", f"llm.path={llm}",
        f"data.json={out / 'sample' / 'sample.json'}", f"data.image_root={out / 'sample' / 'images'}",
        f"data.shards={out / 'shards'}", "data.holdout_images=8", "data.num_workers=0",
        "optim.global_batch_size=8", "optim.micro_batch_size=4", "optim.epochs=20",
        "optim.lr=1e-2", "log.eval_every=0", "log.save_every=1000", f"sea.weight={weight}",
        f"log.output={out / 'runs' / f'pretrain-lambda{weight:g}'}", "log.progress=false",
        *extra,
    ])


def _train_demo(out: Path, spec: str) -> None:
    """Stage 1 on the sample with a tiny LLM, lambda = 0 (plain LLaVA) and 1 (SEA), same seed."""
    import shutil

    from trainer.tiny import save_tiny_llm
    from trainer.train import train
    from wordlist import load_wordlist

    llm = save_tiny_llm(out / "models" / "tiny-llm", list(load_wordlist().words))
    results = {}
    for weight in (0.0, 1.0):
        cfg = pretrain_demo_config(out, spec, llm, weight)
        shutil.rmtree(cfg.log.output, ignore_errors=True)
        results[weight] = train(cfg, "pretrain")
    print("\n== SEA demo: stage-1 pretraining (tiny Llama, 20 epochs, 8 held-out images) ==")
    print(f"{'':22}{'top-1 match':>12}{'in labels':>12}{'cos(top-1)':>12}")
    for weight, r in results.items():
        a = r["align"]
        name = "lambda=0 (LLaVA)" if weight == 0 else "lambda=1 (SEA)"
        print(f"{name:22}{a['top1_match']:>12.4f}{a['in_labels']:>12.4f}{a['mean_cos_top1']:>12.4f}")
    print(f"runs                  {out / 'runs'} (metrics.jsonl, checkpoints/, final/ with adapter.safetensors)")
    (out / "train_summary.json").write_text(json.dumps(
        {str(k): v for k, v in results.items()}, indent=2, default=str))


def _print_labels_summary(s: dict, out: Path) -> None:
    print("\n== SEA demo: labels ==")
    print(f"images labelled        {s['images_labelled']} of {s['images_in_input']} "
          f"({s['images_failed']} failed)")
    print(f"patches per image      {s['patches_per_image']} (grid {s['grid'][0]}x{s['grid'][1]})")
    print(f"kept labels per patch  {s['kept_labels_per_patch']:.2f} of {s['top_n']}")
    print(f"bytes per image        {s['bytes_per_image']} on disk (zstd Parquet)")
    print(f"images per second      {s['images_per_second']} (encode {s['encode_seconds']} s, "
          f"search {s['search_seconds']} s, word list {s['text_seconds']} s, "
          f"cache {'hit' if s['text_cache_hit'] else 'miss'})")
    print(f"output                 {s['output']} (manifest.json, errors.jsonl)")
    (out / "labels_summary.json").write_text(json.dumps(s, indent=2))
