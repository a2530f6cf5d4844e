"""The training loop, shared by stage 1 (pretrain) and stage 2 (finetune).

``build`` assembles the parts from a config; ``train`` runs epochs of micro-batches and calls
``train_step`` per optimizer step; everything resumable is behind ``CheckpointManager``
(trainable weights, optimizer, scheduler, every rank's RNG, the data position). The data
loader workers need no RNG state: the order derives from (seed, epoch) and SEA's draws from
(seed, epoch, global micro-batch): both come back from the data position alone, on any world
size.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from seacore.device import autocast, pick_device
from trainer import checkpoint
from trainer import distributed as D
from trainer.align_eval import evaluate_alignment
from trainer.data import StreamDataset, data_problem, format_report, holdout_rows
from trainer.faults import Preempted, Signals, all_counts, stop_requested
from trainer.final import init_adapter, write_final
from trainer.llm import load_llm
from trainer.manager import CheckpointManager, TrainState
from trainer.model import MLLM
from trainer.prompts import use_chat_template
from trainer.runlog import Logger
from trainer.s2 import tower_transform
from trainer.sea_loss import AlignmentLoss, StepSample, load_word_tokens
from trainer.sources import Source, open_source
from trainer.task import SEATask
from trainer.watch import ChanceWatch, DropWatch


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
    task: SEATask  # the module itself (weights, eval, export)
    model: torch.nn.Module  # what forward goes through: task, or task under DDP/FSDP
    source: Source
    dataset: StreamDataset
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ckpt: CheckpointManager
    accum: int
    per_epoch: int  # optimizer steps per epoch
    total_steps: int
    num_workers: int  # loader workers per rank (data.num_workers, -1 resolved)


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
    device = pick_device(cfg.device, d.local_rank if d.enabled else None)
    d = D.init(device, cfg.dist.timeout_s)
    workers = cfg.data.num_workers  # decoding parallelism only: the order does not depend on it
    if workers < 0:
        workers = auto_workers(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    torch.manual_seed(cfg.optim.seed)
    enc = load_encoder(cfg.vision.model, cfg.vision.pretrained, False, cfg.vision.cache_dir, device,
                       section="vision")
    sharded = d.enabled and cfg.dist.strategy == "fsdp"
    tok, llm = load_llm(cfg.llm.path, cfg.llm.dtype, device, trained=stage == "finetune",
                        shard=D.llm_sharder(device) if sharded else None)
    if stage == "finetune" or cfg.llm.chat_template != "auto":  # stage 1's plain format needs none
        use_chat_template(tok, cfg.llm.chat_template, cfg.llm.path)
    if cfg.llm.gradient_checkpointing:
        # transformers 5 renamed it (the old name warns); 4.x has only the old one
        enable = getattr(llm, "activation_checkpointing_enable", None) or llm.gradient_checkpointing_enable
        enable()
        llm.config.use_cache = False
    wl = load_wordlist(cfg.sea.wordlist)
    source = open_source(cfg.data, tok, tower_transform(enc.preprocess, cfg.vision.s2_scales), "plain" if stage == "pretrain" else "chat",
                          expected_label_metadata(enc, wl))
    mllm = MLLM(enc.model.visual, llm, cfg.vision.feature_layer, cfg.vision.s2_scales).to(device)
    if cfg.data.shards and list(mllm.grid) != list(source.meta["grid"]):
        raise ValueError(f"label grid {source.meta['grid']} != visual-token grid {list(mllm.grid)}")
    train_vision = stage == "finetune" and getattr(cfg.optim, "vision_lr", 0) > 0
    word_tokens = load_word_tokens(tok, wl, cfg.sea.label_tokenization)
    align = None
    if cfg.sea.weight > 0:
        align = AlignmentLoss(word_tokens, mllm.grid, cfg.sea.window, cfg.sea.log_tau_init,
                              cfg.sea.learn_tau, cfg.sea.min_tau, cfg.sea.objective,
                              cfg.sea.top_k).to(device)
    task = SEATask(mllm, align, cfg.sea.weight, cfg.data.max_length, cfg.data.truncation,
                   train_vision)
    if stage == "finetune" and getattr(cfg, "init_from", None):
        loaded = init_adapter(task, cfg.init_from, cfg, enc)
        if d.is_main():
            print(f"init_from: {loaded}", file=sys.stderr)
    mllm.set_trainable(adapter=True, llm=stage == "finetune", vision=train_vision)
    o = cfg.optim
    accum = o.global_batch_size // (o.micro_batch_size * d.world)
    if accum < 1 or accum * o.micro_batch_size * d.world != o.global_batch_size:
        raise ValueError(f"global batch {o.global_batch_size} is not micro {o.micro_batch_size} "
                         f"x world {d.world} x an integer accumulation")
    holdout = cfg.data.holdout_images if cfg.data.shards else 0
    dataset = StreamDataset(source, o.micro_batch_size, o.seed, d.rank, d.world,
                            cfg.data.shuffle_window, holdout,
                            align.draws(o.seed) if align is not None else None,
                            o.global_batch_size)
    if d.is_main():
        print(f"data ({stage}): {format_report(source.report)}", file=sys.stderr)
    problem = data_problem(source.report, dataset.train_rows(), o.global_batch_size, holdout)
    if problem:
        raise ValueError(problem)
    per_epoch = dataset.steps_per_epoch()
    total = per_epoch * o.epochs
    if o.max_steps:
        total = min(total, o.max_steps)
    # text-only batches leave the vision tower (and without labels, the temperature) unused
    model = D.wrap(task, d, cfg.dist.strategy, device, find_unused=stage == "finetune")
    optimizer = torch.optim.AdamW(param_groups(task, cfg), lr=o.lr, betas=tuple(o.betas),
                                  weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total, o.warmup_ratio))
    ckpt = CheckpointManager(cfg, stage, d, task, optimizer, scheduler)
    return Parts(cfg, stage, d, device, enc, tok, wl, word_tokens, task, model, source, dataset,
                 optimizer, scheduler, ckpt, accum, per_epoch, total, workers)


def auto_workers(ranks_here: int) -> int:
    """Decode workers per rank: the cores this rank may use, minus its own, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        cores = os.cpu_count() or 1
    return max(0, min(8, cores // max(1, ranks_here) - 1))


def param_groups(task: SEATask, cfg) -> list[dict]:
    """The adapter (and LLM) at optim.lr; the vision tower at optim.vision_lr; the temperature
    at sea.tau_lr_scale x optim.lr (one parameter that Adam moves about lr a step: at the
    adapter's rate it barely leaves its start in one stage 1)."""
    vision_lr = getattr(cfg.optim, "vision_lr", 0)
    main, vision, tau = [], [], []
    for name, p in task.named_parameters():
        if p.requires_grad:
            if name.startswith("mllm.vision."):
                vision.append(p)
            elif name == "align.log_tau":
                tau.append(p)
            else:
                main.append(p)
    groups = [{"params": main}]
    if vision:
        groups.append({"params": vision, "lr": vision_lr})
    if tau:
        groups.append({"params": tau, "lr": cfg.optim.lr * cfg.sea.tau_lr_scale})
    return groups


def shared_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The same on every rank (local micro-batch index): picks among gathered duplicates."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 100_003 + micro) ^ 0x5EA5EA5EA)


def step_sample(p: Parts, micro_batches: list[dict]) -> StepSample | None:
    """The step's SEA pairs, drawn by the loader with each micro-batch (``Draws``), on the
    device (None when L_a is off)."""
    if p.task.align is None or p.task.weight <= 0:
        return None
    for mb in micro_batches:
        if mb.get("label_ids") is not None and mb.get("sea") is None:
            # never train with lambda > 0 and L_a silently 0
            raise ValueError("a labelled micro-batch carries no SEA draws ('sea'): build the "
                             "StreamDataset with draws=task.align.draws(seed), as build() does")
    cuda = p.device.type == "cuda"
    return StepSample([mb["sea"].to(p.device, non_blocking=cuda) if mb.get("sea") is not None
                       else None for mb in micro_batches])


def forward_backward(p: Parts, micro_batches: list[dict], step: int, gather=None) -> dict:
    """Gradients of one optimizer step's micro-batches (averaged over them and the ranks)."""
    sums = {"loss": 0.0, "lm_loss": 0.0, "align_loss": 0.0, "align_chance": 0.0, "pairs": 0,
            "dropped": 0}
    n = len(micro_batches)
    sample = step_sample(p, micro_batches)
    for i, mb in enumerate(micro_batches):
        # an empty micro-batch (every image unreadable) still runs forward and backward, at
        # zero loss: its rank then joins every collective the others make (DDP's all-reduce,
        # FSDP's gathers, SEA's gathered negatives), so no rank waits forever
        shared = shared_generator(p.cfg.optim.seed, step, i) if gather is not None else None
        # DDP: only the last micro-batch all-reduces gradients
        sync = i == n - 1 or not hasattr(p.model, "no_sync")
        ctx = contextlib.nullcontext() if sync else p.model.no_sync()
        with ctx, autocast(p.device):
            out = p.model(mb, sample, i, gather, shared)
            (out["loss"] / n).backward()
        for k in ("loss", "lm_loss", "align_loss"):
            sums[k] += float(out[k].detach()) / n
        sums["pairs"] += out["pairs"]
        # L_a of tokens that match no label better than another: ln(pairs), averaged as L_a is
        sums["align_chance"] += math.log(out["pairs"]) / n if out["pairs"] > 1 else 0.0
        sums["dropped"] += out["dropped"]
    keys = ("loss", "lm_loss", "align_loss", "align_chance")
    for k, v in zip(keys, D.mean_over_ranks([sums[k] for k in keys], p.dist, p.device), strict=True):
        sums[k] = v
    if p.task.align is not None:  # once per step (it changes only at the optimizer step)
        sums["tau"] = float(p.task.align.tau.detach())
    return sums


def train_step(p: Parts, micro_batches: list[dict], step: int, gather=None) -> dict:
    p.optimizer.zero_grad(set_to_none=True)
    metrics = forward_backward(p, micro_batches, step, gather)
    params = [q for g in p.optimizer.param_groups for q in g["params"]]
    grad_norm = None
    if p.cfg.optim.grad_clip > 0:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, p.cfg.optim.grad_clip))
    p.optimizer.step()
    p.scheduler.step()
    return {**metrics, "lr": p.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm}


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
    # under FSDP every rank evaluates (the parameters are gathered from all): the root unit and
    # the embedding table, whose forwards evaluation does not go through
    embed = p.task.mllm.llm.get_input_embeddings()
    try:
        with D.unsharded(p.task), D.unsharded(embed):
            return evaluate_alignment(p.task.mllm, p.word_tokens, rows(), lambda r: r,
                                      device=p.device)
    finally:
        if was:
            set_train_mode(p)


def evaluates(p: Parts) -> bool:
    """Whether this rank runs the alignment evaluation: rank 0, or every rank under FSDP."""
    return p.dist.is_main() or (p.dist.enabled and p.cfg.dist.strategy == "fsdp")


def set_train_mode(p: Parts) -> None:
    """Train mode for what trains; frozen parts stay in eval mode (no dropout on them)."""
    p.task.train()
    p.task.mllm.set_trainable(adapter=True, llm=p.stage == "finetune", vision=p.task.train_vision)


def check_output(cfg, main: bool) -> None:
    """A run into a folder that holds another run's checkpoints or final/ is refused unless it
    resumes (``resume``) or starts over on purpose (``log.overwrite``, which deletes them)."""
    out = Path(cfg.log.output)
    found = sorted(checkpoint.ckpt_root(out).glob("step-*")) + [d for d in [out / "final"] if d.exists()]
    if cfg.resume or not found:
        return
    if not cfg.log.overwrite:
        raise ValueError(f"log.output {out} already holds a run ({found[-1].name}): continue it with "
                         f"resume=latest, start over with log.overwrite=true (deletes its "
                         f"checkpoints, final/ and metrics), or pick another log.output")
    if main:
        for d in ("checkpoints", "final", "tensorboard"):
            shutil.rmtree(out / d, ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)


def train(cfg, stage: str = "pretrain", parts: Parts | None = None,
          stop_after: int | None = None, on_step=None) -> dict:
    """Run (or resume) a stage. ``stop_after`` returns right after that step without saving:
    what a killed job leaves behind (tests resume from the last periodic checkpoint).
    ``on_step(step)`` is called after every optimizer step (a learning curve's evaluations);
    the train mode of what trains is restored after it.
    Rank 0 holds ``log.output``'s writer lock for the whole job (``pipeline.lock``); the lock,
    the signal handlers, the logger and the progress bar are released on every exit."""
    from pipeline.lock import OutputLock

    main = D.from_env().is_main()
    with contextlib.ExitStack() as stack:
        if main:
            stack.enter_context(OutputLock(cfg.log.output, key="log.output"))
        signals = Signals()
        stack.callback(signals.restore)
        check_output(cfg, main)
        p = parts or build(cfg, stage)
        st = p.ckpt.resume() if cfg.resume else TrainState()
        final_dir = Path(cfg.log.output) / "final"
        if cfg.resume and st.step >= p.total_steps and (final_dir / "sea_model.json").is_file():
            # a finished run: nothing to train, log or save again
            if main:
                print(f"{cfg.log.output} already finished at step {st.step}: nothing to do",
                      file=sys.stderr)
            return {"step": st.step, "samples": st.samples, "checkpoint": None, "align": None,
                    "losses": [], "final": str(final_dir)}
        return _Loop(p, st, stack, signals, stop_after, on_step).run()


class _Loop:
    """One stage's optimizer steps, from ``st`` to the end (or ``stop_after``), then the
    final checkpoint, evaluation and ``final/``."""

    def __init__(self, p: Parts, st: TrainState, stack: contextlib.ExitStack, signals: Signals,
                 stop_after: int | None, on_step):
        from tqdm.auto import tqdm

        cfg = p.cfg
        self.p, self.st, self.signals = p, st, signals
        self.stop_after, self.on_step = stop_after, on_step
        self.gather = D.gather_pairs if (p.dist.enabled and cfg.sea.gather_negatives) else None
        self.logger = Logger(cfg, p.dist.is_main(), from_step=st.step)
        stack.callback(self.logger.close)
        # tqdm's own columns give the ETA; the postfix adds loss, L_a (lambda > 0) and samples/s
        self.bar = tqdm(total=p.total_steps, initial=st.step, desc=p.stage, unit="step",
                        dynamic_ncols=True, disable=not (cfg.log.progress and p.dist.is_main()))
        stack.callback(self.bar.close)
        self.sea_on = p.task.align is not None and p.task.weight > 0
        self.watch = (ChanceWatch(p.total_steps, cfg.sea.log_tau_init)
                      if self.sea_on and p.stage == "pretrain" else None)
        self.drops = DropWatch(cfg.data.max_error_rate)
        # where unreadable images are fixed: images are not looked up before training (issue 35)
        self.where = (f"{cfg.data.json} (image paths relative to data.image_root="
                      f"{cfg.data.image_root})")
        self.last_eval = None
        self.history: list[float] = []
        self.t_last, self.samples_last = time.perf_counter(), st.samples

    def run(self) -> dict:
        p, st = self.p, self.st
        set_train_mode(p)
        while st.step < p.total_steps:
            if st.steps_in_epoch >= p.per_epoch:
                st.epoch += 1
                st.steps_in_epoch = 0
            p.dataset.set_position(st.epoch, st.steps_in_epoch)
            loader = DataLoader(p.dataset, batch_size=None, num_workers=p.num_workers,
                                pin_memory=p.device.type == "cuda")
            micro: list[dict] = []
            for batch in loader:
                micro.append(batch)
                if len(micro) == p.accum:
                    self.step(micro)
                    micro = []
                    if st.step >= p.total_steps or st.steps_in_epoch >= p.per_epoch or self.stopping():
                        break
            if self.stopping():
                return {"step": st.step, "stopped_early": True, "losses": self.history}
            st.steps_in_epoch = p.per_epoch  # the epoch is over
        return self.finish()

    def stopping(self) -> bool:
        return self.stop_after is not None and self.stop_after <= self.st.step < self.p.total_steps

    def step(self, micro: list[dict]) -> None:
        p, st, cfg = self.p, self.st, self.p.cfg
        self.drops.add(micro)  # judged before the step: a batch of unreadable images trains nothing
        problem = self.drops.problem(*all_counts(p, self.drops.seen, self.drops.bad), st.step,
                                     self.where)
        if problem:
            raise ValueError(problem)
        metrics = train_step(p, micro, st.step, self.gather)
        self.drops.truncated += metrics["dropped"]
        st.samples += sum(len(b["input_ids"]) for b in micro) * p.dist.world
        metrics["bad_images"] = sum(b.get("bad", 0) for b in micro)
        st.step += 1
        st.steps_in_epoch += 1
        self.history.append(metrics["loss"])
        if self.watch is not None:
            line = self.watch.update(st.step, metrics["align_loss"], metrics["align_chance"],
                                     metrics.get("tau"))
            if line and p.dist.is_main():
                self.bar.write(f"warning: {line}", file=sys.stderr)
            metrics["align_at_chance"] = int(self.watch.fired)
        self.bar.update(1)
        if st.step % cfg.log.every == 0 or st.step == p.total_steps:
            self.log(metrics)
        # the last step's evaluation is the final one (logged once, in finish)
        if cfg.log.eval_every and st.step % cfg.log.eval_every == 0 and st.step < p.total_steps \
                and evaluates(p):
            self.last_eval = eval_alignment(p)
            self.logger.log(st.step, self.last_eval or {}, kind="eval")
        if self.on_step is not None:
            self.on_step(st.step)
            set_train_mode(p)
        got = stop_requested(self.signals.got, p) if st.step < p.total_steps else None
        if got is not None:
            path = p.ckpt.save(st)
            raise Preempted(got, st.step, path)
        if st.step % cfg.log.save_every == 0 and st.step < p.total_steps:
            p.ckpt.save(st)

    def log(self, metrics: dict) -> None:
        now = time.perf_counter()
        metrics["samples_per_s"] = (self.st.samples - self.samples_last) / max(now - self.t_last, 1e-9)
        self.t_last, self.samples_last = now, self.st.samples
        self.logger.log(self.st.step, {**metrics, "epoch": self.st.epoch})
        shown = {"loss": f"{metrics['loss']:.3f}"}
        if self.sea_on:
            shown["L_a"] = f"{metrics['align_loss']:.3f}"
            if self.watch is not None and self.watch.fired:
                shown["L_a"] += " (at chance)"
        shown["samples/s"] = f"{metrics['samples_per_s']:.1f}"
        self.bar.set_postfix(shown, refresh=False)

    def finish(self) -> dict:
        p, st, cfg = self.p, self.st, self.p.cfg
        self.bar.close()
        if st.samples == 0:  # every image failed to decode: never "succeed" having learnt nothing
            raise ValueError(f"trained on 0 samples in {st.step} steps: every sample was dropped "
                             f"(unreadable images; see the bad_images metric in "
                             f"{cfg.log.output}/metrics.jsonl)")
        problem = self.drops.problem(*all_counts(p, self.drops.seen, self.drops.bad), st.step,
                                     self.where, final=True)
        if problem:
            raise ValueError(problem)
        final = p.ckpt.save(st)
        if p.dist.is_main():
            print(self.drops.summary(st.samples), file=sys.stderr)
        if evaluates(p):
            self.last_eval = eval_alignment(p)
            self.logger.log(st.step, self.last_eval or {}, kind="eval")
        write_final(p, Path(cfg.log.output) / "final")
        watch = self.watch
        return {"step": st.step, "samples": st.samples, "checkpoint": str(final),
                "align": self.last_eval, "align_at_chance": bool(watch is not None and watch.fired),
                "tau": float(p.task.align.tau.detach()) if p.task.align is not None else None,
                "dropped": {"unreadable": self.drops.bad, "truncated": self.drops.truncated},
                "losses": self.history, "final": str(Path(cfg.log.output) / "final")}
