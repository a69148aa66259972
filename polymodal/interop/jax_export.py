"""Native translation: a pure polymodal function as a JAX function, op by op (no callback).

``export_to_jax(fn, example_inputs)`` runs ``torch.export`` on ``fn(params, *inputs)`` and
translates the exported ATen graph node by node through the op table (:mod:`.jax_ops`,
:mod:`.jax_ops_nn`) into ``jax.numpy`` / ``jax.lax``. The result is a pure JAX function of the
same pytrees: ``jax.jit``, ``jax.grad`` and ``jax.vmap`` transform it natively and it runs
wherever JAX runs (torch is needed only to export). Gradients are JAX's own, through the
translated ops; ``detach`` becomes ``stop_gradient``.

Shapes: ``torch.export`` specialises the graph to the example shapes. A call with other input
shapes exports again for those shapes (once per signature; ``retrace=False`` raises instead).
``jax.vmap`` maps over an extra leading axis of the shapes a call would otherwise have.

An op outside the table raises :class:`UnsupportedOpError` at export time, naming the op, the
count, and the ways out (the callback bridge, or a new entry in the table). Randomness: keys
are int64 data in torch, so keyed layers (dropout with a key) need ``jax_enable_x64``; without it
the call raises a ``TypeError`` naming the fix (the bridge takes keys as uint32 words instead).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as tpt
from torch.export.graph_signature import InputKind, OutputKind

import jax
import jax.numpy as jnp

from .jax_arrays import jax_dtype, torch_dtype
from .jax_ops import OPS
from .jax_ops_nn import MUTATES

__all__ = ["export_to_jax", "UnsupportedOpError", "translated_ops"]

_DROP_KWARGS = {"device", "layout", "pin_memory", "memory_format", "non_blocking", "copy"}


class UnsupportedOpError(NotImplementedError):
    """An exported graph uses ATen ops that the JAX translation does not cover."""


def translated_ops() -> list[str]:
    """The names of the ATen overloads the translation covers."""
    return sorted(str(op) for op in OPS)


class _Pure(torch.nn.Module):
    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        return self.fn(*args)


class _Graph:
    """One exported graph: its placeholders' sources, its constants, and the output layout."""

    def __init__(self, fn: Callable, args: tuple, name: str):
        ep = torch.export.export(_Pure(fn), args, strict=False)
        self.graph, self.name = ep.graph, name
        used = collections.Counter(str(n.target) for n in ep.graph.nodes
                                   if n.op == "call_function" and n.target not in OPS)
        if used:
            ops = ", ".join(f"{op} (x{c})" for op, c in sorted(used.items()))
            raise UnsupportedOpError(
                f"{name}: the exported graph uses ops outside the JAX translation: {ops}. Use the callback bridge "
                "(polymodal.interop.jax.to_jax_function) for this function, or add a translation of the op to "
                "polymodal/interop/jax_ops.py (OPS); translated_ops() lists the covered ones")
        consts = {**ep.constants, **ep.state_dict}
        self.sources: dict[str, Any] = {}  # placeholder name -> user-input index or constant array
        k = 0
        for spec in ep.graph_signature.input_specs:
            if spec.kind == InputKind.USER_INPUT:
                self.sources[spec.arg.name] = k
                k += 1
            else:
                self.sources[spec.arg.name] = _constant(consts[spec.target])
        self.outputs = [i for i, s in enumerate(ep.graph_signature.output_specs) if s.kind == OutputKind.USER_OUTPUT]
        self.out_spec = ep.call_spec.out_spec

    def __call__(self, leaves: Sequence[Any]) -> Any:
        env: dict = {}
        value = lambda a: env[a] if isinstance(a, torch.fx.Node) else a  # noqa: E731
        for node in self.graph.nodes:
            if node.op == "placeholder":
                src = self.sources[node.name]
                env[node] = leaves[src] if isinstance(src, int) else src
            elif node.op == "call_function":
                args = torch.fx.node.map_aggregate(node.args, value)
                kwargs = {k: torch.fx.node.map_aggregate(v, value) for k, v in node.kwargs.items()
                          if k not in _DROP_KWARGS}
                try:
                    out = OPS[node.target](*args, **kwargs)
                except OverflowError as e:  # an int64 constant met 32-bit arrays
                    raise TypeError(f"{self.name}: {node.target} needs 64-bit integers (random keys are int64 "
                                    "words), but JAX has 64-bit types disabled; enable them with "
                                    "jax.config.update('jax_enable_x64', True)") from e
                if node.target in MUTATES and isinstance(out, tuple):  # torch writes into these arguments
                    out, *updates = out
                    for pos, new in zip(MUTATES[node.target], updates):
                        env[node.args[pos]] = new
                env[node] = out
            elif node.op == "output":
                flat = [value(a) for a in node.args[0]]
                return tpt.tree_unflatten([flat[i] for i in self.outputs], self.out_spec)
        raise AssertionError("graph without output")


def _constant(t: Any) -> Any:
    if not isinstance(t, torch.Tensor):
        return t
    return jnp.asarray(t.detach().cpu().numpy()) if t.dtype != torch.bfloat16 else \
        jnp.asarray(t.detach().cpu().float().numpy()).astype(jnp.bfloat16)


def _signature(shapes_dtypes: Sequence) -> tuple:
    return tuple((tuple(s), np.dtype(jax.dtypes.canonicalize_dtype(d))) for s, d in shapes_dtypes)


def export_to_jax(fn: Callable, example_inputs: Sequence, *, retrace: bool = True,
                  name: str | None = None) -> Callable:
    """Translate ``fn(params, *inputs)`` into a pure JAX function of the same pytrees.

    Args:
        fn: a pure polymodal function (tensors in pytrees in, tensors in pytrees out).
        example_inputs: ``(params, *inputs)`` as tensors: the shapes and dtypes to export with.
        retrace: export again for calls with other input shapes (else such a call raises).
        name: used in error messages.

    Returns:
        ``jfn(params, *inputs)`` over JAX arrays returning ``fn``'s output pytree.

    Raises:
        UnsupportedOpError: the graph uses an op outside the translated set (named).

    >>> import torch, jax.numpy as jnp
    >>> from polymodal.core.layers import Linear
    >>> from polymodal.core import random as pr
    >>> lin = Linear(3, 2)
    >>> p = lin.init(key=pr.key(0))
    >>> jfn = export_to_jax(lin, (p, torch.ones(4, 3)))
    >>> jfn({k: jnp.asarray(v.numpy()) for k, v in p.items()}, jnp.ones((4, 3))).shape
    (4, 2)
    """
    label = name or f"export_to_jax({getattr(fn, '__name__', type(fn).__name__)})"
    example = tuple(example_inputs)
    leaves, spec = tpt.tree_flatten(example)
    bad = [type(x).__name__ for x in leaves if not isinstance(x, torch.Tensor)]
    if bad:
        raise TypeError(f"{label}: example_inputs must be pytrees of tensors, got leaves of type {bad}")
    n = len(leaves)
    index_def = jax.tree_util.tree_structure(tpt.tree_unflatten(list(range(n)), spec))
    order = jax.tree_util.tree_leaves(tpt.tree_unflatten(list(range(n)), spec))
    graphs = {_signature([(x.shape, jax_dtype(x.dtype)) for x in leaves]): _Graph(fn, example, label)}

    def jfn(*args: Any) -> Any:
        got, got_def = jax.tree_util.tree_flatten(args)
        if got_def != index_def:
            raise ValueError(f"{label}: expected arguments structured as {index_def}, got {got_def}")
        flat: list = [None] * n
        for i, x in zip(order, got):
            flat[i] = jnp.asarray(x)
        sig = _signature([(x.shape, x.dtype) for x in flat])
        if sig not in graphs:
            if not retrace:
                known = next(iter(graphs))
                raise ValueError(f"{label}: inputs of shapes {[s for s, _ in sig]} differ from the exported "
                                 f"{[s for s, _ in known]}; pass retrace=True to export again for new shapes")
            zeros = [torch.zeros(s, dtype=torch_dtype(d)) for s, d in sig]
            graphs[sig] = _Graph(fn, tpt.tree_unflatten(zeros, spec), label)
        return graphs[sig](flat)

    jfn.__doc__ = f"JAX translation of {label} (see polymodal.interop.jax_export)."
    return jfn
