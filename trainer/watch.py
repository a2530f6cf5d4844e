"""Watching L_a for the failure the evidence found: a loss that stays at chance.

With the temperature starting at 1 (the paper's "tau = 0" read as log tau = 0) the logits are
cosines in [-1, 1], InfoNCE over a few hundred pairs is nearly flat, and L_a sat at ln(pairs)
through stage 1 in every lambda = 1 arm of the ground-truth world while nothing told the user.
"""

from __future__ import annotations

import math
from collections import deque

TOLERANCE = 0.01  # "at chance": within 1 % of ln(pairs)
SETTLE = 0.10  # the first 10 % of the stage is never judged (warm-up, the first moves)


class ChanceWatch:
    """Says once, in one line, when L_a has stayed within 1 % of its chance level ln(pairs)
    for ``window`` consecutive steps after the first 10 % of the stage.

    ``update`` takes a step's ``align_loss`` and ``align_chance`` (the mean over its
    micro-batches of ln(pairs), the loss of tokens that match no label better than another)
    and returns the line the first time the condition holds, else None; ``fired`` stays set."""

    def __init__(self, total_steps: int, log_tau_init: float, window: int | None = None):
        self.start = math.ceil(SETTLE * total_steps)
        self.window = window or max(5, math.ceil(0.05 * total_steps))
        self.log_tau_init = log_tau_init
        self.recent: deque[bool] = deque(maxlen=self.window)
        self.fired_at: int | None = None

    @property
    def fired(self) -> bool:
        return self.fired_at is not None

    def update(self, step: int, align_loss: float, align_chance: float, tau: float | None) -> str | None:
        if self.fired or step <= self.start:
            return None
        self.recent.append(align_chance > 0 and abs(align_loss / align_chance - 1) <= TOLERANCE)
        if len(self.recent) < self.window or not all(self.recent):
            return None
        self.fired_at = step
        now = f" (now {tau:.3f})" if tau is not None else ""
        return (f"L_a has stayed within 1 % of its chance level ln(pairs) = {align_chance:.3f} for "
                f"{self.window} steps (step {step}): the visual tokens are not aligning with their "
                f"labels. The temperature started at tau = {math.exp(self.log_tau_init):.3g} "
                f"(sea.log_tau_init={self.log_tau_init:g}){now}; in the ground-truth world "
                f"sea.log_tau_init=-2.66 (tau 0.07, CLIP's start) made L_a fall (docs/evidence-notes.md).")


class DropWatch:
    """Counts the samples dropped for unreadable images as the run goes, and says when they
    pass ``data.max_error_rate``. During the run the rate is judged by the lower end of its 95 %
    Wilson interval, over every rank's samples so far, so a run stops as soon as the rate is
    surely too high (four unreadable images of four: before step 1) and not because the first
    batch held one unlucky file; at the end, by the rate itself, as extraction does."""

    def __init__(self, max_rate: float):
        self.max_rate = max_rate
        self.seen = self.bad = self.truncated = 0
        self.first: list[str] = []
        self.reasons: dict[str, int] = {}

    def add(self, micro_batches: list[dict]) -> None:
        for b in micro_batches:
            bad = b.get("unreadable", [])
            self.seen += len(b["input_ids"]) + len(bad)
            self.bad += len(bad)
            for why in bad:
                reason = why.split(": ", 2)[1] if ": " in why else why
                self.reasons[reason] = self.reasons.get(reason, 0) + 1
            self.first.extend(bad[: max(0, 5 - len(self.first))])

    def problem(self, seen: int, bad: int, step: int, json_path: str, final: bool = False) -> str | None:
        """``seen`` / ``bad``: the counts over all ranks (``self``'s on one process)."""
        if not bad:
            return None
        rate = bad / seen
        if (rate if final else wilson_low(bad, seen)) <= self.max_rate:
            return None
        first = "; ".join(self.first) or "on other ranks"
        when = "at the end of the run" if final else f"stopping before step {step + 1}"
        return (f"{bad} of {seen} samples read have unreadable images ({rate:.1%} > "
                f"data.max_error_rate={self.max_rate:g}), {when}; first: {first}. Fix or "
                f"remove them in {json_path} (or its image root), or raise data.max_error_rate "
                f"to train without them")

    def summary(self, samples: int) -> str:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items())) or "none"
        return (f"data: trained on {samples} samples; dropped {self.bad} with unreadable images "
                f"({why}) and {self.truncated} whose image tokens did not fit data.max_length")


def wilson_low(k: int, n: int, z: float = 1.96) -> float:
    """Lower end of the Wilson score interval of a rate k / n."""
    p, z2 = k / n, z * z
    return (p + z2 / (2 * n) - z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))) / (1 + z2 / n)
