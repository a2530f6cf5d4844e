"""The one owner of a run's checkpoints (torchtitan's ``CheckpointManager`` is the model): what a
checkpoint holds (trainable weights and optimizer state, sharded; scheduler; every rank's RNG;
the data position), the check that a resume continues the same run, and putting it all back.
The file format, its markers and its verification are ``trainer.checkpoint``'s."""

from __future__ import annotations

import os
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from seacore.config import to_dict
from trainer import checkpoint
from trainer import distributed as D

# config keys that may change between a run and its resume: nothing that moves the data order
# or the schedule (optim.max_steps). The world size and data.num_workers may change: the
# sample order does not depend on them (trainer.data.StreamDataset); log.output too (a run
# folder copied or mounted elsewhere continues)
RESUME_FREE = ("resume", "log.output", "log.progress", "log.every", "log.eval_every", "log.save_every",
               "log.keep_last", "log.report_to", "log.wandb_project", "log.run_name",
               "log.overwrite", "dist.timeout_s", "data.max_error_rate", "data.num_workers",
               "data.cache_dir", "data.cache_limit_gb")


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    steps_in_epoch: int = 0  # optimizer steps done in the current epoch: the data position
    samples: int = 0


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _same_path(v):
    """A config value as compared on resume: a path that exists, resolved (a trailing '/',
    './' or a symlink is the same place); anything else as it is."""
    if not isinstance(v, str) or not v:
        return v
    prefix = "local-dir:" if v.startswith("local-dir:") else ""
    raw = os.path.expanduser(v[len(prefix):])
    return prefix + str(Path(raw).resolve()) if os.path.exists(raw) else v


def resume_identity(cfg) -> dict:
    flat = {}

    def walk(prefix, d):
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(key + ".", v)
            elif key not in RESUME_FREE:
                flat[key] = v

    walk("", to_dict(cfg))
    return flat


class CheckpointManager:
    """Saves and restores a run. Every method is collective under torchrun."""

    def __init__(self, cfg, stage: str, d: D.Dist, task: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler):
        self.cfg, self.stage, self.dist = cfg, stage, d
        self.task, self.optimizer, self.scheduler = task, optimizer, scheduler

    def _options(self, strict: bool = True):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # sharded (each rank its DTensor part), trainable weights only, the optimizer's
        # state keyed by parameter name (so it reshards and survives a changed world size)
        return StateDictOptions(ignore_frozen_params=True, flatten_optimizer_state_dict=True,
                                strict=strict)

    def tensors(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(every tensor to save or fill, by name; the optimizer's non-tensor values)."""
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        out = {f"model.{k}": v for k, v in get_model_state_dict(self.task, options=self._options()).items()}
        # a fresh optimizer gets its state initialised here (zero moments), the template
        # a load fills
        optim = get_optimizer_state_dict(self.task, self.optimizer, options=self._options())
        out.update({f"optim.{k}": v for k, v in optim.items() if isinstance(v, torch.Tensor)})
        return out, {k: v for k, v in optim.items() if not isinstance(v, torch.Tensor)}

    def save(self, st: TrainState) -> Path:
        tensors, groups = self.tensors()
        rngs = D.gather_objects(rng_state(), self.dist)  # every rank's, restored rank by rank
        state = {"train_state": asdict(st), "optimizer_groups": groups,
                 "scheduler": self.scheduler.state_dict(), "world": self.dist.world,
                 "rng": rngs, "stage": self.stage, "identity": resume_identity(self.cfg)}
        return checkpoint.save(self.cfg.log.output, st.step, tensors, state, to_dict(self.cfg),
                               keep=self.cfg.log.keep_last, d=self.dist)

    def check(self, path: Path, state: dict) -> None:
        """Refuse to continue another run: another stage, or a config that differs outside
        ``RESUME_FREE``."""
        if state.get("stage", self.stage) != self.stage:
            raise ValueError(f"checkpoint {path} is from stage '{state['stage']}', not '{self.stage}'")
        now = resume_identity(self.cfg)
        for k in sorted(set(now) | set(state["identity"])):
            if _same_path(now.get(k)) != _same_path(state["identity"].get(k)):
                raise ValueError(f"checkpoint {path} was made with {k}={state['identity'].get(k)!r}, "
                                 f"this run has {now.get(k)!r}; resume with the same config "
                                 f"(only {', '.join(RESUME_FREE)} may change)")

    def resume(self) -> TrainState:
        """The state to continue from, per ``resume`` (``latest`` or a checkpoint folder);
        a fresh ``TrainState`` for ``latest`` with nothing saved yet."""
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        main = self.dist.is_main()
        tensors, _ = self.tensors()
        if self.cfg.resume == "latest":
            found = checkpoint.load_latest(self.cfg.log.output, tensors, self.dist, self.check,
                                           warn=lambda m: print(m, file=sys.stderr) if main else None)
            if found is None:
                return TrainState()
            path, tensors, state = found
        else:  # an explicit path is verified, never skipped
            path = Path(self.cfg.resume)
            tensors, state = checkpoint.load(path, tensors, self.dist, self.check)
        weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        optim = {k[6:]: v for k, v in tensors.items() if k.startswith("optim.")}
        # not strict: the frozen weights are not in it. Every trainable one is: DCP refuses a
        # checkpoint that lacks a key of the template it fills
        set_model_state_dict(self.task, weights, options=self._options(strict=False))
        set_optimizer_state_dict(self.task, self.optimizer, {**optim, **state["optimizer_groups"]},
                                 options=self._options())
        self.scheduler.load_state_dict(state["scheduler"])
        # on another world size rank r takes rank (r mod saved world)'s: the data order and
        # SEA's draws are keyed by the data position, not by these
        set_rng_state(state["rng"][self.dist.rank % len(state["rng"])])
        st = TrainState(**state["train_state"])
        if main:
            also = f", saved by {state['world']} rank(s)" if state["world"] != self.dist.world else ""
            print(f"resumed from {path} (step {st.step}{also})", file=sys.stderr)
        return st


def load_weights(task: torch.nn.Module, path: Path) -> None:
    """A checkpoint's trainable weights into ``task`` (one process, e.g. ``eval-align``): the
    names must be exactly the task's trainable parameters, or it is refused naming them (a
    mismatch would evaluate an untrained adapter)."""
    tensors, _ = checkpoint.load(path)
    weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    trainable = {n for n, q in task.named_parameters() if q.requires_grad}
    missing, extra = sorted(trainable - set(weights)), sorted(set(weights) - trainable)
    if missing or extra:
        raise ValueError(f"checkpoint {path} does not fit this model: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}; evaluate it with the stage and config of the "
                         f"run that wrote it (its config.json)")
    task.load_state_dict(weights, strict=False)  # the frozen rest is the model's own
