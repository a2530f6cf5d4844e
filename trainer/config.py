"""Typed configs of the two training stages (loaded with ``pipeline.config.load_config``)."""

from __future__ import annotations

import dataclasses

from seacore.config import ConfigError, doc


@dataclasses.dataclass
class VisionConfig:
    model: str = doc("ViT-L-14-336", "the tower that made the labels: open_clip name, local-dir:/path "
                                     "or hf-clip:<transformers CLIP id or folder>")
    pretrained: str | None = doc("openai", "pretrained tag or checkpoint file (a path or a URL, as "
                                           "encoder.pretrained)")
    cache_dir: str | None = doc(None, "Hugging Face cache dir for the weights")
    feature_layer: int = doc(-2, "hidden layer fed to the adapter (-2: LLaVA's penultimate)")
    s2_scales: list[int] = doc([], "S2-Wrapper image sizes, base first (e.g. [336, 672, 1008]); "
                                   "[] = the plain tower. Labels stay the base tower's")


CHAT_TEMPLATES = ("auto", "vicuna_v1")


@dataclasses.dataclass
class LLMConfig:
    path: str = doc("lmsys/vicuna-7b-v1.5", "Hugging Face model dir or hub id (from the local cache)")
    dtype: str = doc("auto", "auto (GPU: bf16 when frozen, fp32 masters when trained; CPU: fp32) "
                             "| float32 | bfloat16 | float16")
    gradient_checkpointing: bool = doc(False, "recompute LLM activations in backward")
    chat_template: str = doc("auto", "stage 2's prompt format: auto (the tokenizer's own chat "
                                     "template; an error if it has none) | vicuna_v1 (LLaVA-1.5's "
                                     "conv_vicuna_v1, for Vicuna-v1.5, which ships none)")


@dataclasses.dataclass
class DataConfig:
    json: str = doc("data/blip_laion_cc_sbu_558k.json", "LLaVA-format conversations (a path or "
                                                       "a URL: s3://, gs://)")
    image_root: str = doc("data/images", "folder or bucket prefix the JSON's image paths are "
                                         "relative to; a path '<name>.tar/<member>' is read from "
                                         "that webdataset tar under it")
    shards: str | None = doc("shards/llava-pretrain-vitl336", "label run dir or bucket prefix "
                                                             "(null: no labels, lambda must be 0)")
    cache_dir: str | None = doc(None, "local folder for label shards and tars read from a bucket "
                                      "and the JSON converted for reading (default: $SEA_CACHE/data, else "
                                      "<system temp>/sea-cache); shared by a node's ranks")
    cache_limit_gb: float = doc(20.0, "bound on that folder, least recently used evicted first")
    max_length: int = doc(2048, "tokens per sample, image tokens included")
    truncation: str = doc("drop", "when image tokens would not fit: drop (skip, counted) | error")
    num_workers: int = doc(-1, "decode worker processes per rank; -1: from the machine (its cores "
                               "per rank minus one, at most 8). Speed only: the sample order does "
                               "not depend on it, and a resume may change it")
    shuffle_block: int = doc(256, "rows per shuffle block; blocks are shuffled, then rows within a window")
    shuffle_window: int = doc(8, "blocks whose rows are mixed together (each loader worker holds "
                                 "at most two windows of decoded rows)")
    holdout_images: int = doc(256, "first N labelled images kept out of training for alignment eval")
    max_error_rate: float = doc(0.05, "largest share of unreadable images (missing, corrupt) a run "
                                      "may meet; more stops it, naming the first files (as "
                                      "extraction's run.max_error_rate)")


@dataclasses.dataclass
class SEAConfig:
    weight: float = doc(1.0, "lambda in L = L_g + lambda * L_a; 0 = plain LLaVA pretraining")
    window: int = doc(2, "k: one patch sampled per k x k window")
    log_tau_init: float = doc(0.0, "initial log-temperature (paper's 'tau = 0' read as log tau)")
    learn_tau: bool = doc(True, "temperature is a learnable parameter")
    tau_lr_scale: float = doc(10.0, "the temperature's learning rate as a multiple of optim.lr "
                                    "(same schedule): Adam moves a parameter about lr a step, so "
                                    "at 1x (1e-3) log tau moves ~0.1 in a 100-step stage 1 and "
                                    "the temperature is learnable in name only; 10x lets it reach "
                                    "CLIP's range within one stage 1 (docs/training.md)")
    top_k: int = doc(0, "use each patch's first k kept labels (the highest-scored); 0 = all the "
                        "shards' top n. The paper's n = 10 is for a 41k-word list; with a small "
                        "list, k = 1 keeps the sampled pairs as precise as the top-1 label")
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
    report_to: list[str] = doc(["tensorboard"], "where metrics go besides metrics.jsonl (always "
                                                "written): any of tensorboard, wandb ([] for none)")
    wandb_project: str = doc("sea", "wandb project (log.report_to has wandb; WANDB_MODE=offline works)")
    run_name: str | None = doc(None, "run name for wandb/TensorBoard (default: log.output's folder name)")
    progress: bool = doc(True, "progress bar")
    overwrite: bool = doc(False, "start over in a log.output that already holds checkpoints or "
                                 "final/ (they are deleted); without it such a run is refused")


@dataclasses.dataclass
class DistConfig:
    strategy: str = doc("ddp", "ddp | fsdp (shards the LLM's decoder layers; for LLMs that do not fit one device)")
    timeout_s: float = doc(1800.0, "seconds a collective waits for the other ranks before the job "
                                   "ends with an error naming the rank (a stuck or dead rank)")


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
        bad = [r for r in self.log.report_to if r not in ("tensorboard", "wandb", "jsonl")]
        if bad:
            raise ConfigError(f"log.report_to: unknown '{bad[0]}' (any of tensorboard, wandb; "
                              f"jsonl is always on)")
        if self.data.num_workers < -1:
            raise ConfigError("data.num_workers must be >= 0, or -1 for the machine's cores")
        if self.dist.strategy not in ("ddp", "fsdp"):
            raise ConfigError(f"dist.strategy must be ddp or fsdp, got '{self.dist.strategy}'")
        if self.dist.timeout_s <= 0:
            raise ConfigError(f"dist.timeout_s must be > 0, got {self.dist.timeout_s}")
        if self.sea.weight > 0 and not self.data.shards:
            raise ConfigError("sea.weight > 0 needs data.shards (the label run)")
        if not 0.0 <= self.data.max_error_rate <= 1.0:
            raise ConfigError(f"data.max_error_rate must be in [0, 1], got {self.data.max_error_rate}")
        if self.data.truncation not in ("drop", "error"):
            raise ConfigError(f"data.truncation must be drop or error, got '{self.data.truncation}'")
        if self.llm.chat_template not in CHAT_TEMPLATES:
            raise ConfigError(f"llm.chat_template must be one of {', '.join(CHAT_TEMPLATES)}, "
                              f"got '{self.llm.chat_template}'")
        if self.sea.label_tokenization not in ("space", "bare"):
            raise ConfigError("sea.label_tokenization must be space or bare")
        if self.optim.global_batch_size % self.optim.micro_batch_size:
            raise ConfigError("optim.global_batch_size must be a multiple of optim.micro_batch_size")
        if self.sea.top_k < 0:
            raise ConfigError("sea.top_k must be >= 0 (0 = every kept label)")
        if self.sea.tau_lr_scale < 0:
            raise ConfigError("sea.tau_lr_scale must be >= 0")
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
class FinetuneLogConfig(LogConfig):
    output: str = doc("runs/finetune", "run dir: checkpoints, metrics.jsonl, tensorboard/")


@dataclasses.dataclass
class FinetuneConfig(PretrainConfig):
    log: FinetuneLogConfig = dataclasses.field(default_factory=FinetuneLogConfig)
    data: FinetuneDataConfig = dataclasses.field(default_factory=FinetuneDataConfig)
    sea: FinetuneSEAConfig = dataclasses.field(default_factory=FinetuneSEAConfig)
    optim: FinetuneOptimConfig = dataclasses.field(default_factory=FinetuneOptimConfig)
    init_from: str | None = doc(None, "stage-1 run dir (its final/adapter.safetensors, checked "
                                      "against this config) or a LLaVA mm_projector.bin")


# LLaVA-1.5's pretrain.sh / finetune.sh flags (HF TrainingArguments) -> our keys, or why there
# is none. The CLI suggests these for an unknown --flag; the README's flag table is this table.
LLAVA_FLAGS = {
    "model_name_or_path": "llm.path",
    "version": "the prompt format follows the stage: plain in pretrain, the tokenizer's chat "
               "template (Vicuna: LLaVA-1.5's v1 fallback) in finetune",
    "data_path": "data.json",
    "image_folder": "data.image_root",
    "vision_tower": "vision.model",
    "mm_vision_select_layer": "vision.feature_layer",
    "mm_vision_select_feature": "fixed: patch tokens (class token dropped)",
    "mm_projector_type": "fixed: mlp2x_gelu",
    "pretrain_mm_mlp_adapter": "init_from",
    "tune_mm_mlp_adapter": "implied by the stage: pretrain trains the adapter only",
    "mm_use_im_start_end": "not supported (LLaVA-1.5 uses false)",
    "mm_use_im_patch_token": "not supported (LLaVA-1.5 uses false)",
    "image_aspect_ratio": "images are resized and centre-cropped by the tower's transform "
                          "(LLaVA-1.5 finetune pads to square; not supported)",
    "group_by_modality_length": "not supported (blocks are shuffled, then rows in a window)",
    "output_dir": "log.output",
    "num_train_epochs": "optim.epochs",
    "max_steps": "optim.max_steps",
    "per_device_train_batch_size": "optim.micro_batch_size",
    "gradient_accumulation_steps": "derived: optim.global_batch_size / (micro batch x ranks)",
    "learning_rate": "optim.lr",
    "mm_vision_tower_lr": "optim.vision_lr",
    "weight_decay": "optim.weight_decay",
    "warmup_ratio": "optim.warmup_ratio",
    "lr_scheduler_type": "fixed: cosine after linear warmup",
    "max_grad_norm": "optim.grad_clip",
    "seed": "optim.seed",
    "logging_steps": "log.every",
    "save_steps": "log.save_every",
    "save_total_limit": "log.keep_last",
    "report_to": "log.report_to",
    "run_name": "log.run_name",
    "model_max_length": "data.max_length",
    "gradient_checkpointing": "llm.gradient_checkpointing",
    "dataloader_num_workers": "data.num_workers",
    "bf16": "automatic: bf16 autocast on GPUs (llm.dtype for the weights)",
    "tf32": "not a setting (PyTorch's default)",
    "deepspeed": "dist.strategy (ddp, or fsdp for ZeRO-3-like sharding of the LLM)",
    "lazy_preprocess": "always lazy: samples are built when read",
    "freeze_backbone": "implied by the stage: the LLM trains only in finetune",
}
