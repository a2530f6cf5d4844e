"""What every weight loader shares (open_clip's in ``pipeline.encoders``, transformers' CLIP in
``pipeline.hf_clip``): the missing-weights error and the checkpoint file's hash."""

from __future__ import annotations

import os

from wordlist import sha256_file


class WeightsNotFound(RuntimeError):
    pass


_HASH_CACHE: dict[tuple, str] = {}


def file_sha256(path: str) -> str:
    """sha256 of a weight file (``wordlist.sha256_file``, the one hash helper), remembered per
    (path, size, mtime) within the process: several loaders ask for the same file."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = sha256_file(path)
    return _HASH_CACHE[key]
