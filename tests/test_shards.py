import json
import subprocess
import sys

import numpy as np
import polars as pl
import pyarrow.dataset as pads
import pytest

from pipeline import shards

META = {
    "schema_version": shards.SCHEMA_VERSION, "encoder": "tiny", "weights_tag": "file",
    "weights_sha256": "ab" * 32, "dense_features": "raw", "mode": "sea", "surgery_weights": None,
    "score_sign": -1,
    "templates": [], "wordlist_sha256": "cd" * 32, "wordlist_size": 41241, "top_n": 3,
    "min_score": 0.0, "image_size": [64, 64], "grid": [2, 3],
    "crop": {"resize": 64, "center_crop": [64, 64], "interpolation": "bicubic"},
    "package_version": "0.1.0",
}


def _batch(rng, start, b, grid=(2, 3), n=3):
    p = grid[0] * grid[1]
    ids = rng.integers(0, 41241, size=(b, p, n)).astype(np.uint16)
    scores = rng.random((b, p, n)).astype(np.float16)
    ids[0, 0, 1:] = shards.SENTINEL  # a patch with one kept label
    scores[0, 0, 1:] = 0
    return shards.LabelBatch([f"img{start + i}" for i in range(b)],
                             [f"d/{start + i}.jpg" for i in range(b)], grid, ids, scores)


def _write(path, batches, row_group_size=4):
    w = shards.ShardWriter(path, META, row_group_size=row_group_size)
    for b in batches:
        w.write(b)
    return w.close()


def test_round_trip_exact_and_independent_readers(tmp_path):
    rng = np.random.default_rng(0)
    batches = [_batch(rng, 0, 5), _batch(rng, 5, 2), _batch(rng, 7, 6)]
    path = tmp_path / shards.shard_name(0)
    assert _write(path, batches) == 13
    want_ids = np.concatenate([b.ids for b in batches])
    want_sc = np.concatenate([b.scores for b in batches])
    want_names = sum((b.image_ids for b in batches), [])

    got = list(shards.iter_shard(path, expect={"grid": [2, 3]}, batch_size=4))
    assert [rb.num_rows for rb in got] == [4, 4, 4, 1]  # streamed, not loaded whole
    names, ids, sc = zip(*(shards.batch_arrays(rb, 3) for rb in got), strict=True)
    assert sum(names, []) == want_names
    np.testing.assert_array_equal(np.concatenate(ids), want_ids)
    np.testing.assert_array_equal(np.concatenate(sc), want_sc.astype(np.float32))

    # independent reader 1: polars' own Parquet reader
    df = pl.read_parquet(path)
    assert df["image_id"].to_list() == want_names
    np.testing.assert_array_equal(np.stack(df["label_ids"].to_list()).reshape(want_ids.shape), want_ids)
    np.testing.assert_array_equal(
        np.stack([np.asarray(x, np.float32) for x in df["scores"].to_list()]).reshape(want_sc.shape),
        want_sc.astype(np.float32))
    assert df["grid_h"].unique().to_list() == [2] and df["grid_w"].unique().to_list() == [3]
    # independent reader 2: pyarrow's dataset API
    t = pads.dataset(path, format="parquet").to_table()
    assert t.column("path").to_pylist() == sum((b.paths for b in batches), [])
    # file-level properties: zstd, bounded row groups, metadata present
    import pyarrow.parquet as pq

    md = pq.ParquetFile(path).metadata
    assert md.num_row_groups == 4
    assert md.row_group(0).column(4).compression == "ZSTD"
    assert shards.read_metadata(path) == META


def test_metadata_mismatch_names_field(tmp_path):
    path = tmp_path / shards.shard_name(0)
    _write(path, [_batch(np.random.default_rng(1), 0, 2)])
    with pytest.raises(shards.ShardMismatch, match=r"'wordlist_sha256' is 'cdcd.*but 'ffff"):
        next(shards.iter_shard(path, expect={"wordlist_sha256": "ff" * 32}))
    with pytest.raises(shards.ShardMismatch, match=r"'grid' is \[2, 3\] but \[24, 24\]"):
        next(shards.iter_shard(path, expect={"grid": (24, 24)}))
    with pytest.raises(ValueError, match="lacks"):
        shards.ShardWriter(tmp_path / "x.parquet", {"encoder": "x"})


def test_half_written_shard_is_never_visible(tmp_path):
    """A writer killed before rename leaves nothing a reader (or the manifest) picks up."""
    code = f"""
import os, numpy as np, json
from pipeline import shards
meta = json.loads({json.dumps(json.dumps(META))})
w = shards.ShardWriter({str(tmp_path / shards.shard_name(0))!r}, meta, row_group_size=2)
ids = np.zeros((4, 6, 3), np.uint16); sc = np.zeros((4, 6, 3), np.float16)
w.write(shards.LabelBatch([str(i) for i in range(4)], ['p'] * 4, (2, 3), ids, sc))
os._exit(9)  # killed mid-shard: no close, no rename
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 9, r.stderr
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert leftovers and all(n.startswith(".shard-000000.parquet.tmp") for n in leftovers)
    assert not (tmp_path / shards.shard_name(0)).exists()
    assert shards.list_done(tmp_path) == {}
    m = shards.write_manifest(tmp_path, "h", META, num_chunks=1)
    assert m["shards"] == [] and m["complete"] is False


def test_manifest_and_label_set(tmp_path):
    rng = np.random.default_rng(2)
    for i in range(2):
        p = tmp_path / shards.shard_name(i)
        rows = _write(p, [_batch(rng, 10 * i, 3)])
        shards.write_json_atomic(tmp_path / shards.done_name(i),
                                 {"rows": rows, "bytes": p.stat().st_size, "errors": 0,
                                  "sha256": shards.file_sha256(p)})
    # a shard without its done marker does not count
    _write(tmp_path / shards.shard_name(2), [_batch(rng, 20, 1)])
    m = shards.write_manifest(tmp_path, "cafe", META, num_chunks=3)
    assert [s["name"] for s in m["shards"]] == [shards.shard_name(0), shards.shard_name(1)]
    assert m["rows"] == 6 and not m["complete"] and m["config_hash"] == "cafe"
    rows = sum(rb.num_rows for rb in shards.iter_label_set(tmp_path, expect={"top_n": 3}))
    assert rows == 6
    with pytest.raises(shards.ShardMismatch, match="top_n"):
        list(shards.iter_label_set(tmp_path, expect={"top_n": 10}))
