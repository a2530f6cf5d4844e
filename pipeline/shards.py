"""The label-shard contract: one definition used by the pipeline (writer) and trainer (reader).

Layout of ``shards/<run>/``:
  shard-000000.parquet   one row per image (schema below), zstd, bounded row groups
  shard-000000.done      JSON written last: rows, bytes, sha256 of the shard, errors
  manifest.json          shards (rows, bytes, sha256), config hash and the shared metadata
  errors.jsonl           images that could not be used, with the reason

Row schema (``SCHEMA``):
  image_id  string     the JSON ``id`` or the path relative to the image root
  path      string     relative to the image root
  grid_h    uint16     patch grid height
  grid_w    uint16     patch grid width
  label_ids list<uint16>   grid_h*grid_w*n ids, patch-major (row by row), best label first;
                           SENTINEL (65535) where fewer than n labels were kept
  scores    list<float16>  same length; the mode's signed score, 0 in sentinel slots

The kept-label count per patch is not stored: it is ``(ids != SENTINEL).sum(-1)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from seacore.files import sha256_file as file_sha256  # noqa: F401 (public: a shard's hash)
from seacore.storage import Location, resolve

SCHEMA_VERSION = 2
SENTINEL = 65535
META_KEY = b"sea_labels"
MANIFEST = "manifest.json"

SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=False),
    pa.field("grid_h", pa.uint16(), nullable=False),
    pa.field("grid_w", pa.uint16(), nullable=False),
    pa.field("label_ids", pa.list_(pa.uint16()), nullable=False),
    pa.field("scores", pa.list_(pa.float16()), nullable=False),
])

# Fields every shard's metadata carries. Readers compare any subset of them.
META_FIELDS = (
    "schema_version", "encoder", "weights_tag", "weights_sha256", "dense_features", "mode",
    "surgery_weights", "score_sign", "templates", "wordlist_sha256", "wordlist_size", "top_n", "min_score",
    "image_size", "grid", "crop", "package_version",
)


class ShardMismatch(ValueError):
    """A shard made under other settings than the caller expects."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.parquet"


def done_name(index: int) -> str:
    return f"shard-{index:06d}.done"


def _normalise(value):
    # JSON round trip so tuples and lists compare equal
    return json.loads(json.dumps(value))


def check_metadata(meta: dict, expect: dict, where: str = "shard") -> None:
    for key, want in expect.items():
        got = meta.get(key, "<missing>")
        if _normalise(got) != _normalise(want):
            raise ShardMismatch(f"{where}: metadata field '{key}' is {_normalise(got)!r} but "
                                f"{_normalise(want)!r} was expected")


@dataclass
class LabelBatch:
    """Rows for one write: ids (B, P, n) uint16, scores (B, P, n) float16."""

    image_ids: list[str]
    paths: list[str]
    grid: tuple[int, int]
    ids: np.ndarray
    scores: np.ndarray

    def to_arrow(self) -> pa.RecordBatch:
        b, p, n = self.ids.shape
        if p != self.grid[0] * self.grid[1]:
            raise ValueError(f"{p} patches do not fill a {self.grid} grid")
        offsets = pa.array(np.arange(0, (b + 1) * p * n, p * n, dtype=np.int32))
        ids = pa.ListArray.from_arrays(offsets, pa.array(self.ids.reshape(-1), pa.uint16()))
        sc = pa.ListArray.from_arrays(offsets, pa.array(self.scores.reshape(-1), pa.float16()))
        return pa.RecordBatch.from_arrays([
            pa.array(self.image_ids, pa.string()), pa.array(self.paths, pa.string()),
            pa.array(np.full(b, self.grid[0], np.uint16)), pa.array(np.full(b, self.grid[1], np.uint16)),
            ids, sc], schema=SCHEMA)


class ShardWriter:
    """Writes one shard to a temporary name; ``close()`` renames it into place.

    A process killed before ``close()`` leaves only ``.shard-*.tmp*`` files, which readers
    never list and the next run removes.
    """

    def __init__(self, path: str | Path, metadata: dict, row_group_size: int = 256):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        missing = [k for k in META_FIELDS if k not in metadata]
        if missing:
            raise ValueError(f"shard metadata lacks {missing}")
        schema = SCHEMA.with_metadata({META_KEY: json.dumps(metadata, sort_keys=True).encode()})
        self.row_group_size = row_group_size
        self._writer = pq.ParquetWriter(self.tmp, schema, compression="zstd",
                                        compression_level=3, use_dictionary=["image_id", "path"])
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0
        self.rows = 0
        self.row_groups: list[int] = []  # rows per row group: the trainer's blocks, from the manifest

    def write(self, batch: LabelBatch | pa.RecordBatch) -> None:
        rb = batch.to_arrow() if isinstance(batch, LabelBatch) else batch
        self._pending.append(rb)
        self._pending_rows += rb.num_rows
        self.rows += rb.num_rows
        # Buffer to whole row groups: memory stays at one row group (~6 MB at 576x10x256).
        while self._pending_rows >= self.row_group_size:
            self._flush(self.row_group_size)

    def _flush(self, rows: int) -> None:
        table = pa.Table.from_batches(self._pending)
        self._writer.write_table(table.slice(0, rows), row_group_size=rows)
        self.row_groups.append(rows)
        rest = table.slice(rows)
        self._pending = rest.to_batches()
        self._pending_rows = rest.num_rows

    def close(self) -> int:
        if self._pending_rows:
            self._flush(self._pending_rows)
        self._writer.close()
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)
        return self.rows

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self.tmp.unlink(missing_ok=True)


def _parquet(path: str | Path | Location) -> pq.ParquetFile:
    if isinstance(path, Location):
        return pq.ParquetFile(path.path if path.local else path.fs.open_input_file(path.path))
    return pq.ParquetFile(path)


def read_metadata(path: str | Path | Location) -> dict:
    md = _parquet(path).schema_arrow.metadata or {}
    if META_KEY not in md:
        raise ShardMismatch(f"{path}: not a SEA label shard (no '{META_KEY.decode()}' metadata)")
    return json.loads(md[META_KEY])


def iter_shard(path: str | Path, expect: dict | None = None, batch_size: int = 256,
               columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
    """Stream a shard's record batches after checking its metadata against ``expect``."""
    meta = read_metadata(path)
    check_metadata(meta, expect or {}, where=str(path))
    pf = _parquet(path)
    yield from pf.iter_batches(batch_size=batch_size, columns=columns)


def batch_arrays(rb: pa.RecordBatch, top_n: int):
    """RecordBatch -> (image_ids, ids (B, P, n) uint16, scores (B, P, n) float32)."""
    ids_col = rb.column("label_ids")
    sc_col = rb.column("scores")
    b = rb.num_rows
    ids = ids_col.values.to_numpy(zero_copy_only=False).reshape(b, -1, top_n)
    scores = sc_col.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(b, -1, top_n)
    return rb.column("image_id").to_pylist(), ids, scores


# --- the directory level (a local folder or a bucket prefix: ``seacore.storage``) ----------


def shard_damage(path: str | Path | Location, entry: dict, hash: bool = True) -> str | None:
    """What is wrong with a shard file against its marker/manifest entry (None: intact).
    Without ``hash`` only presence and size are checked (a listing, no read)."""
    loc = resolve(path)
    size = loc.size()
    if size is None:
        return "file missing"
    if not entry.get("sha256"):
        return "no sha256 recorded (written before checksums)"
    if size != entry.get("bytes"):
        return f"size {size} bytes, {entry.get('bytes')} recorded (truncated or replaced)"
    if hash and loc.sha256() != entry["sha256"]:
        return "sha256 differs from the recorded one (altered or damaged)"
    return None


def list_done(out_dir: str | Path | Location, verify: bool | str = False) -> dict[int, dict]:
    """Completed chunks: index -> done-marker content. Only shards with a readable marker
    and their file present count; ``verify="size"`` also needs the recorded size (a listing),
    ``verify=True`` / ``"all"`` the recorded sha256 too (reads every shard)."""
    out = resolve(out_dir)
    done = {}
    names = out.names("shard-*")  # one listing
    present = {n for n in names if n.endswith(".parquet")}
    for name in (n for n in names if n.endswith(".done")):
        index = int(name.split("-")[1].split(".")[0])
        try:
            content = json.loads(out.child(name).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, FileNotFoundError):
            continue  # a marker cut short by a crash (or gone since the listing): redone
        if shard_name(index) not in present:
            continue
        if verify and shard_damage(out.child(shard_name(index)), content,
                                   hash=verify in (True, "all")):
            continue
        done[index] = content
    return done


def write_json_atomic(path: str | Path | Location, obj) -> None:
    resolve(path).write_text(json.dumps(obj, indent=2, sort_keys=True))


def write_manifest(out_dir: str | Path | Location, config_hash: str, metadata: dict,
                   num_chunks: int) -> dict:
    out = resolve(out_dir)
    done = list_done(out)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "config_hash": config_hash,
        "metadata": metadata,
        "num_chunks": num_chunks,
        "complete": len(done) == num_chunks,
        "shards": [{"name": shard_name(i), "rows": d["rows"], "bytes": d["bytes"],
                    "sha256": d.get("sha256"), "errors": d.get("errors", 0), "kept_labels": d.get("kept_labels", 0),
                    "patches": d.get("patches", 0), "row_groups": d.get("row_groups")}
                   for i, d in sorted(done.items())],
        "rows": sum(d["rows"] for d in done.values()),
    }
    write_json_atomic(out.child(MANIFEST), manifest)
    return manifest


def read_manifest(out_dir: str | Path | Location) -> dict:
    loc = resolve(out_dir).child(MANIFEST)
    try:
        return json.loads(loc.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{out_dir} has no {MANIFEST}: not a finished label run") from None


def open_label_set(out_dir: str | Path | Location, expect: dict | None = None,
                   verify: bool = True) -> tuple[dict, list]:
    """Check a run directory's manifest against ``expect``; return (metadata, shards): local
    paths for a local run, ``Location``s for one in a bucket. With ``verify`` every shard is
    checked against the manifest (size, sha256) and its own metadata against the run's, so a
    damaged or foreign shard is refused naming the file. The trainer passes ``verify=False``
    and checks each shard when it first reads it (``trainer.cache``): its start-up does not
    grow with the label set."""
    manifest = read_manifest(out_dir)
    check_metadata(manifest["metadata"], expect or {}, where=f"{out_dir}/{MANIFEST}")
    root = resolve(out_dir)
    paths = [Path(root.child(s["name"]).path) if root.local else root.child(s["name"])
             for s in manifest["shards"]]
    if verify:
        for path, entry in zip(paths, manifest["shards"], strict=True):
            check_shard(path, entry, manifest["metadata"], rerun=out_dir)
    return manifest["metadata"], paths


def check_shard(path, entry: dict, run_meta: dict, rerun) -> None:
    """A shard against its manifest entry (size, sha256) and the run's metadata, or
    ShardMismatch naming the file and the fix."""
    why = shard_damage(path, entry)
    if why:
        raise ShardMismatch(f"{path}: {why}; rerun the extraction into {rerun} (it "
                            f"checks every shard and redoes damaged ones)")
    meta = {k: v for k, v in run_meta.items() if k != "package_version"}
    check_metadata(read_metadata(path), meta, where=str(path))


def check_values(ids: np.ndarray, scores: np.ndarray, wordlist_size: int, where: str) -> None:
    """Label values a reader must never train on: ids past the word list (other than the
    sentinel) and non-finite scores."""
    bad = (ids >= wordlist_size) & (ids != SENTINEL)
    if bad.any():
        raise ShardMismatch(f"{where}: field 'label_ids' holds {int(ids[bad].max())}, past the "
                            f"word list ({wordlist_size} words) and not the sentinel {SENTINEL}")
    if not np.isfinite(scores).all():
        raise ShardMismatch(f"{where}: field 'scores' holds {int((~np.isfinite(scores)).sum())} "
                            f"non-finite value(s)")


def iter_label_set(out_dir: str | Path, expect: dict | None = None, batch_size: int = 256):
    """Stream every record batch of a run, shard by shard, each shard's metadata checked."""
    meta, paths = open_label_set(out_dir, expect)
    for p in paths:
        yield from iter_shard(p, expect=expect or {}, batch_size=batch_size)
