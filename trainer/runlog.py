"""Where a run's metrics go: ``metrics.jsonl`` always (one JSON line per log: ``kind``,
``step``, a wall-clock ``time`` and the metrics), plus what ``log.report_to`` names:
``tensorboard`` (``<output>/tensorboard``) and ``wandb`` (optional extra; ``WANDB_MODE=offline``
writes the run under ``<output>/wandb`` to sync later).

On a resume from step S, the jsonl lines of steps after S (logged by the interrupted run after
its last checkpoint) are dropped first, so every step appears once; wandb continues the same
run (its id is derived from ``log.output``) and plots against our ``step``, so steps the
killed run had logged are simply logged again.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from seacore.config import to_dict
from seacore.files import write_text_atomic


def read_metrics(path: str | Path, warn=None) -> list[dict]:
    """The records of a ``metrics.jsonl``. A last line cut short (a full disk, a kill in the
    middle of a write) is dropped, with a warning naming the file and line; any other line
    that does not parse is an error naming both."""
    path = Path(path)
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError as e:
            if i == len(lines):
                if warn is not None:
                    warn(f"warning: {path} line {i} is cut short ({e}); dropped")
                continue
            raise ValueError(f"{path} line {i} is not JSON ({e}); repair or remove that line") from e
    return out


class Logger:
    def __init__(self, cfg, main: bool, from_step: int = 0):
        self.main = main
        self.out = Path(cfg.log.output)
        self.tb = None
        self.wandb = None
        if not main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        metrics = self.out / "metrics.jsonl"
        if metrics.is_file():
            keep = [r for r in read_metrics(metrics, lambda m: print(m, file=sys.stderr))
                    if r.get("step", 0) <= from_step]
            write_text_atomic(metrics, "".join(json.dumps(r) + "\n" for r in keep))
        name = cfg.log.run_name or self.out.resolve().name
        if "tensorboard" in cfg.log.report_to:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("note: log.report_to has tensorboard, which is not installed (pip install "
                      "'sea-align[tensorboard]'); metrics go to metrics.jsonl", file=sys.stderr)
            else:
                self.tb = SummaryWriter(str(self.out / "tensorboard"))
        if "wandb" in cfg.log.report_to:
            try:
                import wandb
            except ImportError as e:
                raise ValueError("log.report_to has wandb, which is not installed: pip install "
                                 "'sea-align[wandb]' (or drop wandb from log.report_to)") from e
            run_id = hashlib.sha256(str(self.out.resolve()).encode()).hexdigest()[:16]
            self.wandb = wandb.init(project=cfg.log.wandb_project, name=name, id=run_id,
                                    resume="allow", dir=str(self.out), config=to_dict(cfg))
            self.wandb.define_metric("step")
            self.wandb.define_metric("*", step_metric="step")

    def log(self, step: int, metrics: dict, kind: str = "train") -> None:
        if not self.main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"kind": kind, "step": step, "time": round(time.time(), 3),
                                **metrics}) + "\n")
        scalars = {k: v for k, v in metrics.items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{kind}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({"step": step, **{f"{kind}/{k}": v for k, v in scalars.items()}})

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
