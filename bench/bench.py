"""``make bench``: label extraction against its bare-compute limit, storage, reading, SEA's
training overhead and memory. Writes BENCHMARKS.md and bench/results.json.

Every figure is the median of ``--repeats`` runs with its min and max. Configuration: a
ViT-B/16-shaped vision tower (random weights; speed does not depend on them), the full
2of12 list, n = 10, batch 16, fp32 on CPU (bf16 autocast where CUDA is present).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from buckets import bench_s3_extraction, bench_startup  # noqa: E402  (bench/ is not a package)
from fsdp import bench_fsdp  # noqa: E402


def stat(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def median_ci(values: list[float]) -> dict:
    """Median and its distribution-free 95 % interval (order statistics n/2 -+ 0.98 sqrt(n))."""
    v = sorted(values)
    n = len(v)
    half = 0.98 * math.sqrt(n)
    lo, hi = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half))
    return {"median": statistics.median(v), "ci95": [v[lo], v[hi]], "n": n}


def paired_steps(setups: dict, rounds: int) -> tuple[dict, dict]:
    """Step time of each setting, and each setting's ratio to the first (lambda = 0), paired.

    One round runs one optimizer step of every setting back to back, in an order rotated every
    round, with Python's garbage collector off during the steps; a setting's ratio is the
    median over rounds of its step time over the first setting's in the same round. Pairing
    within a round cancels the machine's drift, which on our shared 2-core machines moves a
    step by 10-30 % over seconds; the per-round medians of blocks of steps (the protocol
    before) left that drift in."""
    from trainer.train import train_step

    keys = list(setups)
    times: dict = {k: [] for k in keys}
    for r in range(rounds):
        order = keys[r % len(keys):] + keys[: r % len(keys)]
        gc.collect()
        gc.disable()
        try:
            for k in order:
                p, batches = setups[k]
                t0 = time.perf_counter()
                train_step(p, batches, 1)
                times[k].append(time.perf_counter() - t0)
        finally:
            gc.enable()
    base = times[keys[0]]
    ratios = {k: median_ci([a / b for a, b in zip(times[k], base, strict=True)]) for k in keys[1:]}
    return ratios, times


def machine() -> dict:
    import faiss
    import open_clip
    import pyarrow
    import ray
    import transformers

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "faiss": faiss.__version__, "open_clip": open_clip.__version__,
            "pyarrow": pyarrow.__version__, "ray": ray.__version__,
            "transformers": transformers.__version__}


def extract_cfg(spec, js, root, out, cache, *extra):
    from pipeline.config import ExtractConfig
    from seacore.config import load_config

    return load_config(ExtractConfig, None, [
        f"encoder.model={spec}", "encoder.pretrained=null", f"input.json={js}",
        f"input.image_root={root}", f"run.output={out}", "run.chunk_size=1000",
        "run.batch_size=16", f"labels.text_cache_dir={cache}", "run.overwrite=true",
        "run.progress=false", *extra])


BARE_IMAGES = 64  # the bare limit's pre-decoded tensors (its rate does not depend on the count)
CHUNK = 32  # images per shard in the bench: several shards, so steady state has a meaning


def pipeline_rounds(work: Path, spec: str, js: Path, root: Path, cache: Path, rounds: int,
                    bare, bare_images: int) -> dict:
    """The in-process and the Ray pipeline, each run from scratch (model loading, and for Ray
    its start, included) as a user runs them, interleaved with the bare limit in one round, in
    an order rotated every round, so that a slow minute of a shared machine hits all three
    alike. Figures per runner: steady state (images after the first shard over the time
    between the first shard and the last: start-up and the first chunk's warm-up excluded),
    time to first shard, and the whole run; ratios are taken within a round and summarised
    over rounds (median, min-max)."""
    from pipeline.extract import run_local
    from pipeline.ray_runner import run_ray

    def local():
        shutil.rmtree(work / "out", ignore_errors=True)  # a run finds done chunks and skips them
        return run_local(extract_cfg(spec, js, root, work / "out", cache, f"run.chunk_size={CHUNK}"))

    def ray_():
        shutil.rmtree(work / "out-ray", ignore_errors=True)
        return run_ray(extract_cfg(spec, js, root, work / "out-ray", cache, f"run.chunk_size={CHUNK}",
                                   "run.runner=ray"))

    def bare_rate():
        return bare_images / timed(bare, 1)[0]

    settings = {"bare": bare_rate, "local": local, "ray": ray_}
    rows = []
    for r in range(rounds):
        names = list(settings)
        names = names[r % 3:] + names[:r % 3]
        rows.append({k: settings[k]() for k in names})
    per_stage = ("startup_seconds", "first_shard_seconds", "encode_seconds", "search_seconds",
                 "decode_wait_seconds", "write_seconds", "seconds")
    out = {"chunk_size": CHUNK, "rounds": rounds, "bare_rate_per_round": [x["bare"] for x in rows]}
    for key, name in (("local", "in_process"), ("ray", "ray")):
        runs = [x[key] for x in rows]
        out[f"{name}_img_s"] = stat([x["steady_images_per_second"] for x in runs])
        out[f"{name}_whole_run_img_s"] = stat([x["images_processed_this_run"] / (x["startup_seconds"] + x["seconds"])
                                               for x in runs])
        out[f"{name}_first_shard_s"] = stat([x["first_shard_seconds"] for x in runs])
        out[f"{name}_stages"] = {k: stat([x[k] for x in runs]) for k in per_stage
                                 + ("ray_init_seconds", "actor_start_seconds") * (key == "ray")}
    for name, num, den in (("in_process_efficiency", "local", "bare"), ("ray_efficiency", "ray", "bare"),
                           ("ray_over_in_process", "ray", "local")):
        ratios = [(x[num]["steady_images_per_second"]) /
                  (x[den] if den == "bare" else x[den]["steady_images_per_second"]) for x in rows]
        out[f"{name}_per_round"] = stat(ratios)
        out[name] = statistics.median(ratios)
    out["bytes_per_image_196x10"] = rows[-1]["local"]["bytes_per_image"]
    return out


def bench_extraction(work: Path, spec: str, js: Path, root: Path, repeats: int, res: dict):
    from pipeline.extract import load_records
    from pipeline.stages import Decoder, Labeler

    cache = work / "text-cache"
    cfg = extract_cfg(spec, js, root, work / "out", cache)
    # 4. word-list encoding: first (cold cache) and cached
    t = time.perf_counter()
    lab = Labeler(cfg, progress=False)
    first = time.perf_counter() - t
    cached = timed(lambda: Labeler(cfg, progress=False), repeats)
    res["wordlist_encoding"] = {"first_run_s": lab.text_seconds, "labeler_init_first_s": first,
                                "cached_labeler_init_s": stat(cached),
                                "words": len(lab.wordlist)}
    records = load_records(cfg)
    n = len(records)
    dec = Decoder(cfg.input.image_root, lab.preprocess, cfg.input.max_pixels)
    images = torch.stack([dec(r).image for r in records[:BARE_IMAGES]])
    bs = cfg.run.batch_size

    def bare():
        for s in range(0, len(images), bs):
            lab.search(*lab.encode(images[s:s + bs]))

    bare()  # warm-up
    enc_t, search_t = [], []
    for _ in range(repeats):  # the Labeler's own stage timers split each pass
        e0, s0 = lab.timings.encode, lab.timings.search
        bare()
        enc_t.append(lab.timings.encode - e0)
        search_t.append(lab.timings.search - s0)
    feats = [lab.encode(images[s:s + bs]) for s in range(0, min(n, 16), bs)]
    pipe = pipeline_rounds(work, spec, js, root, cache, repeats, bare, len(images))
    res["extraction"] = {
        "images": n, "grid": list(lab.encoder.grid), "batch_size": bs,
        "bare_limit_img_s": stat(pipe["bare_rate_per_round"]),
        "encode_only_img_s": stat([len(images) / x for x in enc_t]),
        "search_only_img_s": stat([len(images) / x for x in search_t]),
        **pipe,
    }
    local_rate = pipe["in_process_img_s"]["median"]
    # 2. naive: one image at a time, fp32, a Python loop over patches with numpy
    text = lab.text.numpy()
    k = cfg.labels.top_n
    naive_n = min(4, n)

    def naive():
        for i in range(naive_n):
            with torch.inference_mode():
                p, _ = lab.encode(images[i:i + 1])
            q = -p[0].numpy()
            for v in q:
                s = text @ v
                top = np.argpartition(-s, k)[:k]
                top[np.argsort(-s[top])]

    naive_t = timed(naive, repeats)
    res["naive"] = {"images": naive_n, "img_s": stat([naive_n / x for x in naive_t]),
                    "speedup_in_process_over_naive": local_rate / (naive_n / statistics.median(naive_t))}
    # 3. search backends on the same queries
    from pipeline.search import WordIndex

    q = -torch.cat([f[0].reshape(-1, f[0].shape[-1]) for f in feats])
    out = {}
    ids = {}
    backends = [("faiss", "cpu"), ("torch", "cpu")]
    if torch.cuda.is_available():
        backends += [("torch", "cuda"), ("faiss", "cuda")]
    for name, dev in backends:
        idx = WordIndex(text, name, dev)
        idx.search(q[:256], k)
        tt = timed(lambda idx=idx: idx.search(q, k), repeats)
        out[f"{name}-{dev}"] = {"patches_per_s": stat([len(q) / x for x in tt])}
        ids[f"{name}-{dev}"] = idx.search(q, k)[1].numpy()
    ref = ids["faiss-cpu"]
    for key in out:
        out[key]["top1_agreement_with_faiss_cpu"] = float((ids[key][:, 0] == ref[:, 0]).mean())
        out[key]["topn_set_agreement"] = float(np.mean([len(set(a) & set(b)) / k
                                                        for a, b in zip(ids[key], ref, strict=True)]))
    res["search_backends"] = {"queries": len(q), "words": len(text), "dim": text.shape[1], **out}


def bench_storage(work: Path, res: dict):
    from pipeline import shards

    rng = np.random.default_rng(0)
    meta = {k: None for k in shards.META_FIELDS}
    out = {}
    for label, grid, uniform in [("576x10_uniform_random_ids", (24, 24), True),
                                 ("576x10_zipf_ids", (24, 24), False)]:
        b, p, n = 256, grid[0] * grid[1], 10
        if uniform:
            ids = rng.integers(0, 41241, (b, p, n))
        else:  # real labels repeat a few thousand words (the paper: 61% of the list used)
            ids = np.minimum(rng.zipf(1.3, (b, p, n)) - 1, 41240)
        scores = np.sort(rng.normal(0.1, 0.05, (b, p, n)), axis=-1)[..., ::-1]
        path = work / f"storage-{label}.parquet"
        w = shards.ShardWriter(path, meta)
        w.write(shards.LabelBatch([f"{i:09d}" for i in range(b)], [f"img/{i:09d}.jpg" for i in range(b)],
                                  grid, ids.astype(np.uint16), scores.astype(np.float16)))
        w.close()
        out[label] = {"bytes_per_image": path.stat().st_size / b, "raw_bytes_per_image": p * n * 4}
    res["storage"] = out
    # integrity: the sha256 read every rerun and trainer start does per shard byte (256 MiB of
    # incompressible bytes; the second and third passes come from the page cache, as on a rerun)
    blob = work / "verify.bin"
    blob.write_bytes(rng.integers(0, 256, 256 << 20, dtype=np.uint8).tobytes())
    t = timed(lambda: shards.file_sha256(blob), 3)
    res["verify"] = {"mib": 256, "s_per_gib": stat([x * 4 for x in t])}
    blob.unlink()


def training_setups(work: Path, settings: list[tuple]) -> tuple[dict, dict]:
    """The demo's tiny setup, built once per (lambda, objective, tag) in ``settings``, warmed
    up, with one optimizer step's micro-batches; and the label extraction's summary."""
    from pipeline.extract import run_local
    from pipeline.tiny import save_tiny
    from trainer.tiny import save_tiny_llm
    from trainer.train import build, train_step
    from wordlist import load_wordlist
    from world.sample import extract_config, make_sample, pretrain_config, sample_text

    spec = save_tiny("clip", work / "models" / "tiny-clip")
    make_sample(work / "sample", n=48)
    summary = run_local(extract_config(work, spec))
    llm = save_tiny_llm(work / "models" / "tiny-llm", list(load_wordlist().words),
                        extra_text=sample_text())
    setups = {}
    for key in settings:
        p = build(pretrain_config(work, spec, llm, key[0], f"sea.objective={key[1]}"), "pretrain")
        p.task.train()
        p.dataset.set_position(0, 0)
        batches = list(p.dataset)[: p.accum]
        for _ in range(3):  # warm-up
            train_step(p, batches, 0)
        setups[key] = (p, batches)
    return setups, summary


def bench_training(work: Path, repeats: int, res: dict):
    """SEA overhead and reader speed on the demo's tiny setup."""
    from trainer.data import StreamDataset

    setups, s = training_setups(work, [(0.0, "sampled"), (1.0, "sampled"), (1.0, "multi")])
    res["storage"]["demo_8x8x10"] = {"bytes_per_image": s["bytes_per_image"],
                                     "raw_bytes_per_image": 64 * 10 * 4}
    ratios, step_times = paired_steps(setups, rounds=60 * repeats)
    p, batches = setups[(1.0, "sampled")]
    consume = sum(len(b["input_ids"]) for b in batches) / statistics.median(step_times[(1.0, "sampled")])
    ds = p.dataset

    def read_all(draws=None):
        n = 0
        for b in StreamDataset(ds.source, ds.micro, 0, holdout=ds.holdout, draws=draws):
            n += len(b["input_ids"])
        return n

    rows = read_all()
    read_t = timed(read_all, repeats)
    # SEA's draws happen in the loader (beside the step, in loader workers): their cost there
    draw_t = {o: timed(lambda o=o: read_all(setups[(1.0, o)][0].dataset.draws), repeats)
              for o in ("sampled", "multi")}
    res["training"] = {
        "config": "demo: tiny CLIP 8x8 grid, tiny Llama (64 wide, 2 layers), micro 4, global 8",
        "step_s_lambda0": stat(step_times[(0.0, "sampled")]),
        "step_s_lambda1": stat(step_times[(1.0, "sampled")]),
        "step_s_lambda1_multi": stat(step_times[(1.0, "multi")]),
        "sea_overhead_ratio": ratios[(1.0, "sampled")],
        "sea_overhead_ratio_multi": ratios[(1.0, "multi")],
        "reader_img_s": stat([rows / x for x in read_t]),
        "reader_img_s_with_draws": stat([rows / x for x in draw_t["sampled"]]),
        "reader_img_s_with_draws_multi": stat([rows / x for x in draw_t["multi"]]),
        "trainer_consumes_img_s": consume,
    }


def logits_bytes(positions: int, vocab: int) -> int:
    """fp32 logits of one sample (one copy; the backward holds about as much again)."""
    return positions * vocab * 4


def bench_logits(work: Path, rounds: int, res: dict) -> None:
    """Stage-1 step at the world's LM shape (Llama, 128 wide, 3 layers, 4 heads, its 4,096-token
    BPE), 8x8 visual tokens, micro = global = 32, lambda = 0: the output head at the supervised
    positions only against transformers' full-logits loss, paired in one run (the variant
    swapped between back-to-back steps of the same model and batch)."""
    import trainer.task as task_mod
    from pipeline.extract import run_local
    from pipeline.tiny import save_tiny
    from trainer.model import IGNORE_INDEX, supervised_lm_loss
    from trainer.tiny import save_tiny_llm
    from trainer.train import build, train_step
    from wordlist import load_wordlist
    from world.models import LMSpec
    from world.sample import extract_config, make_sample, pretrain_config, sample_text

    def full(llm, embeds, mask, labels):
        return llm(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False).loss

    lm = LMSpec()
    spec = save_tiny("clip", work / "models" / "tiny-clip")
    d = work / "logits"
    make_sample(d / "sample", n=80)
    run_local(extract_config(d, spec))
    llm = save_tiny_llm(work / "models" / "world-shape-llm", list(load_wordlist().words),
                        vocab_size=lm.vocab_size, hidden=lm.hidden, layers=lm.layers,
                        heads=lm.heads, extra_text=sample_text())
    p = build(pretrain_config(d, spec, llm, 0.0, "optim.global_batch_size=32",
                              "optim.micro_batch_size=32"), "pretrain")
    p.task.train()
    p.dataset.set_position(0, 0)
    batches = list(p.dataset)[: p.accum]
    variants = {"supervised": supervised_lm_loss, "full": full}
    times: dict = {k: [] for k in variants}
    try:
        for k in variants:  # warm-up
            task_mod.supervised_lm_loss = variants[k]
            for _ in range(2):
                train_step(p, batches, 1)
        for r in range(rounds):
            order = list(variants) if r % 2 == 0 else list(variants)[::-1]
            gc.collect()
            gc.disable()
            try:
                for k in order:
                    task_mod.supervised_lm_loss = variants[k]
                    t0 = time.perf_counter()
                    train_step(p, batches, 1)
                    times[k].append(time.perf_counter() - t0)
            finally:
                gc.enable()
    finally:
        task_mod.supervised_lm_loss = supervised_lm_loss
    ids = [len(x) for b in batches for x in b["input_ids"]]
    read = sum(int((torch.as_tensor(x)[1:] != IGNORE_INDEX).sum()) for b in batches for x in b["labels"])
    grid = p.task.mllm.grid
    positions = sum(ids) + len(ids) * (grid[0] * grid[1] - 1)
    shapes = {"vicuna-7b (32,000 vocab)": 32000, "llama-3-8b (128,256 vocab)": 128256}
    # LLaVA-1.5 stage 1: <s>, 576 visual tokens, a ~40-token caption and EOS
    seq, cap = 1 + 576 + 41, 41
    res["logits"] = {
        "config": f"world LM shape ({lm.hidden} wide, {lm.layers} layers, {len(p.tokenizer)} "
                  f"vocab), {grid[0]}x{grid[1]} visual tokens, micro 32, stage 1, lambda 0",
        "positions_per_step": positions, "supervised_per_step": read,
        "step_s_supervised": stat(times["supervised"]), "step_s_full": stat(times["full"]),
        "speedup_full_over_supervised": median_ci(
            [a / b for a, b in zip(times["full"], times["supervised"], strict=True)]),
        "computed_fp32_logits_mib_per_sample": {
            k: {"full": logits_bytes(seq, v) / 2**20, "supervised": logits_bytes(cap, v) / 2**20,
                "positions": [seq, cap]} for k, v in shapes.items()},
    }


def peak_rss(cmd: list[str], env=None) -> float:
    """Peak resident memory (MiB) of a child process."""
    code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, "
            "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True,
                         check=True, env=env, cwd=REPO)
    return int(out.stdout.strip()) / 1024


def bench_memory(work: Path, spec: str, res: dict, n_small: int):
    from world.sample import make_sample

    out = {}
    for n in (n_small, 4 * n_small):
        make_sample(work / f"mem{n}", n=n, size=256, seed=1)
        cmd = [sys.executable, "-m", "pipeline", "extract", f"encoder.model={spec}",
               "encoder.pretrained=null", f"input.json={work / f'mem{n}' / 'sample.json'}",
               f"input.image_root={work / f'mem{n}' / 'images'}", f"run.output={work / f'memout{n}'}",
               "run.runner=local", "run.chunk_size=16", "run.batch_size=16",
               f"labels.text_cache_dir={work / 'text-cache'}", "run.progress=false"]
        out[f"extract_{n}_images_mib"] = peak_rss(cmd)
    out["extract_ratio_4n_over_n"] = out[f"extract_{4 * n_small}_images_mib"] / out[f"extract_{n_small}_images_mib"]
    cmd = [sys.executable, "-m", "trainer", "pretrain", f"vision.model=local-dir:{work / 'models' / 'tiny-clip'}",
           "vision.pretrained=null", f"llm.path={work / 'models' / 'tiny-llm'}",
           f"data.json={work / 'sample' / 'sample.json'}", f"data.image_root={work / 'sample' / 'images'}",
           f"data.shards={work / 'shards'}", "data.holdout_images=8", "data.num_workers=0",
           "optim.global_batch_size=8", "optim.micro_batch_size=4", "optim.epochs=2",
           f"log.output={work / 'runs' / 'mem'}", "log.progress=false", "log.eval_every=0"]
    out["trainer_tiny_mib"] = peak_rss(cmd)
    res["memory"] = out


def bench_stats_memory(work: Path, res: dict, rows: int = 512) -> None:
    """Peak memory of `pipeline stats` over 2 and 8 shards of 576 x 10 Zipf-like labels: it
    streams row groups, so the figure must not grow with the number of shards."""
    from pipeline import shards
    from wordlist import load_wordlist

    wl = load_wordlist()
    rng = np.random.default_rng(1)
    meta = {k: None for k in shards.META_FIELDS}
    meta.update({"schema_version": shards.SCHEMA_VERSION, "wordlist_sha256": wl.sha256,
                 "wordlist_size": len(wl), "top_n": 10, "grid": [24, 24], "mode": "sea"})
    out = {}
    for k in (2, 8):
        d = work / f"stats{k}"
        d.mkdir()
        entries = []
        for i in range(k):
            ids = np.minimum(rng.zipf(1.3, (rows, 576, 10)) - 1, 41240).astype(np.uint16)
            scores = np.sort(rng.normal(0.1, 0.05, (rows, 576, 10)), axis=-1)[..., ::-1].astype(np.float16)
            path = d / shards.shard_name(i)
            w = shards.ShardWriter(path, meta)
            w.write(shards.LabelBatch([f"{i}-{j}" for j in range(rows)], [f"{i}/{j}.jpg" for j in range(rows)],
                                      (24, 24), ids, scores))
            w.close()
            entries.append({"name": path.name, "rows": rows, "bytes": path.stat().st_size,
                            "sha256": shards.file_sha256(path)})
        shards.write_json_atomic(d / shards.MANIFEST, {"schema_version": shards.SCHEMA_VERSION,
                                 "metadata": meta, "num_chunks": k, "complete": True,
                                 "shards": entries, "rows": k * rows})
        t = time.perf_counter()
        out[f"stats_{k}_shards_mib"] = peak_rss([sys.executable, "-m", "pipeline", "stats", "--shards", str(d)])
        out[f"stats_{k}_shards_s"] = time.perf_counter() - t
    out["stats_ratio_8_over_2"] = out["stats_8_shards_mib"] / out["stats_2_shards_mib"]
    out["stats_images_per_shard"] = rows
    res["memory"].update(out)


def write_markdown(res: dict, path: Path, command: str) -> None:
    e, t, m = res["extraction"], res["training"], res["memory"]

    def f(s, digits=2):
        return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"

    def ci(s):
        return f"{s['median']:.3f} [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]"

    lines = [
        "# Benchmarks", "",
        f"Produced by `{command}` on {res['machine']['cpus']} CPU cores, GPU: "
        f"{res['machine']['gpu'] or 'none'}; torch {res['machine']['torch']}, faiss "
        f"{res['machine']['faiss']}, open_clip {res['machine']['open_clip']}, ray "
        f"{res['machine']['ray']}. Median of {res['repeats']} runs, (min-max) after it. "
        f"All figures: `bench/results.json`. Targets are reported, never asserted.", "",
        "## Label extraction (ViT-B/16-shaped tower, random weights, 2of12, n = 10, batch 16, fp32)", "",
        "| figure | value | target |", "|---|---|---|",
        f"| images | {e['images']} ({e['grid'][0]}x{e['grid'][1]} patches), shards of {e['chunk_size']}, "
        f"{e['rounds']} interleaved rounds | |",
        f"| bare limit: encode + search on preloaded tensors, img/s | {f(e['bare_limit_img_s'])} | |",
        f"| encode alone, img/s | {f(e['encode_only_img_s'])} | |",
        f"| search alone (FAISS flat), img/s | {f(e['search_only_img_s'])} | |",
        f"| in-process pipeline, steady state, img/s | {f(e['in_process_img_s'])} | |",
        f"| Ray pipeline, steady state, img/s | {f(e['ray_img_s'])} | |",
        f"| in-process efficiency (steady / bare, per round) | {f(e['in_process_efficiency_per_round'], 3)} | >= 0.9 |",
        f"| Ray efficiency (steady / bare, per round) | {f(e['ray_efficiency_per_round'], 3)} | >= 0.9 |",
        f"| Ray / in-process (steady, per round) | {f(e['ray_over_in_process_per_round'], 3)} | >= 0.9 |",
        f"| time to first shard, in-process / Ray, s | {f(e['in_process_first_shard_s'], 1)} / "
        f"{f(e['ray_first_shard_s'], 1)} | |",
        f"| whole run (start-up included), in-process / Ray, img/s | {f(e['in_process_whole_run_img_s'])} / "
        f"{f(e['ray_whole_run_img_s'])} | |",
        f"| naive (1 image, numpy loop over patches), img/s | {f(res['naive']['img_s'], 3)} | |",
        f"| speed-up of the pipeline over naive | {res['naive']['speedup_in_process_over_naive']:.1f}x | |",
        "", "Where a run's time goes (seconds, median of the rounds; encode, search, the model's "
        "wait for decoded batches and shard writing are measured where the model runs):", "",
        "| runner | start-up | first shard | encode | search | decode wait | write | labelling (after start-up) |",
        "|---|---|---|---|---|---|---|---|",
        *[f"| {label} | " + " | ".join(f"{e[key + '_stages'][k]['median']:.1f}" for k in (
            "startup_seconds", "first_shard_seconds", "encode_seconds", "search_seconds",
            "decode_wait_seconds", "write_seconds", "seconds")) + " |"
          for label, key in (("in-process", "in_process"), ("Ray", "ray"))],
        "", f"Ray's start-up: `ray.init` of a new local Ray {e['ray_stages']['ray_init_seconds']['median']:.1f} s, "
        f"then the model actor ready (its process imports torch, loads the model and the word matrix, "
        f"starts its decode workers) {e['ray_stages']['actor_start_seconds']['median']:.1f} s.",
        "", "## Search backends (same queries)", "", "| backend | patches/s | top-1 agreement | top-n set agreement |",
        "|---|---|---|---|"]
    for k, v in res["search_backends"].items():
        if isinstance(v, dict):
            lines.append(f"| {k} | {f(v['patches_per_s'], 0)} | {v['top1_agreement_with_faiss_cpu']:.4f} | "
                         f"{v['topn_set_agreement']:.4f} |")
    w = res["wordlist_encoding"]
    lines += ["", "## Word-list encoding (41,241 words, ViT-B/16 bench text tower: 2 layers, width 128)", "",
              f"- first run (cold cache): {w['first_run_s']:.2f} s of text encoding "
              f"({w['labeler_init_first_s']:.2f} s with model loading)",
              f"- cached run (model loading + cache read): {f(w['cached_labeler_init_s'])} s", "",
              "## Storage and reading", "", "| shard | bytes/image on disk | raw (uint16 + float16) |", "|---|---|---|"]
    for k, v in res["storage"].items():
        lines.append(f"| {k} | {v['bytes_per_image']:.0f} | {v['raw_bytes_per_image']} |")
    lines.append(f"| bench run, {e['grid'][0]}x{e['grid'][1]}x10 (real labels of the random ViT-B) | "
                 f"{e['bytes_per_image_196x10']:.0f} | {e['grid'][0] * e['grid'][1] * 40} |")
    lines += ["", f"- streaming reader (labels + image decode + tokenization), demo set: {f(t['reader_img_s'], 1)} img/s",
              f"- the same reader drawing SEA's pairs (`sampled` / `multi`; the loader does this, "
              f"beside the step): {f(t['reader_img_s_with_draws'], 1)} / "
              f"{f(t['reader_img_s_with_draws_multi'], 1)} img/s",
              f"- trainer consumption at the demo config: {t['trainer_consumes_img_s']:.1f} img/s", "",
              f"- shard verification (sha256 of every shard byte, each extraction rerun and trainer "
              f"start): {f(res['verify']['s_per_gib'], 2)} s per GiB (from the page cache; a cold "
              f"disk reads at its own speed)", "",
              "## SEA's overhead in training (" + t["config"] + ")", "",
              f"- step time lambda = 0: {f(t['step_s_lambda0'], 4)} s; lambda = 1: "
              f"{f(t['step_s_lambda1'], 4)} s (`sea.objective=sampled`), "
              f"{f(t['step_s_lambda1_multi'], 4)} s (`multi`)",
              f"- ratio lambda 1 / lambda 0 (median of {t['sea_overhead_ratio']['n']} paired steps, "
              f"95 % interval of the median): sampled {ci(t['sea_overhead_ratio'])}, multi "
              f"{ci(t['sea_overhead_ratio_multi'])} (target <= 1.05)", "",
              *_logits_lines(res.get("logits"), f, ci),
              "## Memory (peak RSS of the whole process, MiB)", ""]
    for k, v in m.items():
        lines.append(f"- {k}: {v:.2f}" if "ratio" in k else f"- {k}: {v:.0f}")
    lines += _fsdp_lines(res, ci)
    lines += _bucket_lines(res, f)
    lines += ["", "## Reading the figures", "", *res.get("notes", [])]
    path.write_text("\n".join(lines) + "\n")


def _fsdp_lines(res: dict, ci) -> list[str]:
    fs = res.get("fsdp")
    if not fs:
        return []
    one, two, m = fs["one_rank"], fs["two_ranks"], res["memory"]
    gib = 2 ** 30
    rows = [f"| 1 process | {one['load_peak_mib'] / 1024:.2f} | {one['step_peak_mib'] / 1024:.2f} | "
            f"{one['ckpt_bytes'] / gib:.2f} | {one['ckpt_save_s']:.1f} | {sum(one['step_s']) / 2:.1f} |"]
    rows += [f"| 2 FSDP ranks, rank {i} | {r['load_peak_mib'] / 1024:.2f} | {r['step_peak_mib'] / 1024:.2f} | "
             f"{r['ckpt_bytes'] / gib:.2f} | {r['ckpt_save_s']:.1f} | {sum(r['step_s']) / 2:.1f} |"
             for i, r in enumerate(two)]
    return ["", "## Training at scale (" + fs["config"] + ")", "",
            "Part of `make bench`; alone: `python bench/bench.py --only-fsdp` (how these figures "
            "were made, on the machine above). Peak resident memory of each rank's whole process "
            "(GiB), its checkpoint part and the seconds to save it (sha256 and fsync included), "
            "mean step time:", "",
            "| run | load peak | step peak | checkpoint GiB | save s | step s |", "|---|---|---|---|---|---|",
            *rows, "",
            f"- 2-rank peak per rank / 1-process peak: load {m['fsdp_load_peak_ratio']:.2f}, step "
            f"{m['fsdp_step_peak_ratio']:.2f} (target <= 0.6 each)",
            f"- each process's base before any model (interpreter, torch, transformers, open_clip): "
            f"{one.get('base_mib', 0) / 1024:.2f} GiB, in every peak above",
            f"- SEA's step overhead at this shape, stage 1 (frozen LLM), lambda 1 / lambda 0 paired on "
            f"one model ({res['training']['sea_overhead_ratio_1b']['n']} pairs): "
            f"{ci(res['training']['sea_overhead_ratio_1b'])} (target <= 1.03); lambda 0 step "
            f"{fs['overhead_step_s']['lambda0']:.1f} s"]


def _bucket_lines(res: dict, f) -> list[str]:
    e, tr = res["extraction"], res.get("trainer")
    if "s3_over_local" not in e or not tr:
        return []

    def mm(s, digits=2):
        return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}, {s['max']:.{digits}f}]"

    return ["", "## Data in buckets (issue 35)", "",
            "Part of `make bench`; alone: `python bench/bench.py --only-buckets` (how these "
            f"figures were made, on the machine above). Medians [min, max] over "
            f"{e['s3_over_local_per_round']['n']} rounds.", "",
            f"- extraction, in-process runner, steady state: images, JSON and labels in a local "
            f"S3 endpoint ({e['s3_endpoint']}) {mm(e['s3_img_s'])} img/s, on local disk "
            f"{mm(e['local_disk_img_s'])} img/s; `extraction.s3_over_local` = "
            f"{e['s3_over_local']:.3f} per round {mm(e['s3_over_local_per_round'], 3)} (target >= 0.9)",
            f"- trainer start-up (`build` to the first micro-batch; tiny CLIP and LLM, so the "
            f"fixed part is small), {tr['rows']['1x']} rows in {tr['shards']['1x']} shards: "
            f"{mm(tr['startup_1x_s'], 3)} s; {tr['rows']['10x']} rows in {tr['shards']['10x']} "
            f"shards: {mm(tr['startup_10x_s'], 3)} s; `trainer.startup_10x_over_1x` = "
            f"{tr['startup_10x_over_1x']:.2f} (target <= 1.5)",
            f"- its data part alone (`open_source`: manifest, JSON, stage-1 join): "
            f"{mm(tr['data_setup_1x_s'], 3)} s and {mm(tr['data_setup_10x_s'], 3)} s "
            f"(ratio {tr['data_setup_10x_over_1x']:.1f}): reading the shards' path column and the "
            f"join are linear in rows; no shard is hashed and no image looked up",
            f"- the first start on a node also converts the JSON into the mapped store (once per "
            f"JSON and node): {tr['rows']['10x']} rows, build to first batch "
            f"{tr['first_start_10x_s']:.3f} s (one measurement, the conversion included)"]


def _logits_lines(lg: dict | None, f, ci) -> list[str]:
    if not lg:
        return []
    out = ["## Logits only where the loss reads them (" + lg["config"] + ")", "",
           f"- positions per step {lg['positions_per_step']}, of which supervised (caption and "
           f"EOS) {lg['supervised_per_step']}",
           f"- step time, output head at the supervised positions: {f(lg['step_s_supervised'], 4)} s; "
           f"transformers' full-logits loss: {f(lg['step_s_full'], 4)} s",
           f"- speed-up full / supervised (median of {lg['speedup_full_over_supervised']['n']} "
           f"paired steps, 95 % interval of the median): {ci(lg['speedup_full_over_supervised'])} "
           f"(target >= 3)",
           "- computed, not measured: fp32 logits of one LLaVA-1.5 stage-1 sample (<s>, 576 "
           "visual tokens, a 40-token caption, EOS), one copy; the backward holds about as much again:"]
    for k, v in lg["computed_fp32_logits_mib_per_sample"].items():
        out.append(f"  - {k}: {v['full']:.0f} MiB at all {v['positions'][0]} positions, "
                   f"{v['supervised']:.1f} MiB at the {v['positions'][1]} supervised ones")
    return out + [""]


def optimizer_update_us(foreach: bool, temperature: bool, n: int = 1000) -> float:
    """Microseconds of one ``clip_grad_norm_`` + ``AdamW.step`` over the tiny adapter's
    parameters (two 64 x 64 weights, two biases), with or without the 0-dimensional
    temperature, with torch's per-parameter loop or its foreach kernels (median of 5 blocks)."""
    shapes = [(64, 64), (64,), (64, 64), (64,)] + ([()] if temperature else [])
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for q in ps:
        q.grad = torch.randn_like(q)
    opt = torch.optim.AdamW(ps, lr=1e-3, foreach=foreach)

    def update():
        torch.nn.utils.clip_grad_norm_(ps, 1.0, foreach=foreach)
        opt.step()

    for _ in range(100):
        update()
    blocks = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            update()
        blocks.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(blocks)


def probe(kind: str) -> int:
    """``--probe``: the A/A check of ``paired_steps``, the per-step operator counts, or the
    optimizer update's cost with and without the temperature."""
    if kind == "optim":
        out = {f"{'foreach' if f else 'loop'}, {'5 (with temperature)' if t else '4'} params, us":
               round(optimizer_update_us(f, t), 1) for f in (False, True) for t in (False, True)}
        print(json.dumps(out, indent=1))
        return 0
    work = Path(tempfile.mkdtemp(prefix="sea-bench-"))
    try:
        if kind == "aa":
            keys = [(0.0, "sampled", "a"), (0.0, "sampled", "b"), (0.0, "sampled", "c"), (1.0, "sampled", "")]
            setups, _ = training_setups(work, keys)
            ratios, _ = paired_steps(setups, rounds=200)
            out = {"+".join(str(v) for v in k if v != ""): r for k, r in ratios.items()}
        else:
            from torch.profiler import ProfilerActivity, profile

            from trainer.train import train_step

            setups, _ = training_setups(work, [(0.0, "sampled"), (1.0, "sampled"), (1.0, "multi")])
            out = {}
            for k, (p, batches) in setups.items():
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(10):
                        train_step(p, batches, 1)
                out[f"lambda={k[0]:g} {k[1]}"] = sum(e.count for e in prof.key_averages()) / 10
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=1))
    return 0


def bench_buckets(work: Path, images: int, repeats: int, res: dict) -> None:
    """Issue 35: extraction through a local S3 endpoint against local disk; trainer start-up
    at 1x and 10x the label shards (bench/buckets.py)."""
    from pipeline.tiny import save_tiny
    from world.sample import make_sample

    work.mkdir(parents=True, exist_ok=True)
    spec = save_tiny("vitb16", work / "models" / "vitb16")
    js = make_sample(work / "bench-sample", n=images, size=256, seed=2)
    bench_s3_extraction(work, spec, js, work / "bench-sample" / "images", repeats, res,
                        extract_cfg, CHUNK, stat)
    bench_startup(work / "startup", repeats, res, stat)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=192,
                    help="extraction bench images: 6 shards of 32, steady state over the last 5")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    ap.add_argument("--json", default=str(REPO / "bench" / "results.json"))
    ap.add_argument("--notes", default=str(REPO / "bench" / "notes.md"))
    ap.add_argument("--render", action="store_true", help="only rewrite the markdown from --json")
    ap.add_argument("--probe", choices=["aa", "ops", "optim"],
                    help="check the overhead protocol: 'aa' times three identical lambda = 0 "
                         "setups against each other (ratios should be 1); 'ops' counts the "
                         "operators each setting dispatches per step (machine-independent)")
    ap.add_argument("--only-logits", action="store_true",
                    help="only the supervised-logits step comparison; prints it, writes nothing")
    ap.add_argument("--only-extraction", action="store_true",
                    help="only the extraction rounds (bare, in-process, Ray); prints them, writes nothing")
    ap.add_argument("--only-fsdp", action="store_true",
                    help="only training at scale (1B Llama: FSDP memory, checkpoints, SEA's "
                         "overhead); merges its figures into --json and rewrites the markdown")
    ap.add_argument("--only-buckets", action="store_true",
                    help="only issue 35's figures (extraction from/to a local S3 endpoint against "
                         "local disk, trainer start-up at 1x and 10x the shards); merges them "
                         "into --json and rewrites the markdown")
    ap.add_argument("--only-training", action="store_true",
                    help="only SEA's training overhead; prints its figures, writes nothing")
    args = ap.parse_args()
    if args.probe:
        return probe(args.probe)
    if args.only_logits:
        work = Path(tempfile.mkdtemp(prefix="sea-bench-"))
        res = {}
        try:
            bench_logits(work, 20 * args.repeats, res)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(json.dumps(res["logits"], indent=1))
        return 0
    if args.only_extraction:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from pipeline.tiny import save_tiny
        from world.sample import make_sample

        work = Path(tempfile.mkdtemp(prefix="sea-bench-"))
        res = {}
        try:
            spec = save_tiny("vitb16", work / "models" / "vitb16")
            js = make_sample(work / "bench-sample", n=args.images, size=256, seed=2)
            bench_extraction(work, spec, js, work / "bench-sample" / "images", args.repeats, res)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(json.dumps(res["extraction"], indent=1))
        return 0
    if args.only_buckets:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        res = json.loads(Path(args.json).read_text())
        work = Path(tempfile.mkdtemp(prefix="sea-bench-"))
        try:
            bench_buckets(work, args.images, args.repeats, res)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
        args.render = True
    if args.only_training:
        work = Path(tempfile.mkdtemp(prefix="sea-bench-"))
        res = {"storage": {}}
        try:
            bench_training(work, args.repeats, res)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        t = res["training"]
        print(json.dumps({k: t[k] for k in t if k.startswith(("sea_", "step_"))}, indent=1))
        return 0
    if args.only_fsdp:
        res = json.loads(Path(args.json).read_text())
        work = Path(tempfile.mkdtemp(prefix="sea-bench-"))
        try:
            bench_fsdp(work, res, median_ci)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        Path(args.json).write_text(json.dumps(res, indent=2))
        args.render = True
    if args.render:
        res = json.loads(Path(args.json).read_text())
        notes = Path(args.notes)
        res["notes"] = notes.read_text().splitlines() if notes.is_file() else []
        write_markdown(res, Path(args.out), "make bench")
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from pipeline.tiny import save_tiny
    from world.sample import make_sample

    work = Path(tempfile.mkdtemp(prefix="sea-bench-"))
    t0 = time.perf_counter()
    res: dict = {"machine": machine(), "repeats": args.repeats}
    try:
        spec = save_tiny("vitb16", work / "models" / "vitb16")
        js = make_sample(work / "bench-sample", n=args.images, size=256, seed=2)
        bench_extraction(work, spec, js, work / "bench-sample" / "images", args.repeats, res)
        bench_storage(work, res)
        bench_training(work, args.repeats, res)
        bench_logits(work, 20 * args.repeats, res)
        bench_memory(work, spec, res, n_small=16)
        bench_stats_memory(work, res)
        bench_fsdp(work / "fsdp", res, median_ci)
        bench_buckets(work / "buckets", args.images, args.repeats, res)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["total_seconds"] = time.perf_counter() - t0
    notes = Path(args.notes)
    res["notes"] = notes.read_text().splitlines() if notes.is_file() else []
    Path(args.json).write_text(json.dumps(res, indent=2))
    command = "make bench"
    write_markdown(res, Path(args.out), command)
    print(Path(args.out).read_text())
    print(f"bench took {res['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
