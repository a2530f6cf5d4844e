"""Webdataset tars as input (img2dataset's output layout): ``00000.tar`` holding
``000000001.jpg``, ``000000001.json``, ``000000001.txt``, ... Members sharing a key (the
member path up to the first dot of its name: webdataset's ``__key__``) form one sample.

One tar is one chunk of the label run (img2dataset's shards are sized for that: 10k images),
read front to back in one pass from wherever it lives: a bucket needs no listing of members
and no shared filesystem. The image of key ``k`` in ``00000.tar`` is recorded as path
``00000.tar/000000001.jpg`` (the join key the trainer reads back with ``TarImages``) and
image id ``k``. A member that is not an image, a key without an image, a member that does not
decode, and a tar that cannot be read (to its end) are errors of the run (``errors.jsonl``);
what a damaged tar held before the damage is labelled.

Written here rather than taken from the ``webdataset`` package: its readers are built for
streaming training batches (pipes, shuffling, retry handlers), while extraction needs the
member grouping only, with each failure kept as an error record; the layout is the contract.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator

from pipeline.data import IMAGE_EXTS, InputError, Record
from seacore.storage import Location, resolve

# img2dataset writes .jpg; webdataset's own decoders know these too
_PREFERRED = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand(pattern: str) -> list[str]:
    """webdataset's shard notation: ``s3://b/{00000..00009}.tar`` -> ten URLs (zero padding
    kept). One range per pattern (img2dataset writes one)."""
    m = _BRACES.search(pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo)
    return [pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():]
            for i in range(int(lo), int(hi) + 1)]


def list_tars(spec: str) -> list[tuple[Location, int]]:
    """The tars of ``input.tars``: a brace pattern, one ``.tar``, or a folder (its ``*.tar``
    files, sorted) -> [(location, size)]. Sizes come from one listing (or one lookup per
    named tar): they enter the run's identity, so a replaced tar is noticed."""
    if _BRACES.search(spec) or spec.endswith(".tar"):
        out = []
        for url in expand(spec):
            loc = resolve(url)
            size = loc.size()
            if size is None:
                raise InputError(f"input.tars: {url} does not exist (from {spec})")
            out.append((loc, size))
        return out
    folder = resolve(spec)
    names = folder.names("*.tar")
    if not names:
        raise InputError(f"input.tars: {spec} holds no .tar files (set input.tars to a folder "
                         f"of webdataset tars, a .tar, or a pattern like .../{{00000..00099}}.tar)")
    return [(folder.child(n), folder.child(n).size()) for n in names]


def _key(member: str) -> tuple[str, str]:
    """(key, extension) as webdataset splits them: at the first dot of the file name."""
    slash = member.rfind("/")
    dot = member.find(".", slash + 1)
    if dot < 0:
        return member, ""
    return member[:dot], member[dot:].lower()


def iter_records(tar: Location, errors: list[dict]) -> Iterator[Record]:
    """The samples of one tar in member order, each image's bytes attached; failures appended
    to ``errors`` as (image_id, path, reason)."""
    name = tar.name

    def sample(key: str, members: dict[str, tuple[str, bytes]]) -> Record | None:
        for ext in _PREFERRED:
            if ext in members:
                member, data = members[ext]
                return Record(key.rsplit("/", 1)[-1], f"{name}/{member}", data=data)
        errors.append({"image_id": key.rsplit("/", 1)[-1], "path": f"{name}/{key}",
                       "reason": f"no image member in the tar (has: "
                                 f"{', '.join(sorted(members)) or 'nothing'})"})
        return None

    key, members = None, {}
    try:
        size = tar.size()
        with tar.open() as raw, tarfile.open(fileobj=raw, mode="r|") as tf:
            for info in tf:
                if not info.isfile():
                    continue
                k, ext = _key(info.name)
                if k != key:
                    if key is not None and (r := sample(key, members)) is not None:
                        yield r
                    key, members = k, {}
                if ext in IMAGE_EXTS:
                    members[ext] = (info.name, tf.extractfile(info).read())
                else:
                    members[ext] = (info.name, b"")  # captions/metadata: not needed to label
            # tarfile ends quietly at a header cut short; a whole tar ends with two zero
            # blocks after its last member
            if size is not None and size - tf.offset < 1024:
                raise tarfile.ReadError(f"cut short: {size} bytes, no end-of-archive marker "
                                        f"after the member ending at byte {tf.offset}")
    except (tarfile.TarError, OSError, EOFError) as e:
        errors.append({"image_id": name, "path": name,
                       "reason": f"unreadable tar: {type(e).__name__}: {e}"})
    if key is not None and (r := sample(key, members)) is not None:
        yield r
