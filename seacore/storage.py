"""Where data lives: every input and output is a URL (``s3://``, ``gs://``, ``file://``, any
scheme ``pyarrow.fs`` knows) or a plain path, resolved once by ``resolve`` to a ``Location``:
a (filesystem, path) pair of ``pyarrow.fs`` plus the text the user wrote (for messages).

pyarrow.fs rather than fsspec: pyarrow is already a dependency (Parquet), its S3 and GCS
clients ship in its wheel (no s3fs/aiobotocore stack to install on every node), its file
systems pickle (Ray actors and loader workers receive them), and ``copy_files`` uploads with
parallel multipart. Credentials and endpoints come from the usual places: ``AWS_*`` variables
(``AWS_ENDPOINT_URL`` for MinIO, Ceph, R2 or a local test server), ``~/.aws``, instance roles;
``GOOGLE_APPLICATION_CREDENTIALS`` for GCS; or URL parameters
(``s3://bucket/x?endpoint_override=host:9000&scheme=http``).

Local paths keep their POSIX guarantees: writes go to a temporary name, are fsynced and
renamed (``seacore.files``). On an object store a PUT is atomic by itself (the object appears
whole or not at all) but a stream interrupted by an exception is *completed* with what was
written so far (pyarrow closes it): so objects are only ever written from whole bytes or whole
local files (``write_bytes``, ``upload``), never streamed from a computation.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import posixpath
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from seacore.files import atomic_path, sha256_file, sha256_of

_LOCAL = pafs.LocalFileSystem()
_FS: dict[tuple[str, str, str], pafs.FileSystem] = {}  # one client per bucket (its pool)
_FS_LOCK = threading.Lock()


class StorageError(OSError):
    """A location that cannot be used (unknown scheme, no credentials, absent bucket)."""


def is_url(target: str | os.PathLike) -> bool:
    text = str(target)
    return "://" in text and not text.startswith("file://")


@dataclass(frozen=True)
class Location:
    """A file or folder somewhere: ``fs`` and ``path`` for I/O, ``url`` for messages."""

    fs: pafs.FileSystem
    path: str
    url: str

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def __str__(self) -> str:
        return self.url

    def child(self, *parts: str) -> Location:
        rel = "/".join(p.strip("/") for p in parts if p)
        if self.local:
            path = os.path.join(self.path, rel)
            return Location(self.fs, path, os.path.join(self.url, rel))
        return Location(self.fs, posixpath.join(self.path.rstrip("/"), rel),
                        self.url.rstrip("/") + "/" + rel)

    # --- reading -----------------------------------------------------------------------------

    def info(self) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.path)
        except OSError as e:
            raise StorageError(f"{self.url}: {e}") from None

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        if self.local:
            return os.path.isdir(self.path)
        # an object-store "folder" exists once any key lies under it
        return self.info().type == pafs.FileType.Directory

    def size(self) -> int | None:
        info = self.info()
        return info.size if info.type == pafs.FileType.File else None

    def read_bytes(self) -> bytes:
        if self.local:
            return Path(self.path).read_bytes()
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def open(self):
        """A seekable reader (``pyarrow.NativeFile``; Parquet and PIL read it directly)."""
        if self.local:
            return open(self.path, "rb")
        return self.fs.open_input_file(self.path)

    def sha256(self) -> str:
        if self.local:
            return sha256_file(self.path)
        with self.fs.open_input_stream(self.path) as f:
            return sha256_of(f)

    def names(self, pattern: str = "*") -> list[str]:
        """Names directly in this folder matching ``pattern`` (sorted; none if it is absent)."""
        if self.local:
            if not os.path.isdir(self.path):
                return []
            return sorted(n for n in os.listdir(self.path) if fnmatch.fnmatchcase(n, pattern))
        sel = pafs.FileSelector(self.path.rstrip("/"), recursive=False, allow_not_found=True)
        found = [posixpath.basename(i.path) for i in self.fs.get_file_info(sel)
                 if i.type == pafs.FileType.File]
        return sorted(n for n in found if fnmatch.fnmatchcase(n, pattern))

    def walk(self) -> list[str]:
        """Every file below this folder, as sorted paths relative to it."""
        if self.local:
            out = []
            for dirpath, dirnames, filenames in os.walk(self.path):
                dirnames.sort()
                out.extend(os.path.relpath(os.path.join(dirpath, n), self.path)
                           for n in sorted(filenames))
            return out
        base = self.path.rstrip("/") + "/"
        sel = pafs.FileSelector(self.path.rstrip("/"), recursive=True, allow_not_found=True)
        return sorted(i.path[len(base):] for i in self.fs.get_file_info(sel)
                      if i.type == pafs.FileType.File and i.path.startswith(base))

    # --- writing -----------------------------------------------------------------------------

    def write_bytes(self, data: bytes) -> None:
        """All or nothing: a reader sees the old content or the new, never part of it."""
        if self.local:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.path) as tmp:
                tmp.write_bytes(data)
            return
        with self.fs.open_output_stream(self.path) as f:  # one PUT of whole bytes
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def upload(self, src: str | os.PathLike) -> None:
        """Copy a whole local file here (parallel multipart on object stores). A kill midway
        leaves no object (an unfinished multipart upload is not one); the caller verifies the
        result before anything refers to it."""
        if self.local:
            with atomic_path(self.path) as tmp:
                shutil.copyfile(src, tmp)
            return
        pafs.copy_files(os.fspath(src), self.path, source_filesystem=_LOCAL,
                        destination_filesystem=self.fs)

    def download(self, dst: str | os.PathLike) -> None:
        pafs.copy_files(self.path, os.fspath(dst), source_filesystem=self.fs,
                        destination_filesystem=_LOCAL)

    def delete(self) -> None:
        if self.local:
            if os.path.isdir(self.path):
                shutil.rmtree(self.path)
            else:
                Path(self.path).unlink(missing_ok=True)
            return
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self.path)

    def mkdir(self) -> None:
        if self.local:
            os.makedirs(self.path, exist_ok=True)
        # object stores have no folders: a key's prefix is one


def cache_folder(folder: str | None) -> Path:
    """Where copies of remote data and converted inputs go: ``folder`` when given, else
    ``$SEA_CACHE/data``, else the system temp folder's ``sea-cache`` (local disk on most
    cluster nodes, where home directories are often small network mounts)."""
    if folder:
        return Path(folder)
    if os.environ.get("SEA_CACHE"):
        return Path(os.environ["SEA_CACHE"]) / "data"
    import tempfile

    return Path(tempfile.gettempdir()) / "sea-cache"


class FileCache:
    """A folder of whole copies of remote files, shared by the processes of a node (each copy
    written under a temporary name and renamed, so readers never see half), bounded to
    ``limit_gb`` by evicting the least recently used (unbounded with None)."""

    def __init__(self, folder: str | None, limit_gb: float | None, key: str):
        # one subfolder per source (a label run, a tar folder, a weights URL): no collisions
        self.dir = cache_folder(folder) / hashlib.sha256(key.encode()).hexdigest()[:16]
        self.limit = None if limit_gb is None else int(limit_gb * (1 << 30))
        self._lock = threading.Lock()

    def get(self, loc: Location, size: int | None) -> Path:
        """A local copy of ``loc`` (downloaded when absent or of another size)."""
        dst = self.dir / loc.name
        with self._lock:
            try:
                st = dst.stat()
                if size is None or st.st_size == size:
                    # recently used: evicted last. The access time carries it; the mtime stays
                    # the download's (it keys the node's verification marker, LabelFiles._check)
                    os.utime(dst, ns=(time.time_ns(), st.st_mtime_ns))
                    return dst
            except FileNotFoundError:
                pass
            if self.limit is not None and size is not None and size > self.limit:
                raise ValueError(f"{loc} is {size / (1 << 30):.2f} GB, more than "
                                 f"data.cache_limit_gb={self.limit / (1 << 30):g} holds; raise it "
                                 f"(two shards or tars per loader worker is ample)")
            self.dir.mkdir(parents=True, exist_ok=True)
            if self.limit is not None:
                self._evict(need=size or 0, keep=dst.name)
            with atomic_path(dst) as tmp:
                loc.download(tmp)
            return dst

    def _evict(self, need: int, keep: str) -> None:
        files = []
        for p in self.dir.iterdir():
            if p.name.startswith(".") or p.name == keep:
                continue
            try:
                st = p.stat()
            except FileNotFoundError:
                continue  # evicted by another process meanwhile
            files.append((st.st_atime, st.st_size, p))
        used = sum(s for _, s, _ in files)
        for _, s, p in sorted(files):
            if used + need <= self.limit:
                break
            p.unlink(missing_ok=True)  # a reader holding it open keeps reading (POSIX)
            used -= s


def fetch(url: str, folder: str | None = None) -> Path:
    """A local copy of the file at ``url`` (a tower checkpoint in a bucket, say), downloaded
    once into the cache folder and reused while the object keeps its size; a local path is
    returned as it is."""
    loc = resolve(url)
    if loc.local:
        return Path(loc.path)
    size = loc.size()
    if size is None:
        raise FileNotFoundError(f"{url} does not exist")
    return FileCache(folder, None, loc.url).get(loc, size)


def _remote_fs(url: str) -> tuple[pafs.FileSystem, str]:
    parts = urlsplit(url)
    key = (parts.scheme, parts.netloc, parts.query)
    with _FS_LOCK:
        fs = _FS.get(key)
        if fs is None:
            try:
                fs, path = pafs.FileSystem.from_uri(url)
            except (OSError, ValueError) as e:
                raise StorageError(f"{url}: {e} (credentials and endpoint: AWS_* / "
                                   f"GOOGLE_APPLICATION_CREDENTIALS, docs/cloud.md)") from None
            _FS[key] = fs
            return fs, path.rstrip("/")
    return fs, (parts.netloc + parts.path).rstrip("/")


def resolve(target: str | os.PathLike | Location) -> Location:
    """A URL or path -> Location. Plain and ``file://`` paths become absolute local paths."""
    if isinstance(target, Location):
        return target
    text = os.fspath(target)
    if text.startswith("file://"):
        text = urlsplit(text).path
    if "://" not in text:
        return Location(_LOCAL, os.path.abspath(text), text)
    fs, path = _remote_fs(text)
    return Location(fs, path, text.rstrip("/"))
