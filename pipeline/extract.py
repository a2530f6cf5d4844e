"""Planning and the local (in-process) runner for label extraction.

A run is identified by its shard metadata plus the chunking and a hash of the input list
(``run.json`` in the output directory). Chunk i always holds input records
[i*chunk_size, (i+1)*chunk_size), so a rerun with the same identity plans only the chunks
without a done marker; a rerun with another identity is refused, naming what differs,
unless ``run.overwrite`` is set.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pipeline import shards
from pipeline.config import ExtractConfig
from pipeline.data import IMAGE_EXTS, InputError, Record, records_from_folder, records_from_json
from pipeline.lock import OutputLock
from pipeline.stages import Decoder, Labeler, label_batches, write_chunk
from seacore.config import config_hash
from seacore.files import atomic_path

RUN_FILE = "run.json"
ERRORS_FILE = "errors.jsonl"
WORDLIST_FILE = "wordlist.txt"  # a copy of a word list other than 2of12: the run reads alone


class RunMismatch(ValueError):
    pass


def load_records(cfg: ExtractConfig) -> list[Record]:
    """The input list, or an InputError naming the key, the file and the fix: called before
    anything starts (Ray included), so a wrong path costs nothing."""
    root = Path(cfg.input.image_root)
    if not root.is_dir():
        raise InputError(f"input.image_root: {root} is not a folder (set "
                         f"input.image_root=/path/to/images, the folder image paths are relative to)")
    if cfg.input.json:
        recs = records_from_json(cfg.input.json)
    else:
        recs = records_from_folder(root)
        if not recs:
            raise InputError(f"input.image_root: {root} holds no image files "
                             f"({', '.join(sorted(IMAGE_EXTS))}) and no input.json is given")
    return recs[: cfg.input.limit] if cfg.input.limit is not None else recs


def input_hash(records: list[Record]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(r.image_id.encode() + b"\0" + r.path.encode()
                 + (b"\0" + r.error.encode() if r.error else b"") + b"\n")
    return h.hexdigest()


@dataclass
class Plan:
    out_dir: Path
    records: list[Record]
    chunks: list[tuple[int, int]]  # (start, end) per chunk index
    todo: list[int]
    identity: dict
    config_hash: str

    def chunk_records(self, index: int) -> list[Record]:
        s, e = self.chunks[index]
        return self.records[s:e]


def run_identity(cfg: ExtractConfig, metadata: dict, records: list[Record]) -> dict:
    ident = {k: v for k, v in metadata.items() if k != "package_version"}
    ident.update({"chunk_size": cfg.run.chunk_size, "input_sha256": input_hash(records),
                  "input_count": len(records), "image_root": str(Path(cfg.input.image_root))})
    return ident


def plan_run(cfg: ExtractConfig, metadata: dict, records: list[Record]) -> Plan:
    out = Path(cfg.run.output)
    ident = run_identity(cfg, metadata, records)
    chash = config_hash(ident)
    run_file = out / RUN_FILE
    if run_file.is_file():
        old = json.loads(run_file.read_text())
        diffs = [k for k in sorted(set(old) | set(ident)) if old.get(k) != ident.get(k)]
        if diffs and not cfg.run.overwrite:
            k = diffs[0]
            raise RunMismatch(
                f"{out} holds a run made with other settings: '{k}' was {old.get(k)!r}, now "
                f"{ident.get(k)!r} ({len(diffs)} field(s) differ: {', '.join(diffs)}). Use "
                f"another run.output, or run.overwrite=true to replace it")
        if diffs:
            clear_run(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".shard-*.tmp*"):  # leftovers of a killed writer
        stale.unlink()
    shards.write_json_atomic(run_file, ident)
    if cfg.labels.wordlist:  # small (the world's is 28 words); 2of12 is found by its hash
        with atomic_path(out / WORDLIST_FILE) as tmp:
            shutil.copyfile(cfg.labels.wordlist, tmp)
    cs = cfg.run.chunk_size
    chunks = [(s, min(s + cs, len(records))) for s in range(0, len(records), cs)]
    done = shards.list_done(out, verify=True)  # reads every finished shard once
    todo = [i for i in range(len(chunks)) if i not in done]
    for i in todo:  # a damaged shard or unreadable marker: redone from scratch
        for stale in (out / shards.shard_name(i), out / shards.done_name(i)):
            if stale.exists():
                print(f"warning: {stale} is damaged or incomplete; chunk {i} is labelled again",
                      file=sys.stderr)
                stale.unlink()
    return Plan(out, records, chunks, todo, ident, chash)


def clear_run(out: Path) -> None:
    for pattern in ("shard-*.parquet", "shard-*.done", ".shard-*", shards.MANIFEST, ERRORS_FILE,
                    RUN_FILE, WORDLIST_FILE):
        for p in out.glob(pattern):
            p.unlink() if p.is_file() else shutil.rmtree(p)


def finish_run(plan: Plan, metadata: dict) -> dict:
    """Manifest and errors.jsonl from the done markers (so a resumed run gets both whole)."""
    manifest = shards.write_manifest(plan.out_dir, plan.config_hash, metadata, len(plan.chunks))
    done = shards.list_done(plan.out_dir)
    reasons: dict[str, int] = {}
    with atomic_path(plan.out_dir / ERRORS_FILE) as tmp, open(tmp, "w") as f:
        for i in sorted(done):
            for err in done[i].get("error_list", []):
                f.write(json.dumps({"chunk": i, **err}) + "\n")
                kind = reason_kind(err["reason"])
                reasons[kind] = reasons.get(kind, 0) + 1
    manifest["errors_by_reason"] = dict(sorted(reasons.items(), key=lambda kv: -kv[1]))
    return manifest


def reason_kind(reason: str) -> str:
    """An error reason without its particulars ("cannot decode: OSError: ..." -> "cannot
    decode"), to count errors per kind."""
    return reason.split(":")[0].split(" (")[0].strip()


def run_problem(summary: dict, max_error_rate: float) -> str | None:
    """Why a finished run is not a success (None when it is): nothing labelled, or more
    failed images than ``run.max_error_rate`` allows."""
    ok, bad = summary["images_labelled"], summary["images_failed"]
    total = ok + bad
    counts = ", ".join(f"{k}: {v}" for k, v in summary["errors_by_reason"].items()) or "none"
    where = f"see {summary['output']}/{ERRORS_FILE}"
    if total and ok == 0:
        return f"0 of {total} images labelled; errors by reason: {counts} ({where})"
    if total and bad / total > max_error_rate:
        return (f"{bad} of {total} images failed ({bad / total:.1%} > run.max_error_rate="
                f"{max_error_rate}); errors by reason: {counts} ({where}). Fix the inputs, or "
                f"raise run.max_error_rate to accept the run as it is (the shards are kept)")
    return None


def prefetch_batches(decoder: Decoder, records: list[Record], batch_size: int, workers: int):
    """Decode in threads, in input order, at most two batches ahead (bounded memory)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        window: deque = deque()
        it = iter(range(0, len(records), batch_size))

        def submit_next() -> bool:
            s = next(it, None)
            if s is None:
                return False
            window.append([pool.submit(decoder, r) for r in records[s:s + batch_size]])
            return True

        for _ in range(2):
            submit_next()
        while window:
            futures = window.popleft()
            submit_next()
            yield [f.result() for f in futures]


def timeline(startup: float, done: list[tuple[int, float]]) -> dict:
    """Start-up against steady state. ``done``: (images, seconds since the runner was called)
    per chunk, in the order they finished. Steady state is everything after the first shard:
    the images of the later chunks over the time between the first and the last shard."""
    out = {"startup_seconds": round(startup, 2),
           "first_shard_seconds": round(done[0][1], 2) if done else None,
           "steady_images_per_second": None}
    if len(done) > 1 and done[-1][1] > done[0][1]:
        out["steady_images_per_second"] = round(
            sum(n for n, _ in done[1:]) / (done[-1][1] - done[0][1]), 3)
    return out


def summarize(plan: Plan, manifest: dict, seconds: float, images_this_run: int,
              reports: list[dict], times: dict | None = None) -> dict:
    """The run summary; ``reports`` are the labelers' ``report()`` (one per process/actor);
    ``times`` what ``timeline`` gives."""
    rows = manifest["rows"]
    errors = sum(s["errors"] for s in manifest["shards"])
    total_bytes = sum(s["bytes"] for s in manifest["shards"])
    meta = manifest["metadata"]
    out = {
        "output": str(plan.out_dir),
        "images_in_input": len(plan.records),
        "images_labelled": rows,
        "images_failed": errors,
        "errors_by_reason": manifest.get("errors_by_reason", {}),
        "chunks": len(plan.chunks),
        "chunks_done": len(manifest["shards"]),
        "complete": manifest["complete"],
        "grid": meta["grid"],
        "patches_per_image": meta["grid"][0] * meta["grid"][1],
        "top_n": meta["top_n"],
        "bytes_per_image": round(total_bytes / rows, 1) if rows else None,
        "kept_labels_per_patch": round(sum(s["kept_labels"] for s in manifest["shards"])
                                       / max(1, sum(s["patches"] for s in manifest["shards"])), 3),
        "seconds": round(seconds, 2),
        "images_processed_this_run": images_this_run,
        "images_per_second": round(images_this_run / seconds, 2) if seconds > 0 else None,
    }
    if reports:
        out.update({"encode_seconds": round(sum(r["encode_seconds"] for r in reports), 2),
                    "search_seconds": round(sum(r["search_seconds"] for r in reports), 2),
                    "text_seconds": round(max(r["text_seconds"] for r in reports), 2),
                    "text_cache_hit": all(r["text_cache_hit"] for r in reports),
                    "decode_wait_seconds": round(sum(r["decode_wait_seconds"] for r in reports), 2),
                    "write_seconds": round(sum(r["write_seconds"] for r in reports), 2),
                    "device": reports[0]["device"], "search_backend": reports[0]["search_backend"]})
    out.update(times or {})
    return out


def run_local(cfg: ExtractConfig, labeler: Labeler | None = None) -> dict:
    """Label every missing chunk in this process; returns the run summary."""
    records = load_records(cfg)
    with OutputLock(cfg.run.output):  # one writer per folder, taken before any work
        return _run_local(cfg, labeler, records)


def _run_local(cfg: ExtractConfig, labeler: Labeler | None, records: list[Record]) -> dict:
    entry = time.perf_counter()
    labeler = labeler or Labeler(cfg, progress=cfg.run.progress)  # fails fast without weights
    metadata = labeler.metadata()
    plan = plan_run(cfg, metadata, records)
    decoder = Decoder(cfg.input.image_root, labeler.preprocess, cfg.input.max_pixels)
    from tqdm.auto import tqdm

    todo_images = sum(len(plan.chunk_records(i)) for i in plan.todo)
    bar = tqdm(total=todo_images, desc="labelling", unit="img", disable=not cfg.run.progress)
    t0 = time.perf_counter()
    done: list[tuple[int, float]] = []
    for index in plan.todo:
        recs = plan.chunk_records(index)
        errors: list[dict] = []

        def counted(batches):
            for b in batches:
                yield b
                bar.update(len(b))

        decoded = counted(prefetch_batches(decoder, recs, cfg.run.batch_size,
                                           cfg.run.decode_workers))
        write_chunk(plan.out_dir, index, metadata, label_batches(decoded, labeler, errors),
                    errors=errors, row_group_size=cfg.run.row_group_size, timings=labeler.timings)
        done.append((len(recs), time.perf_counter() - entry))
    bar.close()
    seconds = time.perf_counter() - t0
    manifest = finish_run(plan, metadata)
    return summarize(plan, manifest, seconds, todo_images, [labeler.report()],
                     timeline(t0 - entry, done))
