"""What every weight loader shares (open_clip's in ``pipeline.encoders``, transformers' CLIP in
``pipeline.hf_clip``): the missing-weights error and the checkpoint file's hash."""

from __future__ import annotations

import hashlib
import os


class WeightsNotFound(RuntimeError):
    pass


_HASH_CACHE: dict[tuple, str] = {}


def file_sha256(path: str) -> str:
    """sha256 of a weight file, remembered per (path, size, mtime) within the process."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]
