"""Writing a file so that a reader (or a rerun after a kill) sees the old file or the new one,
never half of one: the project's one tmp-file-then-rename idiom."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A hidden temporary path beside ``path`` (same folder: the rename stays atomic; the
    process id in its name: concurrent writers never share one) for the caller to write with
    any writer; on success it is fsynced and renamed onto ``path``, on an error removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after the rename


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_of(f) -> str:
    """The project's one hash helper: sha256 of a binary stream read to its end (a local
    file, an object-store stream)."""
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 24), b""):
        h.update(block)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a local file (word lists, shards, checkpoints, weights)."""
    with open(path, "rb") as f:
        return sha256_of(f)
