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
    return 0 if summary["complete"] else 1


def _print_labels_summary(s: dict, out: Path) -> None:
    from pipeline import shards
    from pipeline.stages import kept_per_patch

    kept = []
    for rb in shards.iter_label_set(s["output"]):
        _, ids, _ = shards.batch_arrays(rb, s["top_n"])
        kept.append(kept_per_patch(ids))
    print("\n== SEA demo: labels ==")
    print(f"images labelled        {s['images_labelled']} of {s['images_in_input']} "
          f"({s['images_failed']} failed)")
    print(f"patches per image      {s['patches_per_image']} (grid {s['grid'][0]}x{s['grid'][1]})")
    print(f"kept labels per patch  {sum(kept) / max(len(kept), 1):.2f} of {s['top_n']}")
    print(f"bytes per image        {s['bytes_per_image']} on disk (zstd Parquet)")
    print(f"images per second      {s['images_per_second']} (encode {s['encode_seconds']} s, "
          f"search {s['search_seconds']} s, word list {s['text_seconds']} s, "
          f"cache {'hit' if s['text_cache_hit'] else 'miss'})")
    print(f"output                 {s['output']} (manifest.json, errors.jsonl)")
    (out / "labels_summary.json").write_text(json.dumps(s, indent=2))
