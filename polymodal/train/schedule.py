"""Learning-rate schedules as pure functions of the step (warmup + cosine, as CLIP/open_clip train)."""

from __future__ import annotations

import math

__all__ = ["warmup_cosine"]


def warmup_cosine(step: int, *, base_lr: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """Linear warmup from ``base_lr / warmup`` to ``base_lr`` over ``warmup`` steps, then cosine decay
    to ``min_lr`` at ``total``.

    >>> [round(warmup_cosine(s, base_lr=1.0, warmup=2, total=6), 3) for s in range(7)]
    [0.5, 1.0, 1.0, 0.854, 0.5, 0.146, 0.0]
    """
    if total <= 0:
        raise ValueError(f"total steps must be positive, got {total}")
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
