"""Learning-rate schedule: linear warmup, then cosine decay (Goyal et al. 2017; Loshchilov &
Hutter 2017). A pure function of the step, so a resumed run continues it without saved state."""

from __future__ import annotations

import math

from dalle2.train.config import OptimConfig


def learning_rate(step: int, optim: OptimConfig, total_steps: int) -> float:
    """LR of optimizer step ``step`` (0-based) of a ``total_steps`` run.

    Steps 0..warmup-1 rise linearly to ``optim.lr`` (step 0 is lr / warmup, never 0); then the
    LR follows half a cosine from ``optim.lr`` down to ``optim.lr * min_lr_ratio`` at
    ``total_steps``, and stays there if training goes on.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    peak, floor = optim.lr, optim.lr * optim.min_lr_ratio
    if step < optim.warmup_steps:
        return peak * (step + 1) / optim.warmup_steps
    decay_steps = max(1, total_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
