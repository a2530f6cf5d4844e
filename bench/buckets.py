"""Issue 35's figures: extraction reading from and writing to a local S3 endpoint against
local disk, and the trainer's start-up for 1x and 10x the label shards.

The S3 endpoint is moto's server mode on 127.0.0.1 (tests/s3server.py, as in the tests; the
bench starts its own and stops it): it measures our storage path (requests, uploads, read-back), not a
cloud's network, which is said beside the figure.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from s3server import moto_endpoint  # noqa: E402  (test-only: moto is a dev extra)


def _upload(client, bucket: str, prefix: str, folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            client.upload_file(str(p), bucket, f"{prefix}/{p.relative_to(folder).as_posix()}")


def bench_s3_extraction(work: Path, spec: str, js: Path, root: Path, rounds: int, res: dict,
                        make_cfg, chunk: int, stat) -> None:
    """The in-process runner from scratch, images and JSON on local disk and labels to local
    disk, against images, JSON and labels in the bucket; interleaved, the order alternating
    per round; steady state as in the Ray figure (images after the first shard over the time
    from the first shard to the last). Ratio per round, median over rounds."""
    import boto3

    from pipeline.extract import run_local

    with moto_endpoint() as url:
        client = boto3.client("s3", endpoint_url=url)
        client.create_bucket(Bucket="bench")
        _upload(client, "bench", "data/images", root)
        client.upload_file(str(js), "bench", "data/bench.json")

        def local():
            shutil.rmtree(work / "out-local", ignore_errors=True)
            return run_local(make_cfg(spec, js, root, work / "out-local", work / "text-cache",
                                      f"run.chunk_size={chunk}"))

        fresh = itertools.count()  # a fresh output prefix each round

        def s3():
            return run_local(make_cfg(spec, "s3://bench/data/bench.json", "s3://bench/data/images",
                                      f"s3://bench/labels/{next(fresh)}", work / "text-cache",
                                      f"run.chunk_size={chunk}"))

        rows = []
        for r in range(rounds):
            order = [("local", local), ("s3", s3)]
            rows.append(dict((k, f()) for k, f in (order if r % 2 == 0 else order[::-1])))
    ratios = [x["s3"]["steady_images_per_second"] / x["local"]["steady_images_per_second"]
              for x in rows]
    res.setdefault("extraction", {}).update({
        "s3_img_s": stat([x["s3"]["steady_images_per_second"] for x in rows]),
        "local_disk_img_s": stat([x["local"]["steady_images_per_second"] for x in rows]),
        "s3_over_local_per_round": stat(ratios),
        "s3_over_local": statistics.median(ratios),
        "s3_first_shard_s": stat([x["s3"]["first_shard_seconds"] for x in rows]),
        "s3_endpoint": "moto server mode on 127.0.0.1 (no network latency)",
    })


def _label_set(work: Path, real: Path, rows: int, per_shard: int, image: Path) -> tuple[Path, Path]:
    """A synthetic label run of ``rows`` rows (random labels, the real run's metadata) with a
    matching pretraining JSON and image paths hard-linked to one image."""
    from pipeline import shards
    from pipeline.shards import LabelBatch, ShardWriter

    meta = shards.read_manifest(real)["metadata"]
    out, imgs = work / f"labels-{rows}", work / f"images-{rows}"
    out.mkdir(parents=True)
    imgs.mkdir(parents=True)
    gh, gw = meta["grid"]
    n = meta["top_n"]
    rng = np.random.default_rng(0)
    items = []
    for s in range(rows // per_shard):
        w = ShardWriter(out / shards.shard_name(s), meta, row_group_size=64)
        paths = [f"{s * per_shard + i:07d}.jpg" for i in range(per_shard)]
        for p in paths:
            os.link(image, imgs / p)
            items.append({"id": p, "image": p, "conversations": [
                {"from": "human", "value": "<image>\nDescribe the image."},
                {"from": "gpt", "value": "a red square on a blue background"}]})
        ids = rng.integers(0, meta["wordlist_size"], (per_shard, gh * gw, n)).astype(np.uint16)
        w.write(LabelBatch(paths, paths, (gh, gw), ids, np.ones_like(ids, np.float16)))
        count = w.close()
        path = out / shards.shard_name(s)
        shards.write_json_atomic(out / shards.done_name(s), {
            "index": s, "rows": count, "bytes": path.stat().st_size,
            "sha256": shards.file_sha256(path), "row_groups": w.row_groups, "errors": 0,
            "error_list": [], "kept_labels": int(ids.size), "patches": per_shard * gh * gw})
    shards.write_manifest(out, "bench", meta, rows // per_shard)
    js = work / f"pretrain-{rows}.json"
    js.write_text(json.dumps(items))
    return out, js


def bench_startup(work: Path, rounds: int, res: dict, stat) -> None:
    """The trainer's start-up (``build``: config, models, data sources, to the first
    micro-batch in hand) on label sets of 2,000 and 20,000 rows (4 and 40 shards of 500),
    alternating; and its data part alone (``open_source``: manifest, JSON, join)."""
    from pipeline.extract import run_local
    from pipeline.tiny import save_tiny
    from trainer.sources import open_source
    from trainer.tiny import save_tiny_llm
    from trainer.train import build
    from wordlist import load_wordlist
    from world.sample import extract_config, make_sample, pretrain_config, sample_text

    spec = save_tiny("clip", work / "models" / "tiny-clip")
    make_sample(work / "sample", n=8)
    run_local(extract_config(work, spec))
    llm = save_tiny_llm(work / "models" / "tiny-llm", list(load_wordlist().words),
                        extra_text=sample_text())
    image = next((work / "sample" / "images").rglob("*.jpg"))
    sets = {k: _label_set(work, work / "shards", rows, 500, image)
            for k, rows in (("1x", 2000), ("10x", 20000))}

    def start(key):
        labels, js = sets[key]
        images = work / ("images-2000" if key == "1x" else "images-20000")
        cfg = pretrain_config(work, spec, llm, 1.0, f"data.shards={labels}", f"data.json={js}",
                              f"data.image_root={images}",
                              "data.num_workers=0", "data.holdout_images=0",
                              f"log.output={work / 'run' / key}", "log.overwrite=true")
        t0 = time.perf_counter()
        p = build(cfg, "pretrain")
        p.dataset.set_position(0, 0)
        next(iter(p.dataset))
        whole = time.perf_counter() - t0
        t0 = time.perf_counter()
        open_source(cfg.data, p.tokenizer, None, "plain")
        return whole, time.perf_counter() - t0

    times = {"1x": [], "10x": []}
    cold = {}
    for r in range(rounds + 1):
        for key in (("1x", "10x") if r % 2 == 0 else ("10x", "1x")):
            t = start(key)
            if r:
                times[key].append(t)
            else:  # round 0: each set's first start, which converts its JSON (once per node)
                cold[key] = t
    whole = [b[0] / a[0] for a, b in zip(times["1x"], times["10x"])]
    data = [b[1] / a[1] for a, b in zip(times["1x"], times["10x"])]
    res["trainer"] = {
        "startup_1x_s": stat([t[0] for t in times["1x"]]),
        "startup_10x_s": stat([t[0] for t in times["10x"]]),
        "startup_10x_over_1x": statistics.median(whole),
        "startup_10x_over_1x_per_round": stat(whole),
        "data_setup_1x_s": stat([t[1] for t in times["1x"]]),
        "data_setup_10x_s": stat([t[1] for t in times["10x"]]),
        "data_setup_10x_over_1x": statistics.median(data),
        # 1x's first start also pays the process's first imports and model loads (it runs
        # first); 10x's is the conversion of its 20,000-row JSON plus a warm build
        "first_start_10x_s": cold["10x"][0],
        "rows": {"1x": 2000, "10x": 20000}, "shards": {"1x": 4, "10x": 40},
    }
