"""Activations: GELU, QuickGELU, SiLU, GEGLU, and lookup by name."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gelu", "gelu_tanh", "quick_gelu", "silu", "relu", "tanh", "geglu", "activation", "ACTIVATIONS"]


def gelu(x: Tensor) -> Tensor:
    return F.gelu(x)


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


QUICK_GELU_SCALE = 1.702


def quick_gelu(x: Tensor) -> Tensor:
    """CLIP's ``x * sigmoid(1.702 x)`` (TorchMultimodal calls it ``SiLU``)."""
    return x * torch.sigmoid(QUICK_GELU_SCALE * x)


def silu(x: Tensor) -> Tensor:
    return F.silu(x)


def relu(x: Tensor) -> Tensor:
    return F.relu(x)


def tanh(x: Tensor) -> Tensor:
    return torch.tanh(x)


def geglu(x: Tensor) -> Tensor:
    """Gated GELU: split the last axis in halves ``(a, g)`` and return ``a * gelu(g)``."""
    if x.shape[-1] % 2:
        raise ValueError(f"geglu: expected an even last axis, got shape {tuple(x.shape)}")
    a, g = x.chunk(2, dim=-1)
    return a * F.gelu(g)


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": gelu,
    "gelu_tanh": gelu_tanh,
    "quick_gelu": quick_gelu,
    "silu": silu,
    "relu": relu,
    "tanh": tanh,
    "geglu": geglu,
    "identity": lambda x: x,
}


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """Activation by name; specs store the name (hashable) rather than the function."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None
