"""Typed configs of the two training stages (loaded with ``pipeline.config.load_config``)."""

from __future__ import annotations

import dataclasses

from seacore.config import ConfigError, doc


@dataclasses.dataclass
class VisionConfig:
    model: str = doc("ViT-L-14-336", "the tower that made the labels: open_clip name, local-dir:/path "
                                     "or hf-clip:<transformers CLIP id or folder>")
    pretrained: str | None = doc("openai", "pretrained tag or checkpoint file")
    cache_dir: str | None = doc(None, "Hugging Face cache dir for the weights")
    feature_layer: int = doc(-2, "hidden layer fed to the adapter (-2: LLaVA's penultimate)")


@dataclasses.dataclass
class LLMConfig:
    path: str = doc("lmsys/vicuna-7b-v1.5", "Hugging Face model dir or hub id (from the local cache)")
    dtype: str = doc("auto", "auto (GPU: bf16 when frozen, fp32 masters when trained; CPU: fp32) "
                             "| float32 | bfloat16 | float16")
    gradient_checkpointing: bool = doc(False, "recompute LLM activations in backward")


@dataclasses.dataclass
class DataConfig:
    json: str = doc("data/blip_laion_cc_sbu_558k.json", "LLaVA-format conversations")
    image_root: str = doc("data/images", "folder the JSON's image paths are relative to")
    shards: str | None = doc("shards/llava-pretrain-vitl336", "label run dir (null: no labels, lambda must be 0)")
    max_length: int = doc(2048, "tokens per sample, image tokens included")
    truncation: str = doc("drop", "when image tokens would not fit: drop (skip, counted) | error")
    num_workers: int = doc(2, "decode worker processes per rank")
    shuffle_block: int = doc(256, "rows per shuffle block; blocks are shuffled, then rows within a window")
    shuffle_window: int = doc(8, "blocks mixed together (bounds memory)")
    holdout_images: int = doc(256, "first N labelled images kept out of training for alignment eval")


@dataclasses.dataclass
class SEAConfig:
    weight: float = doc(1.0, "lambda in L = L_g + lambda * L_a; 0 = plain LLaVA pretraining")
    window: int = doc(2, "k: one patch sampled per k x k window")
    log_tau_init: float = doc(0.0, "initial log-temperature (paper's 'tau = 0' read as log tau)")
    learn_tau: bool = doc(True, "temperature is a learnable parameter")
    min_tau: float = doc(0.01, "temperature floor (keeps logits finite)")
    label_tokenization: str = doc("space", "space: tokenize ' word' (mid-sentence form) | bare: 'word'")
    objective: str = doc("sampled", "sampled: one label per sampled patch, drawn by s/sum(s) (the "
                                    "paper's Eq. 7-9) | multi: all kept labels as positives, "
                                    "weighted by s/sum(s) (this project's; README)")
    gather_negatives: bool = doc(False, "multi-process: gather pairs from all ranks as negatives "
                                        "(each word once over all ranks)")
    wordlist: str | None = doc(None, "word list file; null = 2of12 (must match the label shards)")


@dataclasses.dataclass
class OptimConfig:
    lr: float = doc(1e-3, "peak learning rate (LLaVA-1.5 stage 1)")
    weight_decay: float = doc(0.0, "AdamW weight decay")
    betas: list[float] = doc([0.9, 0.999], "AdamW betas")
    warmup_ratio: float = doc(0.03, "share of steps with linear warmup, then cosine to 0")
    global_batch_size: int = doc(256, "samples per optimizer step across ranks and accumulation")
    micro_batch_size: int = doc(16, "samples per forward/backward on one rank")
    epochs: int = doc(1, "passes over the data")
    max_steps: int | None = doc(None, "stop after this many optimizer steps")
    grad_clip: float = doc(1.0, "max gradient norm (0 disables)")
    seed: int = doc(0, "seed for init, shuffling and SEA sampling")


@dataclasses.dataclass
class LogConfig:
    output: str = doc("runs/pretrain", "run dir: checkpoints, metrics.jsonl, tensorboard/")
    every: int = doc(1, "log every N optimizer steps")
    eval_every: int = doc(100, "alignment eval every N steps (0: only at the end)")
    save_every: int = doc(500, "checkpoint every N steps (and always at the end)")
    keep_last: int = doc(3, "checkpoints kept")
    tensorboard: bool = doc(True, "also write TensorBoard events when tensorboard is installed")
    progress: bool = doc(True, "progress bar")
    overwrite: bool = doc(False, "start over in a log.output that already holds checkpoints or "
                                 "final/ (they are deleted); without it such a run is refused")


@dataclasses.dataclass
class DistConfig:
    strategy: str = doc("ddp", "ddp | fsdp (shards the LLM's decoder layers; for LLMs that do not fit one device)")


@dataclasses.dataclass
class PretrainConfig:
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    llm: LLMConfig = dataclasses.field(default_factory=LLMConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    sea: SEAConfig = dataclasses.field(default_factory=SEAConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    device: str = doc("auto", "auto (cuda when present) | cpu | cuda")
    resume: str | None = doc(None, "checkpoint dir to resume from, or 'latest' in log.output")
    dist: DistConfig = dataclasses.field(default_factory=DistConfig)

    def validate(self) -> None:
        if self.dist.strategy not in ("ddp", "fsdp"):
            raise ConfigError(f"dist.strategy must be ddp or fsdp, got '{self.dist.strategy}'")
        if self.sea.weight > 0 and not self.data.shards:
            raise ConfigError("sea.weight > 0 needs data.shards (the label run)")
        if self.data.truncation not in ("drop", "error"):
            raise ConfigError(f"data.truncation must be drop or error, got '{self.data.truncation}'")
        if self.sea.label_tokenization not in ("space", "bare"):
            raise ConfigError("sea.label_tokenization must be space or bare")
        if self.optim.global_batch_size % self.optim.micro_batch_size:
            raise ConfigError("optim.global_batch_size must be a multiple of optim.micro_batch_size")
        if self.sea.window < 1:
            raise ConfigError("sea.window must be >= 1")
        if self.sea.objective not in ("sampled", "multi"):
            raise ConfigError(f"sea.objective must be sampled or multi, got '{self.sea.objective}'")


# --- stage 2: the same sections with LLaVA-1.5's instruction-tuning defaults ---------------


@dataclasses.dataclass
class FinetuneDataConfig(DataConfig):
    json: str = doc("data/llava_v1_5_mix665k.json", "LLaVA-format instruction data")
    shards: str | None = doc(None, "label run dir, needed only when sea.weight > 0")
    holdout_images: int = doc(0, "labelled images kept out for alignment eval")


@dataclasses.dataclass
class FinetuneSEAConfig(SEAConfig):
    weight: float = doc(0.0, "lambda for the SEA loss in stage 2 (default off)")


@dataclasses.dataclass
class FinetuneOptimConfig(OptimConfig):
    lr: float = doc(2e-5, "peak learning rate for LLM and adapter (LLaVA-1.5 stage 2)")
    global_batch_size: int = doc(128, "samples per optimizer step across ranks and accumulation")
    micro_batch_size: int = doc(4, "samples per forward/backward on one rank")
    vision_lr: float = doc(0.0, "learning rate of the vision tower; 0 keeps it frozen (paper's SEA-PRIME: 2e-6)")


@dataclasses.dataclass
class FinetuneConfig(PretrainConfig):
    data: FinetuneDataConfig = dataclasses.field(default_factory=FinetuneDataConfig)
    sea: FinetuneSEAConfig = dataclasses.field(default_factory=FinetuneSEAConfig)
    optim: FinetuneOptimConfig = dataclasses.field(default_factory=FinetuneOptimConfig)
    init_from: str | None = doc(None, "stage-1 run dir (its adapter.safetensors) to start from")
