"""Schedules as pure functions of the global step, so a resumed run continues them exactly.

All horizons follow the reference: warm-up over ``warmup_epochs`` and cosines / linear ramps
on ``ipe_scale * total_steps`` (1.25 by default), so training stops at 80% of the cosine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedules:
    steps_per_epoch: int
    epochs: int
    warmup_epochs: float = 15.0
    start_lr: float = 2e-4
    ref_lr: float = 1e-3
    final_lr: float = 1e-6
    start_wd: float = 0.04
    final_wd: float = 0.4
    start_momentum: float = 0.996
    final_momentum: float = 1.0
    start_sharpen: float = 0.25
    final_sharpen: float = 0.25
    ipe_scale: float = 1.25

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def horizon(self) -> int:
        return int(self.ipe_scale * self.total_steps)

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup_epochs * self.steps_per_epoch)

    # The reference's lr and wd schedulers advance *before* the optimiser step, so step s
    # (0-based) uses their value at s + 1; momentum and sharpening are drawn at s.
    def lr(self, step: int) -> float:
        return warmup_cosine(step + 1, self.warmup_steps, self.horizon, self.start_lr,
                             self.ref_lr, self.final_lr)

    def wd(self, step: int) -> float:
        return cosine(step + 1, self.horizon, self.start_wd, self.final_wd)

    def momentum(self, step: int) -> float:
        return linear(step, self.horizon, self.start_momentum, self.final_momentum)

    def sharpen(self, step: int) -> float:
        return linear(step, self.horizon, self.start_sharpen, self.final_sharpen)

    def at(self, step: int) -> dict[str, float]:
        return {"lr": self.lr(step), "wd": self.wd(step), "momentum": self.momentum(step),
                "T": self.sharpen(step)}


def warmup_cosine(step: int, warmup_steps: int, horizon: int, start: float, ref: float,
                  final: float) -> float:
    """Linear from ``start`` to ``ref`` over ``warmup_steps``, then cosine from ``ref`` to
    ``final`` over the rest of ``horizon``; ``final`` beyond it. (The reference's
    ``WarmupCosineSchedule``, indexed by the step it is about to take.)"""
    if step < warmup_steps:
        return start + (ref - start) * step / warmup_steps
    span = max(1, horizon - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return max(final, final + (ref - final) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def cosine(step: int, horizon: int, start: float, final: float) -> float:
    """Cosine from ``start`` to ``final`` over ``horizon`` (either direction)."""
    progress = min(1.0, step / max(1, horizon))
    return final + (start - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear(step: int, horizon: int, start: float, final: float) -> float:
    progress = min(1.0, step / max(1, horizon))
    return start + (final - start) * progress
