"""Streaming training data: the global sample order, batching, and the data checks.

The samples come from a source (``trainer.sources``: stage 1 from the label shards, stage 2
from the conversation JSON). Blocks are the shards' Parquet row groups (or, without labels,
fixed slices of the JSON list). Per epoch the block order is shuffled from (seed, epoch) and the rows again within
windows of ``shuffle_window`` blocks: one global stream, the same for any number of ranks
and loader workers, which take its micro-batches in strides (``StreamDataset``). The
stream's layout follows from the metadata alone, so the data position is one number (the
optimizer steps done in the epoch) and a resume, on any world size, is exact. A worker holds
at most two windows of decoded rows, never the shard set.

Samples whose image cannot be read are dropped from their batch and counted (``bad``)
against ``data.max_error_rate``. The first ``holdout_images`` labelled rows (manifest order)
are kept out of training and form the alignment-evaluation set.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.shards import SENTINEL
from trainer.sources import Block, Source


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

    def __init__(self, source: Source, micro_batch: int, seed: int, rank: int = 0,
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


def holdout_rows(source: Source, n: int) -> Iterator[dict]:
    """The first n labelled rows, in manifest order (the alignment-evaluation set)."""
    left = n
    for b in source.blocks:
        if left <= 0:
            return
        rows = source.rows(b)[:left]
        left -= len(rows)
        yield from rows
