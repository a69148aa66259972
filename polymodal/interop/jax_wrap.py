"""JAX functions inside torch: ``from_jax_function(jax_fn)`` is a torch function with JAX's gradient.

The result takes pytrees of tensors (dicts, lists, tuples), hands them to ``jax_fn`` as JAX
arrays through DLPack (no copy where the device allows) and returns ``jax_fn``'s outputs as
tensors in the same containers. It is a ``torch.autograd.Function``: ``loss.backward()``,
``torch.autograd.grad`` and ``torch.func.grad`` / ``vjp`` differentiate it with ``jax.vjp``
(floating inputs only; integer inputs and outputs are not differentiable). Under
``torch.func.vmap`` it runs ``jax.vmap(jax_fn)`` once over the batch, so per-sample gradients
``vmap(grad(f))`` work too. The backward recomputes ``jax.vjp`` from the saved inputs (JAX
holds no state between calls); both are ``jax.jit``-compiled once per input signature unless
``jit=False``.

Gradients handed back to torch are copied out of JAX's buffers (torch accumulates gradients in
place; JAX buffers must stay immutable); forward outputs share JAX's memory and must not be
modified in place.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils._pytree as tpt
from torch import Tensor
from torch._C._functorch import get_unwrapped, is_gradtrackingtensor

import jax

from .jax_arrays import to_jax_array, to_torch

__all__ = ["from_jax_function"]


class _Flat:
    """A JAX function of flat leaves returning a tuple of arrays, jitted, optionally vmapped."""

    def __init__(self, f: Callable, jit: bool, name: str):
        self.f, self.jit, self.name = f, jit, name
        self.run = jax.jit(f) if jit else f

    def batched(self, axes: Sequence) -> _Flat:
        return _Flat(jax.vmap(self.f, in_axes=tuple(axes)), self.jit, self.name)

    def vjp(self, diff: tuple, n_out_float: tuple) -> _Flat:
        """``(*leaves, *cts) -> cotangents of leaves[diff]``; ``cts`` are for the float outputs."""
        def bwd(*args):
            leaves, cts = list(args[:-len(n_out_float)]), args[-len(n_out_float):]

            def g(*d):
                full = list(leaves)
                for i, x in zip(diff, d):
                    full[i] = x
                outs = self.f(*full)
                return tuple(outs[j] for j in n_out_float)
            _, pull = jax.vjp(g, *[leaves[i] for i in diff])
            return tuple(pull(tuple(cts)))
        return _Flat(bwd, self.jit, self.name)

    def __call__(self, *leaves: Any) -> tuple:
        with torch._C._DisableFuncTorch():  # plain tensors cross: JAX does this computation
            args = [_to_jax(x, f"{self.name}: leaf {i}") for i, x in enumerate(leaves)]
            return tuple(to_torch(o) for o in self.run(*args))


def _plain(t: Any) -> Any:
    """The data under torch.func's grad-tracking wrappers (the backward runs JAX, not torch autograd)."""
    while isinstance(t, Tensor) and is_gradtrackingtensor(t):
        t = get_unwrapped(t)
    return t


def _to_jax(t: Any, what: str) -> Any:
    return to_jax_array(_plain(t), what) if isinstance(t, Tensor) else t


def _vmap_rule(function: type, info: Any, in_dims: tuple, flat: _Flat, *leaves: Any) -> tuple:
    """Batch by ``jax.vmap``: batched dims move to the front and the JAX function maps over them."""
    moved = [x.movedim(d, 0) if d is not None else x for x, d in zip(leaves, in_dims[1:])]
    outs = function.apply(flat.batched([0 if d is not None else None for d in in_dims[1:]]), *moved)
    return outs, (0,) * len(outs)


class _JaxVjp(torch.autograd.Function):
    """The backward of :class:`_JaxFunction` as its own function, so that it batches under vmap."""

    @staticmethod
    def forward(flat: _Flat, *args: Tensor) -> tuple:
        return tuple(g.clone() for g in flat(*args))  # torch accumulates gradients in place

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.name = inputs[0].name

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError(f"{ctx.name}: double backward through a JAX function is not supported "
                                  "(take higher derivatives inside JAX)")

    @staticmethod
    def vmap(info, in_dims, flat, *args):
        return _vmap_rule(_JaxVjp, info, in_dims, flat, *args)


class _JaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(flat: _Flat, *leaves: Any) -> tuple:
        return flat(*leaves)

    @staticmethod
    def setup_context(ctx, inputs, output):
        flat, *leaves = inputs
        ctx.flat = flat
        ctx.save_for_backward(*[x if isinstance(x, Tensor) else None for x in leaves])
        ctx.consts = [None if isinstance(x, Tensor) else x for x in leaves]
        ctx.float_out = tuple(j for j, o in enumerate(output) if o.is_floating_point())
        ctx.out_meta = [(o.shape, o.dtype) for o in output]
        ctx.mark_non_differentiable(*[o for o in output if not o.is_floating_point()])

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple:
        leaves = [s if c is None else c for s, c in zip(ctx.saved_tensors, ctx.consts)]
        diff = tuple(i for i, x in enumerate(leaves) if isinstance(x, Tensor) and x.is_floating_point()
                     and ctx.needs_input_grad[i + 1])
        if not diff or not ctx.float_out:
            return (None,) * (len(leaves) + 1)
        cts = [grads[j] if grads[j] is not None else torch.zeros(ctx.out_meta[j][0], dtype=ctx.out_meta[j][1])
               for j in ctx.float_out]
        got = iter(_JaxVjp.apply(ctx.flat.vjp(diff, ctx.float_out), *leaves, *cts))
        return (None, *[next(got) if i in diff else None for i in range(len(leaves))])

    @staticmethod
    def vmap(info, in_dims, flat, *leaves):
        return _vmap_rule(_JaxFunction, info, in_dims, flat, *leaves)


def _flat_fn(jax_fn: Callable, spec: Any, trees: dict) -> Callable:
    def flat(*leaves: Any) -> tuple:
        out, trees[spec] = jax.tree_util.tree_flatten(jax_fn(*tpt.tree_unflatten(list(leaves), spec)))
        return tuple(out)
    return flat


def from_jax_function(jax_fn: Callable, *, jit: bool = True, name: str | None = None) -> Callable:
    """A JAX function of pytrees of arrays as a torch function of pytrees of tensors.

    Args:
        jax_fn: a pure JAX function; its outputs may be any JAX pytree of arrays.
        jit: compile ``jax_fn`` and its vjp with ``jax.jit`` (once per input signature).
        name: used in error messages.

    Returns:
        ``torch_fn(*args)``: same containers in and out, tensors for arrays; differentiable with
        ``torch.autograd`` and ``torch.func.grad`` / ``vjp``, batched with ``torch.func.vmap``.

    >>> import torch, jax.numpy as jnp
    >>> sq = from_jax_function(lambda p, x: jnp.sum((x @ p["w"]) ** 2))
    >>> torch.func.grad(sq)({"w": torch.ones(2, 1)}, torch.ones(3, 2))["w"].flatten().tolist()
    [12.0, 12.0]
    """
    label = name or f"from_jax_function({getattr(jax_fn, '__name__', type(jax_fn).__name__)})"
    calls: dict = {}
    trees: dict = {}  # input spec -> output treedef (set when JAX traces the function)

    @functools.wraps(jax_fn)
    def torch_fn(*args: Any) -> Any:
        leaves, spec = tpt.tree_flatten(args)
        bad = [type(x).__name__ for x in leaves if not isinstance(x, (Tensor, int, float, bool))]
        if bad:
            raise TypeError(f"{label}: arguments must be pytrees of tensors, got leaves of type {bad}")
        if spec not in calls:
            calls[spec] = _Flat(_flat_fn(jax_fn, spec, trees), jit, label)
        outs = _JaxFunction.apply(calls[spec], *leaves)
        return jax.tree_util.tree_unflatten(trees[spec], list(outs))

    return torch_fn
