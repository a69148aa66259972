"""Dropout and DropPath (stochastic depth), driven by explicit keys.

``key=None`` (or rate 0) means inference: the input comes back unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .. import random as pr
from ..pytree import Params
from ..spec import Spec

__all__ = ["dropout", "drop_path", "Dropout", "DropPath"]


def check_rate(rate: float, what: str) -> None:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{what}: expected a rate in [0, 1), got {rate}")


def dropout(x: Tensor, rate: float, *, key: Tensor | None) -> Tensor:
    """Zero each element with probability ``rate`` and scale the rest by ``1 / (1 - rate)``."""
    check_rate(rate, "dropout")
    if key is None or rate == 0.0:
        return x
    keep = pr.bernoulli(key, 1.0 - rate, x.shape)
    return x * keep.to(x.dtype) / (1.0 - rate)


def drop_path(x: Tensor, rate: float, *, key: Tensor | None, batch_dims: int = 1) -> Tensor:
    """Stochastic depth: drop the whole residual branch per example (first ``batch_dims`` axes).

    Equals torchvision's ``stochastic_depth(x, rate, mode="row")``: survivors are scaled by
    ``1 / (1 - rate)``. Under vmap over examples, use ``batch_dims=0``.
    """
    check_rate(rate, "drop_path")
    if key is None or rate == 0.0:
        return x
    shape = tuple(x.shape[:batch_dims]) + (1,) * (x.dim() - batch_dims)
    keep = pr.bernoulli(key, 1.0 - rate, shape)
    return x * keep.to(x.dtype) / (1.0 - rate)


@dataclass(frozen=True)
class Dropout(Spec):
    """Element-wise dropout; no parameters."""

    rate: float = 0.5  # probability of zeroing an element

    def __post_init__(self) -> None:
        check_rate(self.rate, "Dropout")

    def init(self, *, key: Tensor) -> Params:
        return {}

    def __call__(self, params: Params, x: Tensor, *, key: Tensor | None = None) -> Tensor:
        return dropout(x, self.rate, key=key)


@dataclass(frozen=True)
class DropPath(Spec):
    """Per-example residual-branch dropout (stochastic depth); no parameters."""

    rate: float = 0.0  # probability of dropping an example's branch
    batch_dims: int = 1  # leading axes that index examples (0 under vmap)

    def __post_init__(self) -> None:
        check_rate(self.rate, "DropPath")

    def init(self, *, key: Tensor) -> Params:
        return {}

    def __call__(self, params: Params, x: Tensor, *, key: Tensor | None = None) -> Tensor:
        return drop_path(x, self.rate, key=key, batch_dims=self.batch_dims)
