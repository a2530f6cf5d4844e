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
                f"sea.log_tau_init=-2.66 (tau 0.07, CLIP's start) made L_a fall (README, Evidence).")
