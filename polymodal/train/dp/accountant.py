"""The accountant base: a history of (noise multiplier, sample rate, steps) and its checks.

Every accountant here tracks the same thing, the Poisson-subsampled Gaussian
mechanism of DP-SGD run for some steps, and differs only in how the history
is turned into an ``(epsilon, delta)`` guarantee. The history is run-length
encoded: consecutive steps with the same noise multiplier and sample rate
share one ``(noise_multiplier, sample_rate, num_steps)`` entry, exactly the
layout Opacus keeps (so its ``state_dict()`` loads here and ours loads there).

>>> from polymodal.train.dp import RDPAccountant
>>> acc = RDPAccountant()
>>> acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=10)
>>> acc.step(noise_multiplier=1.0, sample_rate=0.01)
>>> acc.step(noise_multiplier=2.0, sample_rate=0.02)
>>> acc.history
[(1.0, 0.01, 11), (2.0, 0.02, 1)]
>>> acc.num_steps
12
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["Accountant", "check_noise_multiplier", "check_sample_rate", "check_steps", "check_delta"]


def _number(value: object, name: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"{where}: {name} must be a real number, got {type(value).__name__} {value!r}")
    x = float(value)
    if math.isnan(x):
        raise ValueError(f"{where}: {name} must be a number, got {value!r}")
    return x


def check_noise_multiplier(value: object, where: str = "accountant") -> float:
    """A finite noise multiplier ``>= 0`` as a float (``0`` means no noise: epsilon is infinite)."""
    x = _number(value, "noise_multiplier", where)
    if not 0.0 <= x < math.inf:
        raise ValueError(f"{where}: noise_multiplier must be finite and >= 0, got {value!r}")
    return x


def check_sample_rate(value: object, where: str = "accountant") -> float:
    """A Poisson sample rate in ``(0, 1]`` as a float."""
    x = _number(value, "sample_rate", where)
    if not 0.0 < x <= 1.0:
        raise ValueError(f"{where}: sample_rate must be in (0, 1], got {value!r}")
    return x


def check_steps(value: object, where: str = "accountant", name: str = "num_steps") -> int:
    """A step count: an ``int >= 0`` (bools and floats are refused)."""
    if isinstance(value, bool) or not isinstance(value, int) and not hasattr(value, "__index__"):
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__} {value!r}")
    n = int(value)
    if n < 0:
        raise ValueError(f"{where}: {name} must be >= 0, got {value!r}")
    return n


def check_delta(value: object, where: str = "accountant") -> float:
    """A target delta in ``(0, 1)`` as a float."""
    x = _number(value, "delta", where)
    if not 0.0 < x < 1.0:
        raise ValueError(f"{where}: delta must be in (0, 1), got {value!r}")
    return x


class Accountant:
    """Base class: records steps and saves/restores them; subclasses give ``get_epsilon``.

    Attributes:
        history: list of ``(noise_multiplier, sample_rate, num_steps)`` tuples, oldest first;
            neighbouring entries always differ in noise multiplier or sample rate.
    """

    mechanism: str = ""  # name used by ``state_dict`` and ``make_accountant`` ("rdp", "prv")

    def __init__(self) -> None:
        self.history: list[tuple[float, float, int]] = []

    def step(self, *, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Record ``num_steps`` steps of the subsampled Gaussian mechanism.

        Args:
            noise_multiplier: noise std divided by the clipping norm (the L2 sensitivity), ``>= 0``.
            sample_rate: probability that an example is in a batch (Poisson sampling), in ``(0, 1]``.
            num_steps: how many such steps were taken (``>= 0``; 0 records nothing).
        """
        where = f"{type(self).__name__}.step"
        sigma = check_noise_multiplier(noise_multiplier, where)
        q = check_sample_rate(sample_rate, where)
        n = check_steps(num_steps, where)
        if n == 0:
            return
        if self.history and self.history[-1][:2] == (sigma, q):
            self.history[-1] = (sigma, q, self.history[-1][2] + n)
        else:
            self.history.append((sigma, q, n))

    @property
    def num_steps(self) -> int:
        """Total number of steps recorded."""
        return sum(n for _, _, n in self.history)

    def get_epsilon(self, delta: float) -> float:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.get_epsilon")

    def state_dict(self) -> dict[str, Any]:
        """``{"mechanism": ..., "history": [...]}``: plain Python, safe for ``torch.save`` and JSON."""
        return {"mechanism": self.mechanism, "history": [tuple(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the history saved by ``state_dict()`` (ours or Opacus's), validating every entry."""
        where = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, dict):
            raise TypeError(f"{where}: expected a dict, got {type(state_dict).__name__}")
        missing = sorted({"mechanism", "history"} - set(state_dict))
        if missing:
            raise ValueError(f"{where}: missing keys {missing}, got keys {sorted(state_dict)}")
        if state_dict["mechanism"] != self.mechanism:
            raise ValueError(
                f"{where}: expected mechanism {self.mechanism!r}, got {state_dict['mechanism']!r} "
                f"(load it into the matching accountant)"
            )
        history: list[tuple[float, float, int]] = []
        for i, entry in enumerate(state_dict["history"]):
            if not isinstance(entry, (tuple, list)) or len(entry) != 3:
                raise ValueError(
                    f"{where}: history[{i}] must be (noise_multiplier, sample_rate, num_steps), got {entry!r}"
                )
            w = f"{where}: history[{i}]"
            sigma, q, n = check_noise_multiplier(entry[0], w), check_sample_rate(entry[1], w), check_steps(entry[2], w)
            history.append((sigma, q, n))
        self.history = history

    def __repr__(self) -> str:
        return f"{type(self).__name__}(history={self.history})"
