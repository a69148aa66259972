"""Explicit, counter-based random keys (JAX style), in plain integer tensor ops.

A key is an ``int64`` tensor of shape ``(2,)`` holding two 32-bit words. Every
random function is a pure function of its key: same key, same numbers, on any
device, and torch's global RNG is never touched. Because the generator is made
of ordinary tensor ops (xor, shift, multiply, mask), ``torch.func.vmap`` over a
batch of keys gives each key its own draw, and ``torch.compile`` fuses it.

The bit generator hashes ``(key, counter)`` with three rounds of a 32-bit
xor-shift-multiply mixer (multipliers below 2**31, so no int64 product ever
overflows and CPU, CUDA and compiled code agree bit for bit).

>>> k = key(0)
>>> a, b = split(k)
>>> normal(a, (3,)).shape
torch.Size([3])
>>> bool((uniform(a, (4,)) == uniform(a, (4,))).all())
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "key",
    "split",
    "fold_in",
    "bits",
    "uniform",
    "normal",
    "truncated_normal",
    "bernoulli",
    "randint",
    "permutation",
    "maybe_split",
]

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mix(x: Tensor) -> Tensor:
    # hash-prospector's low-bias 32-bit mixer; both multipliers < 2**31.
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def _check_key(k: Tensor) -> None:
    if not isinstance(k, Tensor) or k.dtype != torch.int64 or k.shape[-1:] != (2,):
        got = f"tensor of dtype {k.dtype} and shape {tuple(k.shape)}" if isinstance(k, Tensor) else type(k).__name__
        raise TypeError(f"expected a random key (int64 tensor of shape (2,), from polymodal.core.random.key), got {got}")


def _hash(k: Tensor, counter: Tensor) -> Tensor:
    """32-bit words for ``counter`` (int64, any shape) under key ``k`` (..., 2)."""
    k0, k1 = k[..., 0], k[..., 1]
    if k.dim() > 1:  # broadcast a stack of keys against the counters
        k0 = k0.reshape(k0.shape + (1,) * counter.dim())
        k1 = k1.reshape(k1.shape + (1,) * counter.dim())
    lo = counter & _M32
    hi = counter >> 32
    x = _mix(lo ^ k0)
    x = _mix(x ^ k1 ^ ((hi * _GOLDEN) & _M32))
    return _mix((x + k0) & _M32)


def key(seed: int, device: torch.device | str | None = None) -> Tensor:
    """A key from an integer seed (any Python int; 64 bits are used)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    seed &= (1 << 64) - 1
    words = torch.tensor([seed & _M32, seed >> 32], dtype=torch.int64, device=device)
    return _hash(torch.tensor([0x5EED, _GOLDEN], dtype=torch.int64, device=device), words)


def split(k: Tensor, num: int = 2) -> Tensor:
    """``num`` independent keys derived from ``k``: shape ``(num, 2)``; unpack or index them."""
    _check_key(k)
    counter = torch.arange(2 * num, dtype=torch.int64, device=k.device) | (1 << 40)
    return _hash(k, counter).reshape(k.shape[:-1] + (num, 2))


def fold_in(k: Tensor, data: int | Tensor) -> Tensor:
    """A new key from ``k`` and an integer (e.g. the step number or a rank)."""
    _check_key(k)
    if isinstance(data, Tensor):
        d = data.to(torch.int64) & ((1 << 40) - 1)
    else:
        d = torch.tensor(int(data) & ((1 << 40) - 1), dtype=torch.int64, device=k.device)
    return _hash(k, torch.stack([d * 2, d * 2 + 1]) | (1 << 41))


def maybe_split(k: Tensor | None, num: int) -> list[Tensor | None]:
    """``split(k, num)`` as a list, or ``[None] * num`` when ``k`` is None (deterministic mode)."""
    if k is None:
        return [None] * num
    return list(split(k, num).unbind(-2))


def _shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    return (shape,) if isinstance(shape, int) else tuple(int(s) for s in shape)


def bits(k: Tensor, shape: int | Sequence[int]) -> Tensor:
    """Uniform 32-bit words as ``int64`` in ``[0, 2**32)``."""
    _check_key(k)
    shape = _shape(shape)
    counter = torch.arange(math.prod(shape), dtype=torch.int64, device=k.device)
    return _hash(k, counter).reshape(k.shape[:-1] + shape)


def uniform(
    k: Tensor,
    shape: int | Sequence[int],
    dtype: torch.dtype = torch.float32,
    low: float | Tensor = 0.0,
    high: float | Tensor = 1.0,
) -> Tensor:
    """Uniform on ``[low, high)`` (24 random bits of mantissa)."""
    u = (bits(k, shape) >> 8).to(torch.float32) * (2.0**-24)
    return (low + (high - low) * u).to(dtype)


def _signed_unit(k: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Uniform on the open interval (-1, 1), float32, exact: odd multiples of 2**-24, so the
    extremes are +-(1 - 2**-24) and ``erfinv`` of them is finite (|z| < 5.4)."""
    m = bits(k, shape) >> 8
    return (2 * m + 1 - (1 << 24)).to(torch.float32) * (2.0**-24)


def normal(k: Tensor, shape: int | Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard normal draws (inverse-CDF of an open uniform)."""
    return (math.sqrt(2.0) * torch.erfinv(_signed_unit(k, _shape(shape)))).to(dtype)


def truncated_normal(
    k: Tensor,
    shape: int | Sequence[int],
    lower: float = -2.0,
    upper: float = 2.0,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard normal truncated to ``[lower, upper]`` (inverse-CDF sampling, as in JAX)."""
    if not lower < upper:
        raise ValueError(f"expected lower < upper, got lower={lower}, upper={upper}")
    cdf_lo = 0.5 * (1 + math.erf(lower / math.sqrt(2)))
    cdf_hi = 0.5 * (1 + math.erf(upper / math.sqrt(2)))
    u = cdf_lo + (cdf_hi - cdf_lo) * (0.5 + 0.5 * _signed_unit(k, _shape(shape)).to(torch.float64))
    x = math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)
    return x.clamp(lower, upper).to(dtype)


def bernoulli(k: Tensor, p: float | Tensor, shape: int | Sequence[int]) -> Tensor:
    """Boolean draws that are ``True`` with probability ``p`` (broadcast against ``shape``)."""
    return uniform(k, shape) < p


def randint(k: Tensor, shape: int | Sequence[int], low: int, high: int) -> Tensor:
    """Integers uniform on ``[low, high)`` (multiply-shift, bias below 2**-32 * span)."""
    span = high - low
    if not 0 < span < 2**31:
        raise ValueError(f"expected 0 < high - low < 2**31, got low={low}, high={high}")
    return ((bits(k, shape) * span) >> 32) + low


def permutation(k: Tensor, n: int) -> Tensor:
    """A uniformly random permutation of ``range(n)`` (argsort of random words)."""
    return torch.argsort(bits(k, (n,)), dim=-1)
