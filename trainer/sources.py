"""Where the training samples come from: two sources behind one interface.

- ``LabelledSource`` (stage 1 with labels): the stream is the labelled images, in the label
  run's order, that the JSON also names (their caption is the target).
- ``ConversationSource`` (stage 2, or no labels): the stream is the JSON, text-only entries
  included; labels are attached where the label run has the image.

Both cut their stream into ``Block``s (a shard's row group, or a slice of the JSON) and turn a
block into rows and a row into a sample (``try_sample``). Start-up reads the label run's
manifest, the conversation store (``trainer.conversations``: the JSON converted once per node
and memory-mapped, so no worker holds it as Python objects) and, for stage 1's join, the
shards' path column; it hashes no shard and looks up no image (issue 35). Each shard is
checked when a process first reads its labels (``trainer.cache``); an image that cannot be
read is found when its batch is made and counted against ``data.max_error_rate``.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.data import (
    MAX_PIXELS,
    BadImage,
    decode_bytes,
    load_rgb,
    normalize_path,
    resolve_inside,
)
from pipeline.shards import ShardMismatch, check_values
from seacore.storage import resolve
from trainer.cache import LabelFiles, TarImages
from trainer.conversations import Conversations, path_hash
from trainer.prompts import build_sample


@dataclass(frozen=True)
class Block:
    shard: int  # index into the shard list, -1 for JSON slices
    group: int  # row group index, or slice start in the JSON list
    rows: int  # rows used (after ``skip``)
    first_row: int  # global row index (manifest order) of the first row used
    skip: int = 0  # leading rows of the group left out (held out for evaluation)


class Source:
    """What both sources share: the conversations, the images, the label files; picklable
    (a loader worker maps the conversation store and opens files itself)."""

    def __init__(self, cfg, tokenizer, preprocess, fmt: str, expect: dict | None = None,
                 max_pixels: int = MAX_PIXELS):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.fmt = fmt
        self.max_pixels = max_pixels
        self.conv = Conversations(cfg.json, cfg.cache_dir)
        self.image_root = resolve(cfg.image_root)
        self.tars = TarImages(self.image_root, cfg.cache_dir, cfg.cache_limit_gb)
        self.labels = (LabelFiles(cfg.shards, expect, cfg.cache_dir, cfg.cache_limit_gb)
                       if cfg.shards else None)
        self.meta = self.labels.meta if self.labels else None
        self.top_n = self.meta["top_n"] if self.meta else None
        self.report: dict = {"json_rows": len(self.conv), "json_rows_with_image": self.conv.with_image}
        self.blocks: list[Block] = []

    @property
    def total_rows(self) -> int:
        return sum(b.rows for b in self.blocks)

    def _finish_report(self, dropped: Counter) -> None:
        self.report.update({"dropped": dict(dropped), "trainable": self.total_rows})

    def rows(self, block: Block) -> list[dict]:
        """A block's rows as dicts: item (conversation), row (stream index), labels or None."""
        raise NotImplementedError

    def _decode_group(self, shard: int, group: int, rows: np.ndarray | None = None):
        t = self.labels.read_row_group(shard, group)
        if rows is not None:
            t = t.take(rows)
        n = self.top_n
        ids = t.column("label_ids").combine_chunks().values.to_numpy(zero_copy_only=False)
        sc = t.column("scores").combine_chunks().values.to_numpy(zero_copy_only=False)
        check_values(ids, sc, self.meta["wordlist_size"],
                     where=f"{self.labels.name(shard)} (row group {group})")
        return (ids.reshape(t.num_rows, -1, n), sc.astype(np.float32).reshape(t.num_rows, -1, n),
                [normalize_path(q) for q in t.column("path").to_pylist()])

    def sample(self, row: dict) -> dict | None:
        return self.try_sample(row)[0]

    def try_sample(self, row: dict) -> tuple[dict | None, str | None]:
        """(sample, None), or (None, "path: why") for an unreadable image."""
        item = row["item"]
        pixel = None
        if item.get("image"):
            try:
                data = self.tars.read(item["image"])  # a webdataset member: "00000.tar/k.jpg"
                img = (decode_bytes(data, self.max_pixels) if data is not None else
                       load_rgb(resolve_inside(self.image_root, item["image"]), self.max_pixels))
                pixel = self.preprocess(img)
            except BadImage as e:
                return None, f"{item['image']}: {e}"
        ids, labels = build_sample(item, self.tokenizer, self.fmt, has_image=pixel is not None)
        out = {"pixel": pixel, "input_ids": ids, "labels": labels, "row": row["row"]}
        if row["label_ids"] is not None:
            out["label_ids"] = torch.from_numpy(row["label_ids"].astype(np.int64))
            out["label_scores"] = torch.from_numpy(row["label_scores"])
        return out, None


class LabelledSource(Source):
    """Stage 1: the labelled images that join the JSON, in shard order. Labelled rows whose
    image the JSON does not name leave the stream at start-up (so every batch is full) and
    are counted in ``report``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        sizes = self.labels.row_groups()
        with ThreadPoolExecutor(max_workers=8) as pool:  # ranged reads on a bucket
            columns = list(pool.map(self.labels.paths, range(len(self.labels))))
        groups, paths = [], []
        for s, (col, rgs) in enumerate(zip(columns, sizes)):
            if sum(rgs) != len(col):
                raise ShardMismatch(f"{self.labels.name(s)}: {len(col)} rows, the manifest "
                                    f"records {sum(rgs)}; rerun the extraction into {self.cfg.shards}")
            groups.extend((s, g, n) for g, n in enumerate(rgs))
            paths.extend(normalize_path(q) for q in col)
        entry = self.conv.find(paths)  # the JSON entry of each labelled row, -1: none
        ok = entry >= 0
        self.keep: dict[tuple[int, int], np.ndarray] = {}  # (shard, group) -> rows used
        self.entry: dict[tuple[int, int], np.ndarray] = {}  # their JSON entries
        row = at = 0
        for s, g, n in groups:
            rows = np.flatnonzero(ok[at:at + n])
            if len(rows):
                self.keep[(s, g)] = rows
                self.entry[(s, g)] = entry[at:at + n][rows]
                self.blocks.append(Block(s, g, len(rows), row))
                row += len(rows)
            at += n
        self.report.update({"labelled_rows": len(paths), "joined": int(ok.sum())})
        self._finish_report(Counter({"labelled image not in data.json": int((~ok).sum())}
                                    if (~ok).any() else {}))

    def rows(self, block: Block) -> list[dict]:
        key = (block.shard, block.group)
        keep = self.keep[key][block.skip:block.skip + block.rows]
        entries = self.entry[key][block.skip:block.skip + block.rows]
        ids, sc, paths = self._decode_group(block.shard, block.group, keep)
        return [{"item": self.conv.item(int(e)), "row": block.first_row + r,
                 "label_ids": ids[r], "label_scores": sc[r], "image": q}
                for r, (q, e) in enumerate(zip(paths, entries))]


class ConversationSource(Source):
    """Stage 2 (or no labels): the JSON in its order, text-only entries included, in slices
    of ``data.shuffle_block``; labels attached where the label run has the image (looked up
    by a sorted hash index of the shards' paths, built at start-up when labels are given)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        n, step = len(self.conv), self.cfg.shuffle_block
        self.blocks = [Block(-1, s, min(step, n - s), s) for s in range(0, n, step)]
        self._keys = None
        if self.labels is not None:
            self._index_labels()
            images = [p for p in self.conv.images() if p]
            self.report["with_labels"] = int(np.isin(path_hash(images), self._keys).sum())
        self._groups: dict = {}  # a few decoded row groups, for the lookups
        self._finish_report(Counter())

    def _index_labels(self) -> None:
        """Sorted 64-bit keys of every labelled path, with (shard, group, row) beside each."""
        keys, where = [], []
        for s, rgs in enumerate(self.labels.row_groups()):
            col, at = [normalize_path(p) for p in self.labels.paths(s)], 0
            for g, n in enumerate(rgs):
                where.extend((s, g, r) for r in range(n))
                at += n
            keys.append(path_hash(col))
        keys = np.concatenate(keys) if keys else np.zeros(0, np.uint64)
        order = np.argsort(keys, kind="stable")  # stable: the first labelled copy wins
        self._keys, self._where_at = keys[order], np.array(where, dtype=np.int64).reshape(-1, 3)[order]

    def _where(self, path: str) -> tuple[int, int, int] | None:
        k = path_hash([path])[0]
        a = int(np.searchsorted(self._keys, k))
        if a < len(self._keys) and self._keys[a] == k:
            return tuple(int(x) for x in self._where_at[a])
        return None

    def _labels_for(self, image: str | None):
        loc = self._where(normalize_path(image)) if (self._keys is not None and image) else None
        if loc is None:
            return None, None
        key = loc[:2]
        if key not in self._groups:
            if len(self._groups) >= 4:
                self._groups.pop(next(iter(self._groups)))
            self._groups[key] = self._decode_group(key[0], key[1])
        ids, sc, paths = self._groups[key]
        if paths[loc[2]] != normalize_path(image):
            return None, None  # a 64-bit hash collision with another image: no labels
        return ids[loc[2]], sc[loc[2]]

    def rows(self, block: Block) -> list[dict]:
        start = block.group + block.skip
        out = []
        for j in range(start, start + block.rows):
            item = self.conv.item(j)
            ids, sc = self._labels_for(item.get("image"))
            out.append({"item": item, "row": j, "label_ids": ids, "label_scores": sc})
        return out


def open_source(cfg, tokenizer, preprocess, fmt: str, expect: dict | None = None,
                max_pixels: int = MAX_PIXELS) -> Source:
    """Stage 1 with labels streams the label run; anything else streams the JSON."""
    kind = LabelledSource if (cfg.shards and fmt == "plain") else ConversationSource
    return kind(cfg, tokenizer, preprocess, fmt, expect, max_pixels)
