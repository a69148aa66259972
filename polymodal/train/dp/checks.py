"""The DP-SGD flags checked before a run starts (``polymodal train ... --dp``), one error naming the flag.

>>> check_dp_flags(dp=True, noise_multiplier=0.0, target_epsilon=None, delta=1e-5, max_grad_norm=1.0)
Traceback (most recent call last):
ValueError: --noise-multiplier: expected a number > 0 under --dp, got 0.0 (no noise: epsilon is infinite, no privacy)
"""

from __future__ import annotations

import math

__all__ = ["check_dp_flags"]


def check_dp_flags(*, dp: bool, noise_multiplier: float | None, target_epsilon: float | None, delta: float,
                   max_grad_norm: float) -> None:
    """Raise ``ValueError`` naming the flag when the DP options cannot give a private run."""
    if dp and (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("--dp needs exactly one of --noise-multiplier S or --target-epsilon E")
    if not dp:
        if noise_multiplier is not None or target_epsilon is not None:
            raise ValueError("--noise-multiplier / --target-epsilon only apply with --dp")
        return
    if noise_multiplier is not None and not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"--noise-multiplier: expected a number > 0 under --dp, got {noise_multiplier} "
                         "(no noise: epsilon is infinite, no privacy)")
    if target_epsilon is not None and not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"--target-epsilon: expected a finite number > 0, got {target_epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"--delta: expected a probability in (0, 1), got {delta}")
    if not (math.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"--max-grad-norm: expected a number > 0, got {max_grad_norm}")
