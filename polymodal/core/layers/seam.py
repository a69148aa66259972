"""The block seam: every stack of repeated blocks runs through :func:`run_layers`.

Models never call ``torch.utils.checkpoint`` or collectives themselves. Training code
installs a *policy* here (activation checkpointing, per-block parameter gathering for
sharded training, counting, offload, ...) with :func:`use_policy`; every stack in every
model then runs its blocks through it.

A policy is ``policy(call, index, params, x, key, extra) -> (x, aux)`` and must call
``call(params, x, key, extra)`` (or something equivalent) exactly once per block.

>>> import torch
>>> calls = []
>>> def counting(call, i, p, x, key, extra):
...     calls.append(i)
...     return call(p, x, key, extra)
>>> blocks = [{"w": torch.tensor(2.0)}, {"w": torch.tensor(3.0)}]
>>> with use_policy(counting):
...     y, _ = run_layers(lambda i, p, x, k, e: (x * p["w"], None), blocks, torch.tensor(1.0))
>>> float(y), calls
(6.0, [0, 1])
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import random as pr
from ..pytree import Params

__all__ = ["run_layers", "use_policy", "current_policy", "default_policy", "checkpoint_policy", "compose"]

Policy = Callable[..., tuple[Any, Any]]


def default_policy(call: Callable, index: int, params: Params, x: Any, key: Tensor | None, extra: Any) -> tuple[Any, Any]:
    """Run the block as is."""
    return call(params, x, key, extra)


_STACK: list[Policy] = [default_policy]


def current_policy() -> Policy:
    return _STACK[-1]


@contextlib.contextmanager
def use_policy(policy: Policy) -> Iterator[Policy]:
    """Install ``policy`` at the seam for the duration of the ``with`` block (nests)."""
    _STACK.append(policy)
    try:
        yield policy
    finally:
        _STACK.pop()


def compose(outer: Policy, inner: Policy) -> Policy:
    """``outer`` wraps ``inner``: e.g. ``compose(checkpoint_policy(), gather_policy)`` recomputes the gather."""

    def policy(call, index, params, x, key, extra):
        return outer(lambda p, xx, k, e: inner(call, index, p, xx, k, e), index, params, x, key, extra)

    return policy


def checkpoint_policy(every: int = 1, offset: int = 0) -> Policy:
    """Non-reentrant activation checkpointing of every ``every``-th block (``every=0``: none)."""

    def policy(call, index, params, x, key, extra):
        if every > 0 and (index - offset) % every == 0:
            return torch.utils.checkpoint.checkpoint(call, params, x, key, extra, use_reentrant=False)
        return call(params, x, key, extra)

    return policy


def run_layers(
    fn: Callable[[int, Params, Any, Tensor | None, Any], tuple[Any, Any]],
    layer_params: Sequence[Params],
    x: Any,
    *,
    key: Tensor | None = None,
    extras: Sequence[Any] | None = None,
) -> tuple[Any, list[Any]]:
    """Run ``x`` through the blocks ``fn(i, layer_params[i], x, key_i, extras[i]) -> (x, aux_i)``.

    Args:
        fn: the block, given its index (for per-block static choices such as drop-path rate).
        layer_params: one param tree per block.
        x: the carried activations (a tensor or any pytree).
        key: split into one key per block (``None``: deterministic).
        extras: per-block inputs (e.g. each layer's KV cache), or ``None``.

    Returns:
        ``(x, [aux_0, ...])``.
    """
    n = len(layer_params)
    if extras is not None and len(extras) != n:
        raise ValueError(f"run_layers: expected {n} extras (one per block), got {len(extras)}")
    keys = pr.maybe_split(key, n) if n else []
    policy = current_policy()
    auxs = []
    for i, p in enumerate(layer_params):
        x, aux = policy(functools.partial(fn, i), i, p, x, keys[i], None if extras is None else extras[i])
        auxs.append(aux)
    return x, auxs
