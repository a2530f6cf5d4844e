"""Inputs: image records from a LLaVA-format JSON or a folder, and robust image decoding.

A record is (image_id, relative path). Every path must resolve inside the image root; one
that escapes it (``../``, an absolute path, a symlink out) is an input error recorded
against the image, never a read.

Decoding (``load_rgb``) applies EXIF orientation and brings every mode to 8-bit RGB:
16-bit and 32-bit grayscale are rescaled by their range (PIL's plain ``convert`` would clip
them to white), transparency is composited on white, CMYK/palette/LA/grayscale converted.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from seacore.storage import Location, resolve

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# the one default image-size limit (PIL's own decompression-bomb threshold): extraction's
# input.max_pixels, the trainer's reader, generate and the viewing tools all start from it
MAX_PIXELS = 89_478_485


class BadImage(Exception):
    """An image that cannot be used; the message is the reason recorded in errors.jsonl."""


class InputError(ValueError):
    """The input list itself is unusable (missing, empty, malformed): nothing can run."""


@dataclass(frozen=True)
class Record:
    image_id: str
    path: str  # relative to the image root, normalised (``normalize_path``): the join key
    error: str | None = None  # an input error (duplicate or null id): recorded, never read
    data: bytes | None = None  # the encoded image itself (a webdataset tar member)


def normalize_path(path: str) -> str:
    """The join key of an image in both stages: its path relative to the image root with
    ``./``, ``//`` and ``a/../`` folded, so a JSON's ``./x/1.jpg`` and a folder walk's
    ``x/1.jpg`` are the same image. Escaping paths stay escaping (refused at read time)."""
    path = str(path)
    # normpath only changes a path with an empty, "." or ".." component or a trailing slash;
    # skipping it otherwise keeps the trainer's start-up join cheap (microseconds per row)
    if path.startswith(".") or "/." in path or "//" in path or path.endswith("/") or not path:
        return os.path.normpath(path)
    return path


def read_json_list(json_path: str | Path | Location, key: str) -> list:
    """A LLaVA-format JSON list (a path or a URL), or an InputError naming ``key``, the file
    and what is wrong."""
    p = resolve(json_path)
    if not p.is_file():
        raise InputError(f"{key}: {p} does not exist (set {key}=/path/to/data.json)")
    text = p.read_text()
    if not text.strip():
        raise InputError(f"{key}: {p} is empty; expected a JSON list of samples")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{key}: {p} is not valid JSON: {e.msg} at line {e.lineno} "
                         f"column {e.colno}") from None
    if not isinstance(data, list):
        raise InputError(f"{key}: {p} is not a list of samples (its top level is a "
                         f"{type(data).__name__}); LLaVA's format is [{{id, image, conversations}}, ...]")
    if not data:
        raise InputError(f"{key}: {p} has no samples (an empty list)")
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise InputError(f"{key}: {p}: entry {i} is not an object")
    return data


def records_from_json(json_path: str | Path) -> list[Record]:
    """LLaVA format: a list of {id, image, conversations}. Entries without an image are
    skipped (stage-2 mixes have text-only samples); an image listed again (the same sample
    twice, or several conversations about one image) is labelled once. An ``id`` naming two
    different images, or a null ``id``, is an input error recorded against the later entry.
    A missing ``id`` is the image path."""
    data = read_json_list(json_path, "input.json")
    out: list[Record] = []
    paths: set[str] = set()
    ids: dict[str, str] = {}
    for item in data:
        image = item.get("image")
        if not image:
            continue
        path = normalize_path(image)
        if "id" in item and item["id"] is None:
            out.append(Record("null", path, "id is null; give every sample an id"))
            continue
        image_id = str(item.get("id", image))
        if image_id in ids and ids[image_id] != path:
            out.append(Record(image_id, path, f"duplicate id {image_id!r}: already names "
                                              f"{ids[image_id]}; ids must be unique per image"))
            continue
        ids.setdefault(image_id, path)
        if path in paths:
            continue
        paths.add(path)
        out.append(Record(image_id, path))
    if not out:
        raise InputError(f"input.json: {json_path}: no sample has an 'image' ({len(data)} entries)")
    return out


def records_from_folder(root: str | Path | Location) -> list[Record]:
    """Every image file under ``root`` (recursive, sorted, so the order is stable); a bucket
    prefix is listed like a folder."""
    return [Record(rel, rel) for rel in resolve(root).walk()
            if os.path.splitext(rel)[1].lower() in IMAGE_EXTS]


def resolve_inside(root: str | Path | Location, rel: str) -> Path | Location:
    """Where image ``rel`` lives under ``root``, or BadImage when the path leaves the root.
    Local roots resolve symlinks (one pointing out is refused); an object store has none, so
    its check is on the text (no absolute path, no ``..`` above the root)."""
    if os.path.isabs(rel):
        raise BadImage(f"path is absolute, must be relative to the image root: {rel}")
    loc = resolve(root) if not isinstance(root, Path) else None
    if loc is not None and not loc.local:
        norm = posixpath.normpath(rel)
        if norm == ".." or norm.startswith("../"):
            raise BadImage(f"path escapes the image root: {rel}")
        return loc.child(norm)
    root_real = Path(os.path.realpath(loc.path if loc is not None else root))
    full = Path(os.path.realpath(root_real / rel))
    if full != root_real and root_real not in full.parents:
        raise BadImage(f"path escapes the image root: {rel}")
    return full


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = (0.0, 65535.0) if mode.startswith("I;16") else (float(a.min()), float(a.max()))
        a = np.clip((a - lo) / max(hi - lo, 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, img).convert("RGB")
    return img.convert("RGB") if mode != "RGB" else img


def load_rgb(path: Path | Location, max_pixels: int) -> Image.Image:
    """Open, check, orient and convert one image (a local file, or an object read whole in
    one request); raise BadImage with the reason."""
    if isinstance(path, Location) and not path.local:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BadImage("file not found") from None
        except OSError as e:
            raise BadImage(f"cannot read: {e}") from None
        return decode_bytes(data, max_pixels)
    path = Path(path.path) if isinstance(path, Location) else path
    try:
        if path.stat().st_size == 0:
            raise BadImage("empty file (0 bytes)")
    except FileNotFoundError:
        raise BadImage("file not found") from None
    return _decode(path, max_pixels)


def decode_bytes(data: bytes, max_pixels: int) -> Image.Image:
    """``load_rgb`` for an image already in memory (a tar member, an object)."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    return _decode(io.BytesIO(data), max_pixels)


def _decode(source, max_pixels: int) -> Image.Image:
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not grey pixels
    try:
        with Image.open(source) as img:
            w, h = img.size
            if w * h > max_pixels:
                raise BadImage(f"decompression bomb guard: {w}x{h} = {w * h} pixels > {max_pixels}")
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except BadImage:
        raise
    except Image.DecompressionBombError as e:
        raise BadImage(f"decompression bomb guard: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"cannot decode: {type(e).__name__}: {e}") from None
