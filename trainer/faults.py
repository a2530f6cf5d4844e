"""What a cluster does to a training job, handled in one place: a scheduler's stop signal
(SIGTERM, or SIGUSR1 ahead of a preemption) and the counts every rank must agree on. ``p`` is
``trainer.train.Parts`` (its ``dist`` and ``device``)."""

from __future__ import annotations

import torch


class Preempted(RuntimeError):
    """SIGTERM / SIGUSR1 arrived: the step finished, a complete checkpoint was saved."""

    def __init__(self, signum: int, step: int, path):
        import signal

        self.signum, self.step, self.path = signum, step, path
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}: saved "
                         f"{path}; continue with resume=latest")


class Signals:
    """SIGTERM (a scheduler's preemption, torchrun's stop) and SIGUSR1 (what Slurm sends ahead
    of a preemption with ``--signal``) set a flag; the loop ends the step, saves and stops.
    Installed only in the main thread (Python's rule), restored on exit."""

    def __init__(self):
        import signal
        import threading

        self.got: int | None = None
        self.old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                self.old[sig] = signal.signal(sig, self._set)

    def _set(self, signum, _frame):
        self.got = signum

    def restore(self) -> None:
        import signal

        for sig, old in self.old.items():
            signal.signal(sig, old)


def all_counts(p, *counts: int) -> list[int]:
    """Counts summed over the ranks (one tiny all-reduce; the counts themselves on one)."""
    if not p.dist.enabled:
        return list(counts)
    t = torch.tensor(counts, dtype=torch.long, device=p.device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def stop_requested(flag: int | None, p) -> int | None:
    """The signal any rank got, agreed by all ranks (one tiny all-reduce per step), so every
    rank saves at the same step."""
    if not p.dist.enabled:
        return flag
    t = torch.tensor([flag or 0], device=p.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t) or None
