"""Label shards and webdataset tars read where they live, shards checked on first read.

``LabelFiles`` is the trainer's view of a label run: the manifest is read at start-up (one
small file, whatever the set's size) and trusted for the layout (rows, row groups); each
shard's size, sha256 and metadata are checked the first time this process reads it, so a
damaged or foreign shard is refused naming the file before a row of it is trained on, and a
rank's start-up does not grow with the label set (issue 35). A run in a bucket is read
through ``FileCache``: whole shards copied into ``data.cache_dir`` on first use, evicted least
recently used beyond ``data.cache_limit_gb`` (MosaicML streaming's ``remote``/``local`` model,
sized for shards of tens of MB; Parquet is read from a local file at full speed).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections import OrderedDict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data import BadImage
from pipeline.shards import ShardMismatch, check_metadata, check_shard, read_manifest
from seacore.storage import FileCache, Location, cache_folder, resolve


class LabelFiles:
    """The shards of one label run: layout from the manifest, bytes checked on first read."""

    def __init__(self, shards: str, expect: dict | None = None, cache_dir: str | None = None,
                 cache_limit_gb: float = 20.0):
        self.url = shards
        self.root = resolve(shards)
        manifest = read_manifest(self.root)
        check_metadata(manifest["metadata"], expect or {}, where=f"{shards}/manifest.json")
        self.meta = manifest["metadata"]
        self.entries = manifest["shards"]
        self.cache = None if self.root.local else FileCache(cache_dir, cache_limit_gb, shards)
        self._checked: set[int] = set()  # shards this process has verified
        # shards this node has verified, by (file, size, mtime, recorded sha256): a node's
        # ranks and loader workers hash each shard once, not once each
        self._verified = cache_folder(cache_dir) / "verified"

    def __len__(self) -> int:
        return len(self.entries)

    def name(self, i: int) -> str:
        return str(self.root.child(self.entries[i]["name"]))

    def row_groups(self) -> list[list[int]]:
        """Rows per row group of every shard: from the manifest (written since issue 35), or
        read from the shards' footers for an older run (one small read per shard)."""
        out = []
        for i, e in enumerate(self.entries):
            if e.get("row_groups"):
                out.append(list(e["row_groups"]))
            else:
                md = self._parquet(i, check=False).metadata
                out.append([md.row_group(g).num_rows for g in range(md.num_row_groups)])
        return out

    def paths(self, i: int) -> list[str]:
        """The path column of shard ``i`` (the stage-1 join): only that column's bytes are
        read (ranged reads on a bucket); the shard's checks happen when its labels are."""
        return self._parquet(i, check=False).read(columns=["path"]).column(0).to_pylist()

    def read_row_group(self, i: int, g: int) -> pa.Table:
        return self._parquet(i, check=True).read_row_group(g)

    def _missing(self, i: int) -> ShardMismatch:
        return ShardMismatch(f"{self.name(i)}: file missing (the manifest lists it); rerun the "
                             f"extraction into {self.url} (it redoes missing shards)")

    def _check(self, local: Path, entry: dict) -> None:
        """``check_shard`` once per node: a marker named by the file's path, size, mtime and
        recorded sha256 says this node hashed it (a file rewritten since has another mtime)."""
        st = local.stat()
        key = f"{os.path.realpath(local)}|{st.st_size}|{st.st_mtime_ns}|{entry.get('sha256')}"
        marker = self._verified / hashlib.sha256(key.encode()).hexdigest()[:32]
        if marker.exists():
            return
        check_shard(local, entry, self.meta, rerun=self.url)
        self._verified.mkdir(parents=True, exist_ok=True)
        marker.touch()

    def _parquet(self, i: int, check: bool) -> pq.ParquetFile:
        entry = self.entries[i]
        loc = self.root.child(entry["name"])
        if self.cache is not None and not check and i not in self._checked:
            try:  # layout only: ranged reads of the object
                return pq.ParquetFile(loc.fs.open_input_file(loc.path))
            except FileNotFoundError:
                raise self._missing(i) from None
        for attempt in range(3):  # another process of the node may evict the copy meanwhile
            local = Path(loc.path) if self.cache is None else self.cache.get(loc, entry.get("bytes"))
            try:
                if check and i not in self._checked:
                    try:
                        self._check(local, entry)
                    except ShardMismatch as e:
                        if self.cache is None:
                            raise
                        local.unlink(missing_ok=True)  # fetched again by the next try
                        raise ShardMismatch(f"{loc} (as copied to {local}): {e}") from None
                    self._checked.add(i)
                # opened now: a copy evicted after this keeps reading through the open handle
                return pq.ParquetFile(local)
            except FileNotFoundError:
                if self.cache is None:
                    raise self._missing(i) from None
                if attempt == 2:
                    raise
            except (OSError, pa.ArrowInvalid) as e:
                raise ShardMismatch(f"{self.name(i)}: not readable as Parquet: {e}") from None
        raise AssertionError("unreachable")


class TarImages:
    """Images stored in webdataset tars, named ``<name>.tar/<member>`` under the image root
    (how extraction records them). A tar is indexed once per process (member -> offset, size:
    one pass over its headers); a tar in a bucket is copied whole into the cache first (a tar
    is read mostly whole by an epoch, and per-member requests would each cost a round trip)."""

    def __init__(self, root: Location, cache_dir: str | None, cache_limit_gb: float):
        self.root = root
        self.cache = None if root.local else FileCache(cache_dir, cache_limit_gb, root.url)
        self._index: OrderedDict[str, tuple[Path, dict[str, tuple[int, int]]]] = OrderedDict()

    def __getstate__(self):
        return {**self.__dict__, "_index": OrderedDict()}  # indexes are per process

    def read(self, rel: str) -> bytes | None:
        """The member's bytes, None when ``rel`` names no tar member, BadImage when it cannot
        be read."""
        head, sep, member = rel.partition(".tar/")
        if not sep:
            return None
        name = head + ".tar"
        local, members = self._open(name)
        if member not in members:
            raise BadImage(f"{name} has no member {member}")
        offset, size = members[member]
        try:
            with open(local, "rb") as f:
                f.seek(offset)
                return f.read(size)
        except FileNotFoundError:  # evicted from the cache meanwhile: fetch and index again
            self._index.pop(name, None)
            return self.read(rel)

    def _open(self, name: str):
        if name in self._index:
            self._index.move_to_end(name)
            return self._index[name]
        loc = self.root.child(name)
        try:
            local = Path(loc.path) if self.cache is None else self.cache.get(loc, loc.size())
            with tarfile.open(local, mode="r:") as tf:
                members = {m.name: (m.offset_data, m.size) for m in tf if m.isfile()}
        except (tarfile.TarError, OSError) as e:
            raise BadImage(f"{loc}: unreadable tar: {type(e).__name__}: {e}") from None
        self._index[name] = (local, members)
        if len(self._index) > 8:
            self._index.popitem(last=False)
        return local, members
