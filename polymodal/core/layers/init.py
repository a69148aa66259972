"""Parameter initialisers: pure functions of a key, a shape and a scale.

``INITS[name](key, shape, fan_in=..., fan_out=..., std=...)`` lets specs take an
``init`` field naming their scheme (torch's default, or the paper's).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .. import random as pr

__all__ = ["uniform_fan_in", "normal", "trunc_normal", "xavier_uniform", "zeros", "ones", "INITS", "initializer"]


def uniform_fan_in(key: Tensor, shape: Sequence[int], *, fan_in: int, **_: object) -> Tensor:
    """torch.nn's default for Linear/Conv weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return pr.uniform(key, shape, low=-bound, high=bound)


def normal(key: Tensor, shape: Sequence[int], *, std: float = 1.0, **_: object) -> Tensor:
    return pr.normal(key, shape) * std


def trunc_normal(key: Tensor, shape: Sequence[int], *, std: float = 0.02, **_: object) -> Tensor:
    """Normal truncated at two standard deviations (ViT / BERT-style init)."""
    return pr.truncated_normal(key, shape, -2.0, 2.0) * std


def xavier_uniform(key: Tensor, shape: Sequence[int], *, fan_in: int, fan_out: int, **_: object) -> Tensor:
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return pr.uniform(key, shape, low=-bound, high=bound)


def zeros(key: Tensor | None, shape: Sequence[int], **_: object) -> Tensor:
    return torch.zeros(tuple(shape))


def ones(key: Tensor | None, shape: Sequence[int], **_: object) -> Tensor:
    return torch.ones(tuple(shape))


INITS: dict[str, Callable[..., Tensor]] = {
    "torch": uniform_fan_in,
    "uniform_fan_in": uniform_fan_in,
    "normal": normal,
    "trunc_normal": trunc_normal,
    "xavier_uniform": xavier_uniform,
    "zeros": zeros,
}


def initializer(name: str) -> Callable[..., Tensor]:
    """Look up an initialiser by name, with an error listing the known ones."""
    try:
        return INITS[name]
    except KeyError:
        raise ValueError(f"unknown init {name!r}; expected one of {sorted(INITS)}") from None
