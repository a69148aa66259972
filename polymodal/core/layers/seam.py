"""The block seam: every stack of repeated blocks runs through :func:`run_layers`.

Models never call ``torch.utils.checkpoint`` or collectives themselves. Training code
installs a *policy* here (activation checkpointing, per-block parameter gathering for
sharded training, counting, offload, ...) with :func:`use_policy`; every stack in every
model then runs its blocks through it.

A policy is ``policy(call, index, params, x, key, extra) -> (x, aux)`` and must call
``call(params, x, key, extra)`` (or something equivalent) exactly once per block.

The installed policies live in a :class:`contextvars.ContextVar`, so each thread (and each
asyncio task) has its own stack: a policy installed in one thread never reaches another.
Under ``torch.compile`` the policy is read while tracing and baked into the graph; dynamo
(torch 2.14) guards on the value a ``ContextVar.get()`` returned, so calling a compiled
function under another policy recompiles it and the new policy is honoured
(``tests/core/test_seam.py`` pins this).

:func:`record_stacks` asks the seam which parameter lists a call actually ran as block
stacks (the check behind specs' declared ``block_stacks()``).

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
import contextvars
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import random as pr
from ..pytree import Params, flatten

__all__ = ["run_layers", "use_policy", "current_policy", "default_policy", "checkpoint_policy", "compose",
           "record_stacks"]

Policy = Callable[..., tuple[Any, Any]]


def default_policy(call: Callable, index: int, params: Params, x: Any, key: Tensor | None, extra: Any) -> tuple[Any, Any]:
    """Run the block as is."""
    return call(params, x, key, extra)


# The installed policies, innermost last (an immutable tuple: set, never mutated, so a reset
# restores exactly what the enclosing ``with`` saw).
_POLICIES: contextvars.ContextVar[tuple[Policy, ...]] = contextvars.ContextVar("polymodal_seam_policies", default=())
# While :func:`record_stacks` runs: the list every run_layers call appends its block trees to.
_RECORDER: contextvars.ContextVar[list | None] = contextvars.ContextVar("polymodal_seam_recorder", default=None)


def current_policy() -> Policy:
    """The innermost installed policy (:func:`default_policy` when none is)."""
    stack = _POLICIES.get()
    return stack[-1] if stack else default_policy


@contextlib.contextmanager
def use_policy(policy: Policy) -> Iterator[Policy]:
    """Install ``policy`` at the seam for the duration of the ``with`` block (nests; per thread / task)."""
    if not callable(policy):
        raise TypeError(f"use_policy: expected a callable policy(call, index, params, x, key, extra), "
                        f"got {type(policy).__name__}")
    token = _POLICIES.set(_POLICIES.get() + (policy,))
    try:
        yield policy
    finally:
        _POLICIES.reset(token)


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
    recorder = _RECORDER.get()
    if recorder is not None:
        recorder.append(layer_params)
    policy = current_policy()
    auxs = []
    for i, p in enumerate(layer_params):
        x, aux = policy(functools.partial(fn, i), i, p, x, keys[i], None if extras is None else extras[i])
        auxs.append(aux)
    return x, auxs


def _stack_path(block: Any, where: dict[int, str]) -> str | None:
    """The flat-key path of the list holding ``block``, from the identity of one of its leaves."""
    for rel, leaf in flatten(block).items():
        full = where.get(id(leaf))
        if full is None:
            continue
        block_path = full[: len(full) - len(rel) - 1] if rel else full
        stack, _, index = block_path.rpartition(".")
        return stack if index.isdigit() else None
    return None


def record_stacks(fn: Callable[..., Any], params: Params, *args: Any, **kwargs: Any) -> list[str]:
    """Flat-key paths (in ``params``) of the block lists that ``fn(params, *args, **kwargs)`` runs
    through :func:`run_layers`, in the order they first ran.

    ``fn`` runs once, under ``torch.no_grad()``. A block is traced back to ``params`` by the identity
    of its leaves, so slicing or re-listing a stack does not hide it; blocks whose leaves are not in
    ``params`` (built inside ``fn``) are not reported.

    >>> blocks = {"enc": {"layers": [{"w": torch.tensor(2.0)}, {"w": torch.tensor(3.0)}]}, "head": {"w": torch.ones(())}}
    >>> record_stacks(lambda p, x: run_layers(lambda i, q, h, k, e: (h * q["w"], None), p["enc"]["layers"], x), blocks,
    ...               torch.ones(()))
    ['enc.layers']
    """
    seen: list = []
    token = _RECORDER.set(seen)
    try:
        with torch.no_grad():
            fn(params, *args, **kwargs)
    finally:
        _RECORDER.reset(token)
    where: dict[int, str] = {}
    for k, t in flatten(params).items():
        where.setdefault(id(t), k)
    out: list[str] = []
    for blocks in seen:
        for block in blocks:
            path = _stack_path(block, where)
            if path is not None and path not in out:
                out.append(path)
    return out
