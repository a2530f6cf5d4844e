"""Planning and the local (in-process) runner for label extraction.

A run is identified by its shard metadata plus the chunking and a hash of the input list
(``run.json`` in the output directory). Chunk i always holds input records
[i*chunk_size, (i+1)*chunk_size) (with webdataset tars: tar i), so a rerun with the same
identity plans only the chunks without a done marker; a rerun with another identity is
refused, naming what differs, unless ``run.overwrite`` is set.

Inputs and the output are paths or URLs (``seacore.storage``). A restart trusts the done
markers and checks each done shard's presence and size in one listing; it re-reads them
(sha256) only with ``run.verify=all``: its cost does not grow with the label set's bytes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import sys
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pipeline import shards, webdataset
from pipeline.config import ExtractConfig
from pipeline.data import IMAGE_EXTS, InputError, Record, records_from_folder, records_from_json
from pipeline.lock import output_lock
from pipeline.stages import Decoder, Labeler, label_batches, write_chunk
from seacore.config import config_hash
from seacore.storage import Location, is_url, resolve

RUN_FILE = "run.json"
ERRORS_FILE = "errors.jsonl"
WORDLIST_FILE = "wordlist.txt"  # a copy of a word list other than 2of12: the run reads alone


class RunMismatch(ValueError):
    pass


Tar = tuple[Location, int]  # a webdataset tar and its size


def load_records(cfg: ExtractConfig) -> list[Record] | list[Tar]:
    """The input list (records, or with ``input.tars`` the tars), or an InputError naming the
    key, the file and the fix: called before anything starts (Ray included), so a wrong path
    costs nothing."""
    if cfg.input.tars:
        tars = webdataset.list_tars(cfg.input.tars)
        return tars[: cfg.input.limit] if cfg.input.limit is not None else tars
    root = resolve(cfg.input.image_root)
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


def input_hash(records: list[Record] | list[Tar]) -> str:
    h = hashlib.sha256()
    for r in records:
        if isinstance(r, Record):
            h.update(r.image_id.encode() + b"\0" + r.path.encode()
                     + (b"\0" + r.error.encode() if r.error else b"") + b"\n")
        else:
            h.update(f"{r[0].name}\0{r[1]}\n".encode())
    return h.hexdigest()


@dataclass
class Plan:
    out_dir: Location
    records: list[Record] | list[Tar]
    chunks: list[tuple[int, int]]  # (start, end) per chunk index
    todo: list[int]
    identity: dict
    config_hash: str

    @property
    def tars(self) -> bool:
        return bool(self.records) and not isinstance(self.records[0], Record)

    def chunk_records(self, index: int) -> list[Record] | Location:
        """A chunk's records, or (tars) the tar: its records are known once it is read."""
        s, e = self.chunks[index]
        return self.records[s][0] if self.tars else self.records[s:e]

    def chunk_images(self, index: int) -> int | None:
        """Images in a chunk when known before reading it (None for a tar)."""
        return None if self.tars else len(self.chunk_records(index))


def _where(text: str) -> str:
    """An input location as the run's identity records it (paths normalised as before)."""
    return text.rstrip("/") if is_url(text) else str(Path(text))


def run_identity(cfg: ExtractConfig, metadata: dict, records: list[Record] | list[Tar]) -> dict:
    ident = {k: v for k, v in metadata.items() if k != "package_version"}
    ident.update({"chunk_size": cfg.run.chunk_size, "input_sha256": input_hash(records),
                  "input_count": len(records), "image_root": _where(cfg.input.image_root)})
    if cfg.input.tars:  # one chunk per tar: the chunk size plays no part
        ident.update({"chunk_size": 1, "image_root": _where(cfg.input.tars), "tars": True})
    return ident


def plan_run(cfg: ExtractConfig, metadata: dict, records: list[Record] | list[Tar]) -> Plan:
    out = resolve(cfg.run.output)
    ident = run_identity(cfg, metadata, records)
    chash = config_hash(ident)
    run_file = out.child(RUN_FILE)
    old = _read_json(run_file)
    if old is not None:
        diffs = [k for k in sorted(set(old) | set(ident)) if old.get(k) != ident.get(k)]
        if diffs and not cfg.run.overwrite:
            k = diffs[0]
            raise RunMismatch(
                f"{out} holds a run made with other settings: '{k}' was {old.get(k)!r}, now "
                f"{ident.get(k)!r} ({len(diffs)} field(s) differ: {', '.join(diffs)}). Use "
                f"another run.output, or run.overwrite=true to replace it")
        if diffs:
            clear_run(out)
    out.mkdir()
    if out.local:
        for stale in Path(out.path).glob(".shard-*.tmp*"):  # leftovers of a killed writer
            stale.unlink()
    shards.write_json_atomic(run_file, ident)
    if cfg.labels.wordlist:  # small (the world's is 28 words); 2of12 is found by its hash
        out.child(WORDLIST_FILE).upload(cfg.labels.wordlist)
    cs = 1 if cfg.input.tars else cfg.run.chunk_size
    chunks = [(s, min(s + cs, len(records))) for s in range(0, len(records), cs)]
    # presence and size from one listing; the bytes re-read only with run.verify=all
    done = shards.list_done(out, verify=cfg.run.verify)
    todo = [i for i in range(len(chunks)) if i not in done]
    present = set(out.names("shard-*"))
    for i in todo:  # a damaged shard or unreadable marker: redone from scratch
        for name in (shards.shard_name(i), shards.done_name(i)):
            if name in present:
                print(f"warning: {out.child(name)} is damaged or incomplete; chunk {i} is "
                      f"labelled again", file=sys.stderr)
                out.child(name).delete()
    return Plan(out, records, chunks, todo, ident, chash)


def _read_json(loc: Location) -> dict | None:
    try:
        return json.loads(loc.read_text())
    except FileNotFoundError:
        return None


def clear_run(out: Location | Path | str) -> None:
    out = resolve(out)
    for pattern in ("shard-*.parquet", "shard-*.done", ".shard-*", shards.MANIFEST, ERRORS_FILE,
                    RUN_FILE, WORDLIST_FILE):
        for name in out.names(pattern):
            out.child(name).delete()


def finish_run(plan: Plan, metadata: dict) -> dict:
    """Manifest and errors.jsonl from the done markers (so a resumed run gets both whole)."""
    manifest = shards.write_manifest(plan.out_dir, plan.config_hash, metadata, len(plan.chunks))
    done = shards.list_done(plan.out_dir)
    reasons: dict[str, int] = {}
    lines = []
    for i in sorted(done):
        for err in done[i].get("error_list", []):
            lines.append(json.dumps({"chunk": i, **err}) + "\n")
            kind = reason_kind(err["reason"])
            reasons[kind] = reasons.get(kind, 0) + 1
    plan.out_dir.child(ERRORS_FILE).write_text("".join(lines))
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


def prefetch_batches(decoder: Decoder, records: Iterable[Record], batch_size: int, workers: int):
    """Decode in threads, in input order, at most two batches ahead (bounded memory); the
    records may be a lazy stream (a tar being read)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        window: deque = deque()
        it = iter(records)

        def submit_next() -> bool:
            batch = list(itertools.islice(it, batch_size))
            if not batch:
                return False
            window.append([pool.submit(decoder, r) for r in batch])
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


def images_done(plan: Plan, manifest: dict) -> int:
    """Images this run went through (labelled or failed): the chunks it had to do."""
    todo = {shards.shard_name(i) for i in plan.todo}
    return sum(s["rows"] + s["errors"] for s in manifest["shards"] if s["name"] in todo)


def chunk_source(plan: Plan, index: int, errors: list[dict]) -> Iterable[Record]:
    """The records of chunk ``index``; a tar's are read as they are decoded, its failures
    (bad members, a damaged tar) appended to ``errors``."""
    src = plan.chunk_records(index)
    return webdataset.iter_records(src, errors) if isinstance(src, Location) else src


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
    with output_lock(cfg.run.output, ttl=cfg.run.lease_ttl_s):  # one writer, before any work
        return _run_local(cfg, labeler, records)


def _run_local(cfg: ExtractConfig, labeler: Labeler | None, records: list[Record]) -> dict:
    entry = time.perf_counter()
    labeler = labeler or Labeler(cfg, progress=cfg.run.progress)  # fails fast without weights
    metadata = labeler.metadata()
    plan = plan_run(cfg, metadata, records)
    decoder = Decoder(None if cfg.input.tars else cfg.input.image_root, labeler.preprocess,
                      cfg.input.max_pixels)
    from tqdm.auto import tqdm

    sizes = [plan.chunk_images(i) for i in plan.todo]
    total = None if None in sizes else sum(sizes)
    bar = tqdm(total=total, desc="labelling", unit="img", disable=not cfg.run.progress)
    t0 = time.perf_counter()
    done: list[tuple[int, float]] = []
    for index in plan.todo:
        errors: list[dict] = []

        def counted(batches):
            for b in batches:
                yield b
                bar.update(len(b))

        decoded = counted(prefetch_batches(decoder, chunk_source(plan, index, errors),
                                           cfg.run.batch_size, cfg.run.decode_workers))
        marker = write_chunk(plan.out_dir, index, metadata,
                             label_batches(decoded, labeler, errors), errors=errors,
                             row_group_size=cfg.run.row_group_size, timings=labeler.timings,
                             staging_dir=cfg.run.staging_dir)
        done.append((marker["rows"] + marker["errors"], time.perf_counter() - entry))
    bar.close()
    seconds = time.perf_counter() - t0
    manifest = finish_run(plan, metadata)
    return summarize(plan, manifest, seconds, images_done(plan, manifest), [labeler.report()],
                     timeline(t0 - entry, done))
