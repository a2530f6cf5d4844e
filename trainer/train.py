"""The training loop, shared by stage 1 (pretrain) and stage 2 (finetune).

``build`` assembles the parts from a config; ``train`` runs epochs of micro-batches and
calls ``train_step`` per optimizer step; everything resumable sits in ``TrainState`` and the
checkpoint (model's trainable weights, optimizer, scheduler, RNG, data position).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pipeline.config import to_dict
from trainer import checkpoint
from trainer import distributed as D
from trainer.align_eval import evaluate_alignment
from trainer.data import SampleSource, StreamDataset, holdout_rows
from trainer.model import MLLM
from trainer.sea_loss import AlignmentLoss, load_word_tokens
from trainer.task import SEATask


class LLMNotFound(RuntimeError):
    pass


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches this rank consumed in the current epoch
    samples: int = 0


@dataclass
class Parts:
    cfg: object
    stage: str
    dist: D.Dist
    device: torch.device
    encoder: object
    tokenizer: object
    wordlist: object
    word_tokens: object
    task: SEATask
    source: SampleSource
    dataset: StreamDataset
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    accum: int
    total_steps: int


def pick_device(name: str, d: D.Dist) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and d.enabled:
        return torch.device("cuda", d.local_rank)
    return torch.device(name)


def load_llm(path: str, dtype: str, device: torch.device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
                   "float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch_dtype)
    except OSError as e:
        raise LLMNotFound(
            f"LLM '{path}' is not a local folder nor in the Hugging Face cache ({e}). On a machine "
            f"with network access run `huggingface-cli download {path}` (fills ~/.cache/huggingface), "
            f"or point llm.path at a folder with config.json, the weights and the tokenizer.") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok, model.to(device)


def expected_label_metadata(encoder, wordlist) -> dict:
    return {"encoder": encoder.name, "weights_sha256": encoder.weights_sha256,
            "grid": list(encoder.grid), "image_size": list(encoder.image_size),
            "wordlist_sha256": wordlist.sha256, "wordlist_size": len(wordlist)}


def lr_lambda(total: int, warmup_ratio: float):
    warm = math.ceil(total * warmup_ratio)

    def f(step: int) -> float:  # HF's get_cosine_schedule_with_warmup, as LLaVA uses it
        if step < warm:
            return (step + 1) / max(1, warm)
        progress = (step - warm) / max(1, total - warm)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    return f


def build(cfg, stage: str = "pretrain") -> Parts:
    from pipeline.encoders import load_encoder
    from wordlist import load_wordlist

    d = D.from_env()
    device = pick_device(cfg.device, d)
    d = D.init(device)
    torch.manual_seed(cfg.optim.seed)
    enc = load_encoder(cfg.vision.model, cfg.vision.pretrained, False, cfg.vision.cache_dir, device)
    tok, llm = load_llm(cfg.llm.path, cfg.llm.dtype, device)
    if cfg.llm.gradient_checkpointing:
        llm.gradient_checkpointing_enable()
    wl = load_wordlist(cfg.sea.wordlist)
    expect = expected_label_metadata(enc, wl)
    fmt = "plain" if stage == "pretrain" else "chat"
    source = SampleSource(cfg.data, tok, enc.preprocess, fmt, expect)
    mllm = MLLM(enc.model.visual, llm, cfg.vision.feature_layer).to(device)
    if cfg.data.shards and list(mllm.grid) != list(source.meta["grid"]):
        raise ValueError(f"label grid {source.meta['grid']} != visual-token grid {list(mllm.grid)}")
    train_llm = stage == "finetune"
    train_vision = stage == "finetune" and getattr(cfg.optim, "vision_lr", 0) > 0
    mllm.set_trainable(adapter=True, llm=train_llm, vision=train_vision)
    word_tokens = load_word_tokens(tok, wl, cfg.sea.label_tokenization)
    align = None
    if cfg.sea.weight > 0:
        align = AlignmentLoss(word_tokens, mllm.grid, cfg.sea.window, cfg.sea.log_tau_init,
                              cfg.sea.learn_tau, cfg.sea.min_tau).to(device)
    task = SEATask(mllm, align, cfg.sea.weight, cfg.data.max_length, cfg.data.truncation,
                   train_vision)
    o = cfg.optim
    accum = o.global_batch_size // (o.micro_batch_size * d.world)
    if accum < 1 or accum * o.micro_batch_size * d.world != o.global_batch_size:
        raise ValueError(f"global batch {o.global_batch_size} is not micro {o.micro_batch_size} "
                         f"x world {d.world} x an integer accumulation")
    dataset = StreamDataset(source, o.micro_batch_size, o.seed, d.rank, d.world,
                            cfg.data.num_workers, cfg.data.shuffle_window,
                            cfg.data.holdout_images if cfg.data.shards else 0)
    per_epoch = sum(dataset.batches_per_worker()) // accum
    if per_epoch == 0:
        raise ValueError(f"{source.total_rows} rows give no optimizer step at global batch "
                         f"{o.global_batch_size}")
    total = per_epoch * o.epochs
    if o.max_steps:
        total = min(total, o.max_steps)
    groups = param_groups(task, cfg)
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, o.warmup_ratio))
    return Parts(cfg, stage, d, device, enc, tok, wl, word_tokens, task, source, dataset,
                 optimizer, scheduler, accum, total)


def param_groups(task: SEATask, cfg) -> list[dict]:
    vision_lr = getattr(cfg.optim, "vision_lr", 0)
    main, vision = [], []
    for name, p in task.named_parameters():
        if p.requires_grad:
            (vision if name.startswith("mllm.vision.") else main).append(p)
    groups = [{"params": main}]
    if vision:
        groups.append({"params": vision, "lr": vision_lr})
    return groups


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """SEA sampling randomness from (seed, step, micro-batch, rank): nothing to checkpoint."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + micro) * 101 + rank)


def train_step(p: Parts, micro_batches: list[dict], step: int, gather=None) -> dict:
    """One optimizer step over ``accum`` micro-batches; returns averaged metrics."""
    task, opt = p.task, p.optimizer
    opt.zero_grad(set_to_none=True)
    sums = {"loss": 0.0, "lm_loss": 0.0, "align_loss": 0.0, "pairs": 0, "dropped": 0}
    tau = None
    for i, mb in enumerate(micro_batches):
        if not mb["input_ids"]:
            continue
        gen = step_generator(p.cfg.optim.seed, step, i, p.dist.rank)
        with _autocast(p.device):
            out = task(mb, gen, gather)
        (out["loss"] / len(micro_batches)).backward()
        for k in ("loss", "lm_loss", "align_loss"):
            sums[k] += float(out[k].detach()) / len(micro_batches)
        sums["pairs"] += out["pairs"]
        sums["dropped"] += out["dropped"]
        tau = out.get("tau", tau)
    params = [q for g in opt.param_groups for q in g["params"]]
    if p.dist.enabled:
        for q in params:  # average gradients over ranks (what DDP does in its hooks)
            if q.grad is None:
                q.grad = torch.zeros_like(q)
            torch.distributed.all_reduce(q.grad)
            q.grad /= p.dist.world
    grad_norm = None
    if p.cfg.optim.grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, p.cfg.optim.grad_clip))
    opt.step()
    p.scheduler.step()
    metrics = {**sums, "lr": opt.param_groups[0]["lr"], "grad_norm": grad_norm}
    if tau is not None:
        metrics["tau"] = tau
    return metrics


def eval_alignment(p: Parts, max_images: int | None = None) -> dict | None:
    if not p.cfg.data.shards or p.cfg.data.holdout_images <= 0:
        return None
    n = p.cfg.data.holdout_images if max_images is None else min(max_images, p.cfg.data.holdout_images)

    def rows():
        for r in holdout_rows(p.source, n):
            s = p.source.sample(r)
            if s is not None and s["pixel"] is not None:
                yield {"pixel": s["pixel"], "label_ids": s["label_ids"]}

    was = p.task.training
    p.task.eval()
    try:
        return evaluate_alignment(p.task.mllm, p.word_tokens, rows(), lambda r: r, device=p.device)
    finally:
        p.task.train(was)


def rng_state() -> dict:
    import random

    import numpy as np

    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(p: Parts, st: TrainState) -> Path | None:
    state = {"train_state": asdict(st), "optimizer": p.optimizer.state_dict(),
             "scheduler": p.scheduler.state_dict(), "world": p.dist.world,
             "rng": rng_state(), "stage": p.stage}
    path = None
    if p.dist.is_main():
        path = checkpoint.save(p.cfg.log.output, st.step, p.task, state, to_dict(p.cfg),
                               keep=p.cfg.log.keep_last)
    D.barrier(p.dist)
    return path


def resume(p: Parts, st: TrainState) -> TrainState:
    where = p.cfg.resume
    path = checkpoint.latest(p.cfg.log.output) if where == "latest" else Path(where)
    if path is None:
        return st  # 'latest' with nothing saved yet: a fresh start
    state = checkpoint.load(path, p.task)
    if state["world"] != p.dist.world:
        raise ValueError(f"checkpoint {path} was written by {state['world']} processes, this run "
                         f"has {p.dist.world}: the data position would not line up; resume with "
                         f"the same world size")
    if state.get("stage", p.stage) != p.stage:
        raise ValueError(f"checkpoint {path} is from stage '{state['stage']}', not '{p.stage}'")
    p.optimizer.load_state_dict(state["optimizer"])
    p.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return TrainState(**state["train_state"])


class Logger:
    def __init__(self, cfg, main: bool):
        self.main = main
        self.out = Path(cfg.log.output)
        self.tb = None
        if main:
            self.out.mkdir(parents=True, exist_ok=True)
            if cfg.log.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.tb = SummaryWriter(str(self.out / "tensorboard"))
                except ImportError:
                    self.tb = None

    def log(self, step: int, metrics: dict, kind: str = "train") -> None:
        if not self.main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"kind": kind, "step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float) and v is not None:
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def train(cfg, stage: str = "pretrain", parts: Parts | None = None,
          stop_after: int | None = None) -> dict:
    """Run (or resume) a stage; ``stop_after`` ends early after that step (tests: a kill)."""
    from tqdm.auto import tqdm

    p = parts or build(cfg, stage)
    st = TrainState()
    if cfg.resume:
        st = resume(p, st)
    gather = D.gather_pairs if (p.dist.enabled and cfg.sea.gather_negatives) else None
    logger = Logger(cfg, p.dist.is_main())
    bar = tqdm(total=p.total_steps, initial=st.step, desc=f"{stage}", unit="step",
               disable=not (cfg.log.progress and p.dist.is_main()))
    p.task.train()
    p.task.mllm.set_trainable(adapter=True, llm=stage == "finetune",
                              vision=p.task.train_vision)
    last_eval = None
    t_last, samples_last = time.perf_counter(), st.samples
    while st.step < p.total_steps:
        p.dataset.set_position(st.epoch, st.batches_in_epoch)
        loader = DataLoader(p.dataset, batch_size=None, num_workers=cfg.data.num_workers)
        micro: list[dict] = []
        for batch in loader:
            st.batches_in_epoch += 1
            micro.append(batch)
            if len(micro) < p.accum:
                continue
            metrics = train_step(p, micro, st.step, gather)
            st.samples += sum(len(b["input_ids"]) for b in micro) * p.dist.world
            metrics["bad_images"] = sum(b.get("bad", 0) for b in micro)
            micro = []
            st.step += 1
            bar.update(1)
            if st.step % cfg.log.every == 0 or st.step == p.total_steps:
                now = time.perf_counter()
                metrics["samples_per_s"] = (st.samples - samples_last) / max(now - t_last, 1e-9)
                t_last, samples_last = now, st.samples
                logger.log(st.step, {**metrics, "epoch": st.epoch})
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", la=f"{metrics['align_loss']:.3f}")
            if cfg.log.eval_every and st.step % cfg.log.eval_every == 0 and p.dist.is_main():
                last_eval = eval_alignment(p)
                logger.log(st.step, last_eval or {}, kind="eval")
            if st.step % cfg.log.save_every == 0 and st.step < p.total_steps:
                save_checkpoint(p, st)
            if st.step >= p.total_steps or (stop_after is not None and st.step >= stop_after):
                break
        if stop_after is not None and st.step >= stop_after and st.step < p.total_steps:
            save_checkpoint(p, st)
            bar.close()
            logger.close()
            return {"step": st.step, "stopped_early": True}
        if st.step < p.total_steps:  # the epoch ran out: next epoch
            st.epoch += 1
            st.batches_in_epoch = 0
    bar.close()
    final = save_checkpoint(p, st)
    if p.dist.is_main():
        last_eval = eval_alignment(p)
        logger.log(st.step, last_eval or {}, kind="eval")
        export(p, Path(cfg.log.output))
    logger.close()
    return {"step": st.step, "samples": st.samples, "checkpoint": str(final), "align": last_eval}


def export(p: Parts, out: Path) -> None:
    """The adapter (and temperature) as safetensors beside the run, for stage 2 or inference."""
    from safetensors.torch import save_file

    tensors = {f"adapter.{k}": v.detach().cpu().contiguous()
               for k, v in p.task.mllm.adapter.state_dict().items()}
    if p.task.align is not None:
        tensors["log_tau"] = p.task.align.log_tau.detach().cpu().reshape(1)
    save_file(tensors, str(out / "adapter.safetensors"))
    (out / "model.json").write_text(json.dumps({
        "vision": to_dict(p.cfg.vision), "llm": p.cfg.llm.path, "stage": p.stage,
        "grid": list(p.task.mllm.grid), "adapter": "mlp2x_gelu"}, indent=2))
