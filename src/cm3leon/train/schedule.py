"""Learning-rate schedule: linear warmup, then linear or cosine decay to a floor.

A pure function of the step, so the "scheduler state" in a checkpoint is just the step."""

from __future__ import annotations

import math

from cm3leon.errors import CM3LeonError


def lr_at(step: int, peak_lr: float, warmup_steps: int, total_steps: int, decay: str = "linear",
          min_lr_ratio: float = 0.1) -> float:
    """LR used for optimizer step `step` (0-based).

    Warmup: peak * (step + 1) / warmup_steps, so the first step is not wasted at LR 0.
    Decay: from the peak at `warmup_steps` to `min_lr_ratio * peak` at `total_steps`,
    linearly (OPT) or along a half cosine; the floor holds after `total_steps`."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    floor = peak_lr * min_lr_ratio
    span = total_steps - warmup_steps
    frac = 1.0 if span <= 0 else min(1.0, (step - warmup_steps) / span)
    if decay == "linear":
        return peak_lr - (peak_lr - floor) * frac
    if decay == "cosine":
        return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise CM3LeonError(f"unknown LR decay {decay!r}; expected 'linear' or 'cosine'")
