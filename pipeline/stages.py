"""The pipeline's named stages, shared by the local runner and the Ray runner:

  read    ``Decoder``: record -> preprocessed tensor, or the reason it cannot be used
  encode  ``Labeler.encode``: images -> per-patch joint-space features (normalised)
  search  ``Labeler.search``: features -> top-n word ids and signed scores
  write   ``write_chunk``: rows of one chunk -> shard (temp name, rename, done marker;
          on a bucket: written locally, uploaded, read back and compared, marker last)
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline import dense, search, shards
from pipeline.config import ExtractConfig
from pipeline.data import BadImage, Record, decode_bytes, load_rgb, resolve_inside
from pipeline.encoders import preprocess_geometry
from seacore.device import autocast, pick_device
from seacore.storage import Location, resolve


def package_version() -> str:
    try:
        return version("sea-align")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass
class Decoded:
    record: Record
    image: torch.Tensor | None
    error: str | None = None


class Decoder:
    """Stage ``read``. Holds only the transform: cheap to copy into worker processes."""

    def __init__(self, image_root: str | Location | None, preprocess, max_pixels: int):
        # resolved once: a bucket's client travels (pickled) with the decoder
        self.image_root = resolve(image_root) if image_root is not None else None
        self.preprocess = preprocess
        self.max_pixels = max_pixels

    def __call__(self, record: Record) -> Decoded:
        if record.error:
            return Decoded(record, None, record.error)
        try:
            if record.data is not None:  # a tar member: the bytes came with the record
                img = decode_bytes(record.data, self.max_pixels)
            else:
                img = load_rgb(resolve_inside(self.image_root, record.path), self.max_pixels)
            return Decoded(record, self.preprocess(img))
        except BadImage as e:
            return Decoded(record, None, str(e))
        except Exception as e:  # a transform failing on a strange image must not stop a run
            return Decoded(record, None, f"preprocess failed: {type(e).__name__}: {e}")


@dataclass
class Timings:
    """Seconds spent per stage: the hook the benchmarks read."""

    encode: float = 0.0
    search: float = 0.0
    wait: float = 0.0  # the model idle, waiting for the next decoded batch
    write: float = 0.0  # shard writing, its sha256 and the done marker
    images: int = 0


class Labeler:
    """Stages ``encode`` and ``search``: the encoder, word matrix and index, loaded once."""

    def __init__(self, cfg: ExtractConfig, device: str | torch.device | None = None,
                 progress: bool = True):
        from pipeline.encoders import load_encoder
        from pipeline.textemb import load_or_encode
        from wordlist import load_wordlist

        self.cfg = cfg
        self.device = pick_device(device or cfg.run.device, key="run.device")
        self.encoder = load_encoder(cfg.encoder.model, cfg.encoder.pretrained,
                                    cfg.encoder.allow_download, cfg.encoder.cache_dir,
                                    device=self.device)
        self.wordlist = load_wordlist(cfg.labels.wordlist)
        if len(self.wordlist) >= shards.SENTINEL:
            raise ValueError(f"word list has {len(self.wordlist)} entries; uint16 ids allow at "
                             f"most {shards.SENTINEL - 1}")
        self.visual = self.encoder.model.visual
        self.kind = dense.dense_kind(self.visual, cfg.labels.mode)
        self.sign = dense.SIGN[cfg.labels.mode]
        t0 = time.perf_counter()
        text, self.text_cache, self.text_cache_hit = load_or_encode(
            self.encoder, self.wordlist, cfg.labels.templates, cfg.labels.text_cache_dir,
            cfg.labels.text_batch_size, self.device, progress)
        self.text_seconds = time.perf_counter() - t0
        self.text = torch.from_numpy(text).to(self.device)
        self.index = None
        if self.kind != "surgery":
            self.index = search.WordIndex(text, cfg.labels.search_backend, self.device)
        self.timings = Timings()
        self.preprocess = self.encoder.preprocess

    def metadata(self) -> dict:
        c = self.cfg.labels
        ident = self.encoder.identity()
        return {
            "schema_version": shards.SCHEMA_VERSION,
            "encoder": ident["encoder"],
            "weights_tag": ident["weights_tag"],
            "weights_sha256": ident["weights_sha256"],
            "dense_features": self.kind,
            "mode": c.mode,
            "surgery_weights": c.surgery_weights if self.kind == "surgery" else None,
            "score_sign": self.sign,
            "templates": list(c.templates),
            "wordlist_sha256": self.wordlist.sha256,
            "wordlist_size": len(self.wordlist),
            "top_n": c.top_n,
            "min_score": c.min_score,
            "image_size": list(self.encoder.image_size),
            "grid": list(self.encoder.grid),
            "crop": preprocess_geometry(self.encoder.preprocess),
            "package_version": package_version(),
        }

    @torch.inference_mode()
    def encode(self, images: torch.Tensor):
        """(B, 3, H, W) -> (normalised patches (B, P, D) float32, normalised global or None)."""
        t0 = time.perf_counter()
        with autocast(self.device):
            patches, glob = dense.patch_features(self.visual, images.to(self.device),
                                                 self.kind, self.cfg.labels.surgery_depth)
        patches = F.normalize(patches.float(), dim=-1)
        glob = F.normalize(glob.float(), dim=-1) if glob is not None else None
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.timings.encode += time.perf_counter() - t0
        return patches, glob

    @torch.inference_mode()
    def search(self, patches: torch.Tensor, glob: torch.Tensor | None):
        """-> (ids (B, P, n) uint16, scores (B, P, n) float16) numpy."""
        t0 = time.perf_counter()
        b, p, _ = patches.shape
        n = self.cfg.labels.top_n
        if self.kind == "surgery":
            s, i = search.surgery_topk(patches, glob, self.text, n, self.cfg.labels.surgery_weights)
        else:
            s, i = self.index.search(self.sign * patches.reshape(b * p, -1), n)
        ids, scores = search.finalize(s, i, self.cfg.labels.min_score, n)
        self.timings.search += time.perf_counter() - t0
        self.timings.images += b
        return ids.reshape(b, p, n), scores.reshape(b, p, n)

    def __call__(self, images: torch.Tensor):
        return self.search(*self.encode(images))

    def report(self) -> dict:
        """Stage timings and set-up facts for the run summary (and the benchmarks)."""
        t = self.timings
        return {"encode_seconds": t.encode, "search_seconds": t.search, "images": t.images,
                "decode_wait_seconds": t.wait, "write_seconds": t.write,
                "text_seconds": self.text_seconds, "text_cache_hit": self.text_cache_hit,
                "device": str(self.device),
                "search_backend": self.index.backend if self.index else "torch"}


def write_chunk(out_dir: str | Path | Location, index: int, metadata: dict, batches,
                errors: list[dict], row_group_size: int, timings: Timings | None = None,
                staging_dir: str | None = None) -> dict:
    """Stage ``write``: stream LabelBatches into shard ``index``; done marker last.

    A local output gets the shard under a temporary name, renamed into place. A bucket output
    gets it written whole in ``staging_dir`` first, then uploaded, then re-read from the
    bucket and its size and sha256 compared with the local file's: only then is the marker
    written. A kill at any point leaves a chunk without a marker (redone by the next run:
    exactly once) and never a marker naming a bad object."""
    out = resolve(out_dir)
    stage = None
    if out.local:
        path = Path(out.path) / shards.shard_name(index)
    else:
        stage = Path(tempfile.mkdtemp(prefix=f"sea-shard-{index:06d}-",
                                      dir=staging_dir or None))
        path = stage / shards.shard_name(index)
    writer = shards.ShardWriter(path, metadata, row_group_size)
    kept = patches = 0
    spent = 0.0
    try:
        try:
            for b in batches:
                t0 = time.perf_counter()
                writer.write(b)
                kept += int((b.ids != shards.SENTINEL).sum())
                patches += b.ids.shape[0] * b.ids.shape[1]
                spent += time.perf_counter() - t0
            t0 = time.perf_counter()
            rows = writer.close()
        except BaseException:
            writer.abort()
            raise
        size, sha = path.stat().st_size, shards.file_sha256(path)
        if stage is not None:
            _publish(path, out.child(shards.shard_name(index)), size, sha)
        done = {"index": index, "rows": rows, "bytes": size, "sha256": sha,
                "row_groups": writer.row_groups, "errors": len(errors), "error_list": errors,
                "kept_labels": kept, "patches": patches}
        shards.write_json_atomic(out.child(shards.done_name(index)), done)
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
    if timings is not None:
        timings.write += spent + time.perf_counter() - t0
    return done


class UploadMismatch(OSError):
    """An uploaded object that does not read back as the file that was sent."""


def _publish(local: Path, dest: Location, size: int, sha: str) -> None:
    dest.upload(local)
    got = dest.size()
    if got != size:
        raise UploadMismatch(f"{dest}: {got} bytes in the bucket after uploading {size}; the "
                             f"chunk will be redone by a rerun")
    if dest.sha256() != sha:
        raise UploadMismatch(f"{dest}: sha256 in the bucket differs from the uploaded file's; "
                             f"the chunk will be redone by a rerun")


def label_batches(decoded_batches, labeler: Labeler, errors: list[dict]):
    """Encode + search each decoded batch; yields LabelBatches, collects bad images."""
    grid = tuple(labeler.encoder.grid)
    it = iter(decoded_batches)
    while True:
        t0 = time.perf_counter()
        batch = next(it, None)
        labeler.timings.wait += time.perf_counter() - t0
        if batch is None:
            return
        good = [d for d in batch if d.image is not None]
        errors.extend({"image_id": d.record.image_id, "path": d.record.path, "reason": d.error}
                      for d in batch if d.image is None)
        if not good:
            continue
        ids, scores = labeler(torch.stack([d.image for d in good]))
        yield shards.LabelBatch([d.record.image_id for d in good], [d.record.path for d in good],
                                grid, ids, scores)

