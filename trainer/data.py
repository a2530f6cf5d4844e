"""Streaming training data: label shards joined with images and LLaVA conversations.

Blocks are the shards' Parquet row groups (or, without labels, fixed slices of the JSON
list). Per epoch the block order is shuffled from (seed, epoch) and the rows again within
windows of ``shuffle_window`` blocks: one global stream, the same for any number of ranks
and loader workers, which take its micro-batches in strides (``StreamDataset``). The
stream's layout follows from the metadata alone, so the data position is one number (the
optimizer steps done in the epoch) and a resume, on any world size, is exact. A worker holds
at most two windows of decoded rows, never the shard set.

Start-up reads the label run's manifest (the layout) and, in stage 1, the shards' path
column (the join with the JSON); it stats no image and hashes no shard. Each shard is checked
(size, sha256, metadata) when a process first reads its labels (``trainer.cache``); data in a
bucket is read from there (images one request each, label shards through a bounded local
cache). Samples whose image cannot be read (missing, corrupt) are dropped from their batch and
counted (``bad``) against ``data.max_error_rate``. The first ``holdout_images`` labelled rows
(manifest order) are kept out of training and form the alignment-evaluation set.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.data import (
    MAX_PIXELS,
    BadImage,
    decode_bytes,
    load_rgb,
    normalize_path,
    read_json_list,
    resolve_inside,
)
from pipeline.shards import SENTINEL, ShardMismatch, check_values
from seacore.storage import resolve
from trainer.cache import LabelFiles, TarImages
from trainer.prompts import build_sample


@dataclass(frozen=True)
class Block:
    shard: int  # index into the shard list, -1 for JSON slices
    group: int  # row group index, or slice start in the JSON list
    rows: int  # rows used (after ``skip``)
    first_row: int  # global row index (manifest order) of the first row used
    skip: int = 0  # leading rows of the group left out (held out for evaluation)


def load_conversations(json_path: str) -> tuple[list[dict], dict[str, int]]:
    """The JSON list and its image index: normalised image path -> first entry naming it
    (the join key of both stages; ids are kept for reporting only)."""
    data = read_json_list(json_path, "data.json")
    index: dict[str, int] = {}
    for i, item in enumerate(data):
        if item.get("image"):
            index.setdefault(normalize_path(item["image"]), i)
    return data, index


class SampleSource:
    """Everything a worker needs to turn a block into samples; picklable.

    At start-up the JSON and the labels are joined by normalised image path (stage 1: the
    shards' path column); labelled rows absent from the JSON leave the stream here, so every
    batch is full, and are counted in ``report`` (printed by the trainer before it starts).
    Images are not looked up: one that cannot be read is found when its batch is made."""

    def __init__(self, cfg, tokenizer, preprocess, fmt: str, expect: dict | None = None,
                 max_pixels: int = MAX_PIXELS):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.fmt = fmt
        self.max_pixels = max_pixels
        self.top_n = None
        self.items, self.index = load_conversations(cfg.json)
        self.image_root = resolve(cfg.image_root)
        self.tars = TarImages(self.image_root, cfg.cache_dir, cfg.cache_limit_gb)
        self.meta, self.labels, self.by_path = None, None, None
        self.keep: dict[tuple[int, int], np.ndarray] = {}  # (shard, group) -> rows used
        with_image = sum(1 for it in self.items if it.get("image"))
        self.report: dict = {"json_rows": len(self.items), "json_rows_with_image": with_image}
        dropped: Counter = Counter()
        if cfg.shards:
            self.labels = LabelFiles(cfg.shards, expect, cfg.cache_dir, cfg.cache_limit_gb)
            self.meta = self.labels.meta
            self.top_n = self.meta["top_n"]
        if cfg.shards and fmt == "plain":
            # stage 1: the stream is the labelled images that join the JSON, in shard order
            sizes = self.labels.row_groups()
            with ThreadPoolExecutor(max_workers=8) as pool:  # ranged reads on a bucket
                columns = list(pool.map(self.labels.paths, range(len(self.labels))))
            groups, paths = [], []
            for s, (col, rgs) in enumerate(zip(columns, sizes)):
                if sum(rgs) != len(col):
                    raise ShardMismatch(f"{self.labels.name(s)}: {len(col)} rows, the manifest "
                                        f"records {sum(rgs)}; rerun the extraction into {cfg.shards}")
                groups.extend((s, g, n) for g, n in enumerate(rgs))
                paths.extend(normalize_path(q) for q in col)
            joined = [q in self.index for q in paths]
            dropped = Counter("labelled image not in data.json" for j in joined if not j)
            ok = np.array(joined, dtype=bool)
            self.blocks, row, at = [], 0, 0
            for s, g, n in groups:
                rows = np.flatnonzero(ok[at:at + n])
                at += n
                if len(rows):
                    self.keep[(s, g)] = rows
                    self.blocks.append(Block(s, g, len(rows), row))
                    row += len(rows)
            self.report.update({"labelled_rows": len(paths), "joined": int(sum(joined))})
        else:
            # stage 2: the stream is the JSON (text-only samples included); labels are looked
            # up by image path where the label run has them
            self.order = list(range(len(self.items)))
            step = cfg.shuffle_block
            self.blocks = [Block(-1, s, min(step, len(self.order) - s), s)
                           for s in range(0, len(self.order), step)]
            if cfg.shards:
                self.by_path = self._path_index()
                self.report["with_labels"] = sum(
                    1 for i in self.order if self.items[i].get("image")
                    and normalize_path(self.items[i]["image"]) in self.by_path)
        self.total_rows = sum(b.rows for b in self.blocks)
        self.report.update({"dropped": dict(dropped), "trainable": self.total_rows})
        self._groups: dict = {}  # small cache of decoded row groups for path lookups

    def _path_index(self) -> dict[str, tuple[int, int, int]]:
        """image path -> (shard, row group, row): reads only the path column, group by group."""
        index = {}
        for s, rgs in enumerate(self.labels.row_groups()):
            col, at = self.labels.paths(s), 0
            for g, n in enumerate(rgs):
                for r, p in enumerate(col[at:at + n]):
                    index.setdefault(normalize_path(p), (s, g, r))
                at += n
        return index

    def _labels_for(self, image: str | None):
        loc = self.by_path.get(normalize_path(image)) if (self.by_path is not None and image) else None
        if loc is None:
            return None, None
        key = loc[:2]
        if key not in self._groups:
            if len(self._groups) >= 4:
                self._groups.pop(next(iter(self._groups)))
            self._groups[key] = self._decode_group(key[0], key[1])
        ids, sc, _ = self._groups[key]
        return ids[loc[2]], sc[loc[2]]

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

    def rows(self, block: Block) -> list[dict]:
        """A block's rows as dicts: item (conversation), labels when present."""
        if block.shard < 0:
            start = block.group + block.skip
            out = []
            for j in range(start, start + block.rows):
                i = self.order[j]
                ids, sc = self._labels_for(self.items[i].get("image"))
                out.append({"item": self.items[i], "row": j, "label_ids": ids, "label_scores": sc})
            return out
        keep = self.keep[(block.shard, block.group)][block.skip:block.skip + block.rows]
        ids, sc, paths = self._decode_group(block.shard, block.group, keep)
        return [{"item": self.items[self.index[q]], "row": block.first_row + r,
                 "label_ids": ids[r], "label_scores": sc[r], "image": q}
                for r, q in enumerate(paths)]

    def sample(self, row: dict) -> dict | None:
        return self.try_sample(row)[0]

    def try_sample(self, row: dict) -> tuple[dict | None, str | None]:
        """(sample, None), or (None, "path: why") for an unreadable image, or (None, None)
        for a labelled image absent from the JSON."""
        item = row["item"]
        if item is None:
            return None, None
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


def collate(samples: list[dict]) -> dict:
    with_img = [s for s in samples if s["pixel"] is not None]
    labelled = [s for s in with_img if "label_ids" in s]
    batch = {
        "input_ids": [s["input_ids"] for s in samples],
        "labels": [s["labels"] for s in samples],
        "has_image": [s["pixel"] is not None for s in samples],
        "pixels": torch.stack([s["pixel"] for s in with_img]) if with_img else None,
        "rows": [s["row"] for s in samples],
    }
    if labelled:  # images without labels get all-sentinel rows: the sampler skips them
        blank_ids = torch.full_like(labelled[0]["label_ids"], SENTINEL)
        blank_sc = torch.zeros_like(labelled[0]["label_scores"])
        batch["label_ids"] = torch.stack([s.get("label_ids", blank_ids) for s in with_img])
        batch["label_scores"] = torch.stack([s.get("label_scores", blank_sc) for s in with_img])
    return batch


def format_report(report: dict) -> str:
    """The join report in one line, e.g. for the start-up print and error messages."""
    parts = [f"{k.replace('_', ' ')} {v}" for k, v in report.items() if k != "dropped"]
    drops = ", ".join(f"{k}: {v}" for k, v in report["dropped"].items()) or "none"
    return "; ".join(parts) + f"; dropped: {drops}"


def data_problem(report: dict, train_rows: int, global_batch: int, holdout: int) -> str | None:
    """Why the data cannot make one optimizer step (None when it can), naming the cause and
    the setting that fixes it."""
    if train_rows >= global_batch:
        return None
    rows = report["trainable"]
    if rows == 0:
        cause = ("check data.image_root (the folder the JSON's image paths are relative to), "
                 "data.json and data.shards")
    elif holdout and rows - holdout < global_batch:
        cause = (f"data.holdout_images={holdout} leaves {max(rows - holdout, 0)} of {rows} rows "
                 f"for training; lower it")
    else:
        cause = f"lower optim.global_batch_size ({global_batch})"
    return (f"{rows} rows can train, fewer than one optimizer step needs (global batch "
            f"{global_batch}): {cause}. Join report: {format_report(report)}")


class StreamDataset(IterableDataset):
    """Yields micro-batches (already collated) for one rank; see the module docstring.

    The epoch's sample order is one global stream, a function of (seed, epoch) and the data
    alone: the training blocks shuffled from (seed, epoch), cut into windows of
    ``shuffle_window`` blocks, each window's rows shuffled from (seed, epoch, window). Global
    micro-batch j is rows [j * micro, (j + 1) * micro) of that stream; rank r of W takes
    j = r, r + W, ... (its stride) and its loader worker k of K every K-th of those. So which
    samples an optimizer step sees depends neither on the world size nor on the number of
    loader workers (MosaicML streaming's canonical order is the model), and a resumed run, on
    any world size, starts at the global micro-batch where the interrupted one stopped."""

    def __init__(self, source: SampleSource, micro_batch: int, seed: int, rank: int = 0,
                 world: int = 1, shuffle_window: int = 8,
                 holdout: int = 0, draws=None, global_batch: int | None = None):
        self.source = source
        self.micro = micro_batch
        self.seed = seed
        self.rank = rank
        self.world = world
        self.window = max(shuffle_window, 1)
        self.holdout = holdout
        self.draws = draws  # SEA's pair sampler (trainer.sea_loss.Draws), None without L_a
        self.global_batch = global_batch or micro_batch * world
        if self.global_batch % (micro_batch * world):
            raise ValueError(f"global batch {self.global_batch} is not micro {micro_batch} x "
                             f"world {world} x an integer accumulation")
        self.epoch = 0
        self.start = 0  # this rank's first micro-batch (local index) in the epoch

    @property
    def train_blocks(self) -> list[Block]:
        out = []
        for b in self.source.blocks:
            if b.first_row + b.rows <= self.holdout:
                continue
            if b.first_row < self.holdout:  # a block straddling the holdout boundary
                cut = self.holdout - b.first_row
                b = Block(b.shard, b.group, b.rows - cut, b.first_row + cut, b.skip + cut)
            out.append(b)
        return out

    def train_rows(self) -> int:
        return sum(b.rows for b in self.train_blocks)

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch: whole global batches only (a short tail is dropped)."""
        return self.train_rows() // self.global_batch

    def local_batches(self) -> int:
        """Micro-batches this rank takes in one epoch (the same on every rank)."""
        return self.steps_per_epoch() * self.global_batch // (self.micro * self.world)

    def set_position(self, epoch: int, steps_done: int) -> None:
        """Start ``epoch`` after ``steps_done`` of its optimizer steps."""
        self.epoch = epoch
        self.start = steps_done * self.global_batch // (self.micro * self.world)

    def _windows(self) -> tuple[list[list[Block]], np.ndarray, list[np.ndarray]]:
        """The epoch's windows, their first positions in the stream, and each window's row
        order (indices into its rows, blocks in window order). Metadata only: no reading."""
        blocks = self.train_blocks
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(blocks)
        windows = [blocks[i:i + self.window] for i in range(0, len(blocks), self.window)]
        sizes = [sum(b.rows for b in w) for w in windows]
        perms = [np.random.default_rng([self.seed, self.epoch, k]).permutation(n)
                 for k, n in enumerate(sizes)]
        return windows, np.cumsum([0] + sizes), perms

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        k, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        windows, starts, perms = self._windows()
        cache: dict[tuple[int, int], list[dict]] = {}  # decoded blocks, oldest first

        def row_at(pos: int) -> dict:
            w = int(np.searchsorted(starts, pos, side="right")) - 1
            at = int(perms[w][pos - starts[w]])
            for b in windows[w]:
                if at < b.rows:
                    key = (b.shard, b.group)
                    if key not in cache:
                        if len(cache) >= 2 * self.window:  # a batch spans at most two windows
                            cache.pop(next(iter(cache)))
                        cache[key] = self.source.rows(b)
                    return cache[key][at]
                at -= b.rows
            raise AssertionError(f"stream position {pos} beyond its window")

        # a new DataLoader asks worker 0 first, then 1, ...: worker k yields local batches
        # start + k, start + k + K, ..., so the loader's round robin is the stream's order
        for i in range(self.start + k, self.local_batches(), n_workers):
            j = i * self.world + self.rank  # the global micro-batch
            rows = [row_at(q) for q in range(j * self.micro, (j + 1) * self.micro)]
            yield self._batch(rows, j)

    def _batch(self, rows: list[dict], number: int = 0) -> dict:
        samples, unreadable = [], []
        for r in rows:
            s, why = self.source.try_sample(r)
            if s is not None:
                samples.append(s)
            elif why is not None:
                unreadable.append(why)
        batch = collate(samples)
        batch["bad"] = len(rows) - len(samples)
        batch["unreadable"] = unreadable
        if self.draws is not None and batch.get("label_ids") is not None:
            batch["sea"] = self.draws(batch["label_ids"], batch["label_scores"], self.epoch, number)
        return batch


def holdout_rows(source: SampleSource, n: int) -> Iterator[dict]:
    """The first n labelled rows, in manifest order (the alignment-evaluation set)."""
    left = n
    for b in source.blocks:
        if left <= 0:
            return
        rows = source.rows(b)[:left]
        left -= len(rows)
        yield from rows
