"""Inputs: image records from a LLaVA-format JSON or a folder, and robust image decoding.

A record is (image_id, relative path). Every path must resolve inside the image root; one
that escapes it (``../``, an absolute path, a symlink out) is an input error recorded
against the image, never a read.

Decoding (``load_rgb``) applies EXIF orientation and brings every mode to 8-bit RGB:
16-bit and 32-bit grayscale are rescaled by their range (PIL's plain ``convert`` would clip
them to white), transparency is composited on white, CMYK/palette/LA/grayscale converted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class BadImage(Exception):
    """An image that cannot be used; the message is the reason recorded in errors.jsonl."""


@dataclass(frozen=True)
class Record:
    image_id: str
    path: str  # relative to the image root, as given


def records_from_json(json_path: str | Path) -> list[Record]:
    """LLaVA format: a list of {id, image, conversations}. Entries without an image are
    skipped (stage-2 mixes have text-only samples); duplicates of an image id are kept once."""
    with open(json_path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{json_path}: expected a JSON list of samples")
    out, seen = [], set()
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise ValueError(f"{json_path}: entry {i} is not an object")
        image = item.get("image")
        if not image:
            continue
        image_id = str(item.get("id", image))
        if image_id in seen:
            continue
        seen.add(image_id)
        out.append(Record(image_id, str(image)))
    return out


def records_from_folder(root: str | Path) -> list[Record]:
    """Every image file under ``root`` (recursive, sorted, so the order is stable)."""
    root = Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if Path(name).suffix.lower() in IMAGE_EXTS:
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                found.append(Record(rel, rel))
    return found


def resolve_inside(root: str | Path, rel: str) -> Path:
    root_real = Path(os.path.realpath(root))
    if os.path.isabs(rel):
        raise BadImage(f"path is absolute, must be relative to the image root: {rel}")
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


def load_rgb(path: Path, max_pixels: int) -> Image.Image:
    """Open, check, orient and convert one image; raise BadImage with the reason."""
    try:
        if path.stat().st_size == 0:
            raise BadImage("empty file (0 bytes)")
    except FileNotFoundError:
        raise BadImage("file not found") from None
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not grey pixels
    try:
        with Image.open(path) as img:
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
