"""The extraction stage's typed config (the machinery is ``seacore.config``)."""

from __future__ import annotations

import dataclasses

from pipeline.data import MAX_PIXELS
from seacore.config import ConfigError, doc

# --- the extraction stage's config ----------------------------------------------------------


@dataclasses.dataclass
class InputConfig:
    json: str | None = doc(None, "LLaVA-format JSON (list of {id, image, conversations}), a "
                                 "path or URL (s3://, gs://); null walks image_root instead")
    image_root: str = doc("data/images", "folder (or bucket prefix: s3://bucket/images) the "
                                         "JSON's image paths are relative to")
    tars: str | None = doc(None, "webdataset tars instead of json/image_root (img2dataset's "
                                 "layout): a folder or bucket prefix of .tar files, one .tar, or "
                                 "a pattern like s3://b/laion/{00000..00999}.tar; one shard per tar")
    limit: int | None = doc(None, "only the first N images (smoke runs)")
    max_pixels: int = doc(MAX_PIXELS, "images larger than this are refused as decompression bombs")


@dataclasses.dataclass
class EncoderConfig:
    model: str = doc("ViT-L-14-336", "open_clip model name, local-dir:/path, hf-hub:org/repo, or "
                                     "hf-clip:<transformers CLIP id or folder>")
    pretrained: str | None = doc("openai", "pretrained tag (looked up in the HF cache) or a "
                                           "checkpoint file: a path, or a URL (copied once per "
                                           "node into $SEA_CACHE/data or <tmp>/sea-cache)")
    allow_download: bool = doc(False, "let open_clip download missing weights")
    cache_dir: str | None = doc(None, "Hugging Face cache dir for weights (default: HF_HOME)")


@dataclasses.dataclass
class LabelConfig:
    # the default stays the paper's literal formula (reproduction, and every tower has it);
    # configs/extract.yaml follows the evidence: surgery labelled best in the world (EVIDENCE.md)
    mode: str = doc("sea", "sea (raw tokens, -cos, the paper) | vanilla (+cos) | surgery (the "
                           "most precise in the ground-truth world; CLIP-style towers)")
    top_n: int = doc(10, "labels kept per patch")
    min_score: float = doc(0.0, "scores below this are dropped (paper: 0)")
    templates: list[str] = doc([], "prompt templates; [] = the bare word; several = ensemble")
    surgery_depth: int = doc(6, "blocks with the CLIP Surgery second path (reference code: 6)")
    surgery_weights: str = doc("cls", "feature-surgery word weights: cls (the class token's "
                                      "similarities, current CLIP Surgery code, d2cf33f) | "
                                      "token (each patch's own, the older demo version 9f5be11)")
    search_backend: str = doc("auto", "auto | faiss | torch")
    text_batch_size: int = doc(1024, "words per text-tower batch")
    text_cache_dir: str | None = doc(None, "word-embedding cache (default $SEA_CACHE or ~/.cache/sea)")
    wordlist: str | None = doc(None, "word list file; null = the hash-checked 2of12 list")


@dataclasses.dataclass
class RunConfig:
    output: str = doc("shards/default", "run directory for shards, manifest and errors: a path "
                                        "or a bucket prefix (s3://bucket/labels/run)")
    verify: str = doc("size", "what a restart checks of the shards already done: size (each "
                              "present at its recorded size: a listing) | all (each re-read and "
                              "its sha256 compared: reads the whole label set)")
    staging_dir: str | None = doc(None, "local folder where shards are written before their "
                                        "upload when run.output is a bucket (default: the "
                                        "system temp folder)")
    lease_ttl_s: float = doc(300.0, "bucket outputs: a driver's lease object not renewed for "
                                    "this long is taken over by the next driver")
    chunk_size: int = doc(5000, "images per shard; fixed per run (part of the run identity)")
    batch_size: int = doc(32, "images per vision-tower batch")
    decode_workers: int = doc(2, "decode threads of the local runner (the Ray runner's decoding "
                                 "is ray.max_tasks_in_flight tasks per actor)")
    device: str = doc("auto", "auto (cuda when present) | cpu | cuda | cuda:N")
    row_group_size: int = doc(256, "rows per Parquet row group (bounds writer memory)")
    overwrite: bool = doc(False, "replace a run made with another config in the same output")
    max_error_rate: float = doc(0.05, "largest share of failed images (missing, corrupt) a "
                                      "run may have and still exit 0; the shards are written either way")
    runner: str = doc("ray", "ray (local Ray sized to the machine, or ray.address) | local (in-process, no Ray)")
    progress: bool = doc(True, "progress bars")


@dataclasses.dataclass
class RayConfig:
    address: str | None = doc(None, "Ray cluster address (or $RAY_ADDRESS); null starts a new "
                                    "local Ray, never joining one found on the machine")
    connect_timeout_s: float = doc(30.0, "seconds to reach ray.address before giving up")
    num_actors: int | None = doc(None, "model actors; null = GPUs, or 1 on a CPU machine")
    cpus_per_actor: float = doc(1.0, "CPUs reserved by each model actor (Ray scheduling)")
    decode_cpus: float = doc(1.0, "CPUs per decode task")
    max_tasks_in_flight: int = doc(4, "decode batches queued per actor (backpressure)")
    max_task_retries: int = doc(3, "Ray retries of a failed task or restarted actor")
    torch_threads: int | None = doc(None, "torch threads per model actor (null: the node's cores "
                                          "on CPU, cpus_per_actor next to a GPU)")


@dataclasses.dataclass
class ExtractConfig:
    input: InputConfig = dataclasses.field(default_factory=InputConfig)
    encoder: EncoderConfig = dataclasses.field(default_factory=EncoderConfig)
    labels: LabelConfig = dataclasses.field(default_factory=LabelConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)

    def validate(self) -> None:
        if self.labels.top_n < 1:
            raise ConfigError("labels.top_n must be >= 1")
        if self.run.chunk_size < 1 or self.run.batch_size < 1:
            raise ConfigError("run.chunk_size and run.batch_size must be >= 1")
        if not 0.0 <= self.run.max_error_rate <= 1.0:
            raise ConfigError(f"run.max_error_rate must be in [0, 1], got {self.run.max_error_rate}")
        if self.run.verify not in ("size", "all"):
            raise ConfigError(f"run.verify must be size or all, got '{self.run.verify}'")
        if self.input.tars and self.input.json:
            raise ConfigError("input.tars and input.json are two inputs: set one (tars carry "
                              "their images; the JSON names files under input.image_root)")
        if self.run.runner not in ("local", "ray"):
            raise ConfigError(f"run.runner must be local or ray, got '{self.run.runner}'")
        if self.labels.surgery_weights not in ("token", "cls"):
            raise ConfigError(f"labels.surgery_weights must be token or cls, "
                              f"got '{self.labels.surgery_weights}'")
        if self.labels.search_backend not in ("auto", "faiss", "torch"):
            raise ConfigError(f"labels.search_backend must be auto, faiss or torch, "
                              f"got '{self.labels.search_backend}'")
