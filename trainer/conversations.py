"""The LLaVA JSON as training reads it: converted once into an Arrow file and memory-mapped.

LLaVA's JSON lists are large (558k captions; 665k multi-turn conversations, about 1 GB) and
every rank used to parse it into Python objects and hand a copy to each loader worker (a
Python list of dicts is copied page by page after a fork: reference counts write to it). Here
the first start of a node converts the JSON into ``<data.cache_dir>/conversations-<key>.arrow``
(one row per entry: its JSON text and its normalised image path, plus a path index); every
rank and loader worker then maps that file, so a node holds the conversations once, in the
page cache, and a start after the first parses nothing. ``key`` is the JSON's URL, size and
modification time: a changed JSON is converted again.

An image is found by a 64-bit hash of its normalised path (``numpy.searchsorted`` over the
sorted hashes, the path itself compared to rule out a collision); an image named by several
entries maps to the first, as LLaVA's loader reads it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.data import normalize_path, read_json_list
from seacore.files import atomic_path
from seacore.storage import cache_folder, resolve

VERSION = 1


def path_hash(paths: list[str]) -> np.ndarray:
    """64-bit keys of normalised image paths (blake2b: stable across processes and runs)."""
    return np.array([int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "little")
                     for p in paths], dtype=np.uint64)


def _cache_file(url: str, cache_dir: str | None) -> Path:
    info = resolve(url).info()
    mtime = info.mtime_ns if info.mtime_ns is not None else 0
    key = hashlib.sha256(f"{VERSION}|{url}|{info.size}|{mtime}".encode()).hexdigest()[:16]
    return cache_folder(cache_dir) / f"conversations-{key}.arrow"


def _convert(url: str, dst: Path) -> None:
    data = read_json_list(url, "data.json")  # errors name data.json, the file and the fix
    images = [normalize_path(it["image"]) if it.get("image") else "" for it in data]
    first: dict[str, int] = {}
    for i, p in enumerate(images):
        if p:
            first.setdefault(p, i)
    keys = path_hash(list(first))
    rows = np.fromiter(first.values(), dtype=np.int64, count=len(first))
    order = np.argsort(keys, kind="stable")
    n = len(data)
    pad = n - len(first)  # the index columns are as long as the table: padded at the end
    table = pa.table({
        "json": pa.array([json.dumps(it, ensure_ascii=False) for it in data], pa.large_string()),
        "image": pa.array(images, pa.string()),
        "key": pa.array(np.concatenate([keys[order], np.full(pad, np.iinfo(np.uint64).max,
                                                                np.uint64)])),
        "key_row": pa.array(np.concatenate([rows[order], np.full(pad, -1, np.int64)])),
    }).replace_schema_metadata({"indexed": str(len(first)),
                                "with_image": str(sum(1 for p in images if p))})
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp, pa.OSFile(str(tmp), "wb") as sink, \
            pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=1 << 16)


class Conversations:
    """One LLaVA-format JSON, read-only: entries by index, images by path (see module)."""

    def __init__(self, url: str, cache_dir: str | None = None):
        self.url = url
        self.file = _cache_file(url, cache_dir)
        if not self.file.is_file():
            _convert(url, self.file)
        self._map()

    def _map(self) -> None:
        table = pa.ipc.open_file(pa.memory_map(str(self.file), "r")).read_all()
        self._json = table.column("json")
        self._image = table.column("image")
        indexed = int(table.schema.metadata[b"indexed"])
        # zero-copy views of the mapped file: nothing is copied per process
        self._keys = table.column("key").to_numpy()[:indexed]
        self._rows = table.column("key_row").to_numpy()[:indexed]
        self.with_image = int(table.schema.metadata[b"with_image"])

    def __getstate__(self):
        return {"url": self.url, "file": self.file}  # a worker maps the file itself

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._map()

    def __len__(self) -> int:
        return len(self._json)

    def item(self, i: int) -> dict:
        return json.loads(self._json[i].as_py())

    def images(self) -> list[str]:
        """Every entry's normalised image path ("" for a text-only entry)."""
        return self._image.to_pylist()

    def find(self, paths: list[str]) -> np.ndarray:
        """Entry index of each normalised image path, -1 where no entry names it."""
        keys = path_hash(paths)
        out = np.full(len(paths), -1, dtype=np.int64)
        if not len(self._keys) or not len(paths):
            return out
        at = np.searchsorted(self._keys, keys)
        near = np.minimum(at, len(self._keys) - 1)
        hit = np.flatnonzero(self._keys[near] == keys)
        out[hit] = self._rows[near[hit]]
        names = self._image.take(pa.array(out[hit])).to_pylist()
        for j, name in zip(hit, names):
            if name != paths[j]:  # a 64-bit collision: look through the equal keys
                out[j] = -1
                a = int(at[j])
                while a < len(self._keys) and self._keys[a] == keys[j]:
                    if self._image[int(self._rows[a])].as_py() == paths[j]:
                        out[j] = self._rows[a]
                        break
                    a += 1
        return out
