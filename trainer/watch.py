"""Watching L_a for the failure the evidence found: a loss that stays at chance.

With the temperature at 1 (the paper's "tau = 0" read as log tau = 0) the logits are cosines in
[-1, 1], InfoNCE over a few hundred pairs can fall only about one nat below ln(pairs), and in
protocol v2 of the ground-truth world L_a sat at ln(pairs) through stage 1 in every lambda = 1
arm while nothing told the user. A fixed "within 1 % of ln(pairs)" test cannot tell that from
a run that aligns at tau = 1 (its best is ~18 % below ln(pairs)): so the watcher measures L_a's
progress over the range it can reach at the current temperature (``reachable_floor``).
"""

from __future__ import annotations

import math
from collections import deque

PROGRESS = 0.05  # "at chance": less than 5 % of the way from ln(pairs) to the reachable floor
SETTLE = 0.10  # the first 10 % of the stage is never judged (warm-up, the first moves)


def reachable_floor(pairs: float, tau: float) -> float:
    """The lowest symmetric InfoNCE over ``pairs`` matched pairs with cosine logits / tau: each
    token at cosine 1 with its word and the words spread as a regular simplex (cosine
    -1/(N-1) to the others), so L = log(1 + (N-1) exp(-N / ((N-1) tau))). At tau = 1 and
    N = 280 that is 4.64 against ln(280) = 5.63; at tau = 0.07 it is ~0."""
    n = float(pairs)
    if n <= 1:
        return 0.0
    return math.log1p((n - 1) * math.exp(-n / ((n - 1) * tau)))


def progress(align_loss: float, align_chance: float, tau: float) -> float:
    """How far L_a has come from chance, ln(pairs), toward the floor reachable at ``tau``:
    0 at chance, 1 at the floor (``align_chance`` is ln(pairs), so pairs = exp of it)."""
    floor = reachable_floor(math.exp(align_chance), tau)
    span = align_chance - floor
    return (align_chance - align_loss) / span if span > 0 else 1.0


def _slope(y: list[float]) -> float:
    """Least-squares slope of ``y`` against its index."""
    n = len(y)
    xm, ym = (n - 1) / 2, sum(y) / n
    return sum((i - xm) * (v - ym) for i, v in enumerate(y)) / sum((i - xm) ** 2 for i in range(n))


class ChanceWatch:
    """Says once, in one line, when L_a has stayed less than 5 % of the way from its chance
    level ln(pairs) to the floor reachable at the current temperature for ``window``
    consecutive steps after the first 10 % of the stage, without falling over that window (a
    run that starts above chance, as at tau = 0.07, and falls through it is aligning).

    ``update`` takes a step's ``align_loss``, ``align_chance`` (the mean over its micro-batches
    of ln(pairs), the loss of tokens that match no label better than another) and the
    temperature, and returns the line the first time the condition holds, else None;
    ``fired`` stays set."""

    def __init__(self, total_steps: int, log_tau_init: float, window: int | None = None):
        self.start = math.ceil(SETTLE * total_steps)
        # "not falling": at the window's slope L_a would not cross the 5 % band in a whole stage
        self.min_slope = PROGRESS / max(1, total_steps)
        self.window = window or max(5, math.ceil(0.05 * total_steps))
        self.log_tau_init = log_tau_init
        self.recent: deque[float] = deque(maxlen=self.window)
        self.fired_at: int | None = None

    @property
    def fired(self) -> bool:
        return self.fired_at is not None

    def update(self, step: int, align_loss: float, align_chance: float, tau: float | None) -> str | None:
        if self.fired or step <= self.start:
            return None
        t = tau if tau is not None else math.exp(self.log_tau_init)
        self.recent.append(progress(align_loss, align_chance, t) if align_chance > 0 else math.inf)
        if len(self.recent) < self.window or max(self.recent) >= PROGRESS:
            return None
        if _slope(list(self.recent)) > self.min_slope:
            return None  # near chance but falling
        self.fired_at = step
        floor = reachable_floor(math.exp(align_chance), t)
        return (f"L_a = {align_loss:.3f} has stayed within {PROGRESS:.0%} of the way from its "
                f"chance level ln(pairs) = {align_chance:.3f} to {floor:.3f}, the lowest it can "
                f"reach at tau = {t:.3g}, for {self.window} steps (step {step}): the visual tokens "
                f"are not aligning with their labels. Try a lower start temperature "
                f"(sea.log_tau_init, now {self.log_tau_init:g}; CLIP starts at -2.66, tau 0.07) "
                f"or a faster one (sea.tau_lr_scale), and check the labels' precision "
                f"(python -m pipeline stats).")


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
                f"remove them in {json_path}, or raise data.max_error_rate "
                f"to train without them")

    def summary(self, samples: int) -> str:
        why = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items())) or "none"
        return (f"data: trained on {samples} samples; dropped {self.bad} with unreadable images "
                f"({why}) and {self.truncated} whose image tokens did not fit data.max_length")


def wilson_low(k: int, n: int, z: float = 1.96) -> float:
    """Lower end of the Wilson score interval of a rate k / n."""
    p, z2 = k / n, z * z
    return (p + z2 / (2 * n) - z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))) / (1 + z2 / n)
