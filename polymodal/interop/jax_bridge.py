"""The bridge: a pure polymodal (torch) function as a JAX function, by callback.

``to_jax_function(fn)`` wraps ``fn(params, *inputs)``; the result takes the same arguments as
JAX pytrees and returns ``fn``'s outputs (tensors, tuples, NamedTuples, dicts) as JAX arrays in
the same containers. How each JAX transformation sees it:

* **eager** (concrete arrays): the arrays cross into torch through DLPack and back, no copies.
* **jax.jit**: the call is a ``jax.pure_callback`` whose output shapes and dtypes are worked out
  once per input signature (shapes and dtypes) by running ``fn`` on fake tensors. JAX's callback
  mechanism hands the callback host copies of its operands (so a large model's params are copied
  on every jitted call: see ``benchmarks/results/jax_interop.md``); those are viewed as tensors
  without a further copy, and the outputs go back as numpy views. For models whose params are
  large, prefer the eager bridge or the translation (``export_to_jax``) under ``jax.jit``.
* **jax.grad / value_and_grad / vjp**: a ``jax.custom_vjp`` whose backward runs
  ``torch.func.vjp`` of ``fn`` (floating leaves only; integer leaves get zero cotangents). The
  backward recomputes the forward inside torch (the residuals JAX keeps are the inputs, as with
  activation checkpointing), so a gradient step costs two forwards and one backward in torch.
* **jax.vmap**: ``vmap="batched"`` (default) hands the callback the whole batch
  (``vmap_method="broadcast_all"``) and runs ``torch.func.vmap(fn)`` once per call, nested
  once per mapped axis; ``vmap="loop"`` calls ``fn`` once per example (``"sequential"``).

``fn`` must be pure and its output shapes must follow from its input shapes alone; a call whose
outputs differ from the shapes worked out for that signature raises a ``ValueError`` naming the
output. Random keys cross as data (see :mod:`.jax_arrays`). 64-bit leaves need
``jax_enable_x64``; bfloat16 and float16 leaves cross as they are and are differentiated in
their own dtype (as torch does).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as tpt
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode

import jax

from .jax_arrays import check_x64, host_to_torch, is_float, jax_dtype, normalize_leaf, to_jax_array, to_torch, \
    torch_dtype, torch_to_host

__all__ = ["to_jax_function"]

_VMAP = {"batched": "broadcast_all", "loop": "sequential"}


def _vmapped(f: Callable, n: int) -> Callable:
    for _ in range(n):
        f = torch.func.vmap(f)
    return f


def _is_concrete(leaves: list) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in leaves)


class _Signature:
    """Everything fixed for one input signature: output layout, shapes, and the custom_vjp callable."""

    def __init__(self, fn: Callable, treedef: Any, leaves: list, vmap_method: str, name: str):
        self.name, self.treedef = name, treedef
        self.in_shapes = [tuple(x.shape) for x in leaves]
        self.in_dtypes = [torch_dtype(x.dtype) for x in leaves]
        self.diff_in = [i for i, d in enumerate(self.in_dtypes) if d.is_floating_point]
        self.fn, self.vmap_method = fn, vmap_method
        self.out_spec, self.out_shapes, self.out_dtypes = self._trace_shapes()
        for j, d in enumerate(self.out_dtypes):
            check_x64(d, f"{name}: output {j}")
        self.out_structs = [jax.ShapeDtypeStruct(s, jax_dtype(d)) for s, d in zip(self.out_shapes, self.out_dtypes)]
        self.diff_out = [j for j, d in enumerate(self.out_dtypes) if d.is_floating_point]
        self.call = self._custom_vjp()

    # --- torch side -------------------------------------------------------------------------

    def run(self, *leaves: torch.Tensor) -> tuple:
        out = self.fn(*jax.tree_util.tree_unflatten(self.treedef, list(leaves)))
        flat, spec = tpt.tree_flatten(out)
        bad = [type(o).__name__ for o in flat if not isinstance(o, torch.Tensor) and o is not None]
        if bad:
            raise TypeError(f"{self.name}: outputs must be tensors (in tuples, NamedTuples, dicts, lists), got {bad}")
        self._last_spec, self._nones = spec, [o is None for o in flat]
        return tuple(o for o in flat if o is not None)

    def _trace_shapes(self) -> tuple:
        # Fake tensors carry no values: value checks (spec.reading_values_ok) must stand aside,
        # as they do under torch.compile / torch.export, which trace with fake tensors too.
        compiling, torch.compiler._is_compiling_flag = torch.compiler._is_compiling_flag, True
        try:
            with FakeTensorMode():
                fakes = [torch.empty(s, dtype=d) for s, d in zip(self.in_shapes, self.in_dtypes)]
                outs = self.run(*fakes)
        except (DynamicOutputShapeException, DataDependentOutputException) as e:
            raise ValueError(f"{self.name}: the output shapes depend on input values ({type(e).__name__}: {e}); "
                             "the bridge needs shapes that follow from the input shapes alone (pad or mask to a "
                             "fixed size), or call the torch function outside JAX") from e
        finally:  # the flag is process-wide: left set, every later value check would stand aside
            torch.compiler._is_compiling_flag = compiling
        self.nones = self._nones  # positions of None outputs (e.g. TransformerOutput's unused fields)
        return self._last_spec, [tuple(o.shape) for o in outs], [o.dtype for o in outs]

    def check(self, outs: tuple, batch_dims: int) -> None:
        for j, (o, s, d) in enumerate(zip(outs, self.out_shapes, self.out_dtypes)):
            if tuple(o.shape[batch_dims:]) != s or o.dtype != d:
                raise ValueError(
                    f"{self.name}: output {j} changed between calls: expected {d} {s} (worked out once for "
                    f"these input shapes), got {o.dtype} {tuple(o.shape[batch_dims:])}; the bridge needs a pure "
                    "function whose output shapes depend only on its input shapes (no Python state, no "
                    "value-dependent sizes): pad to a fixed size or split the function")

    def pullback(self, *args: torch.Tensor) -> tuple:
        n = len(self.in_shapes)
        xs, cts = list(args[:n]), args[n:]

        def diff_fn(*diff: torch.Tensor) -> tuple:
            full = list(xs)
            for i, d in zip(self.diff_in, diff):
                full[i] = d
            outs = self.run(*full)
            return tuple(outs[j] for j in self.diff_out)

        if not self.diff_out:
            return tuple(torch.zeros_like(xs[i]) for i in self.diff_in)
        _, pull = torch.func.vjp(diff_fn, *[xs[i] for i in self.diff_in])
        return tuple(pull(tuple(cts)))

    # --- JAX side ---------------------------------------------------------------------------

    def _batch_dims(self, ts: list) -> int:
        return ts[0].dim() - len(self.in_shapes[0]) if ts else 0

    def host_forward(self, *arrays: np.ndarray) -> tuple:
        ts = [host_to_torch(a) for a in arrays]
        nb = self._batch_dims(ts)
        with torch.no_grad():
            outs = _vmapped(self.run, nb)(*ts)
        self.check(outs, nb)
        return tuple(torch_to_host(o, s.dtype) for o, s in zip(outs, self.out_structs))

    def host_backward(self, *arrays: np.ndarray) -> tuple:
        ts = [host_to_torch(a) for a in arrays]
        nb = self._batch_dims(ts)
        grads = _vmapped(self.pullback, nb)(*ts)
        return tuple(torch_to_host(g, jax_dtype(self.in_dtypes[i])) for g, i in zip(grads, self.diff_in))

    def forward(self, leaves: list) -> tuple:
        if _is_concrete(leaves):  # eager: DLPack both ways, no callback
            with torch.no_grad():
                outs = self.run(*[to_torch(x) for x in leaves])
            self.check(outs, 0)
            return tuple(to_jax_array(o, f"{self.name}: output {j}") for j, o in enumerate(outs))
        return tuple(jax.pure_callback(self.host_forward, self.out_structs, *leaves, vmap_method=self.vmap_method))

    def backward(self, leaves: list, cts: list) -> tuple:
        if _is_concrete(leaves + cts):
            grads = self.pullback(*[to_torch(x) for x in leaves + cts])
            return tuple(to_jax_array(g) for g in grads)
        structs = [jax.ShapeDtypeStruct(self.in_shapes[i], leaves[i].dtype) for i in self.diff_in]
        return tuple(jax.pure_callback(self.host_backward, structs, *leaves, *cts, vmap_method=self.vmap_method))

    def _custom_vjp(self) -> Callable:
        @jax.custom_vjp
        def call(*leaves):
            return self.forward(list(leaves))

        def fwd(*leaves):
            return self.forward(list(leaves)), leaves

        def bwd(leaves, cts):
            grads = iter(self.backward(list(leaves), [cts[j] for j in self.diff_out]))
            return tuple(next(grads) if i in self.diff_in else np.zeros(np.shape(x), jax.dtypes.float0)
                         for i, x in enumerate(leaves))

        call.defvjp(fwd, bwd)
        return call


def to_jax_function(fn: Callable, *, vmap: str = "batched", name: str | None = None) -> Callable:
    """A pure polymodal function ``fn(params, *inputs)`` as a JAX function (see the module docstring).

    Args:
        fn: a pure torch function of pytrees of tensors (dicts, lists, tuples); it returns tensors
            in any torch pytree (tuple, NamedTuple, dict, list).
        vmap: ``"batched"`` (one ``torch.func.vmap`` call per batch) or ``"loop"`` (one call per
            example) under ``jax.vmap``.
        name: used in error messages (default ``fn.__name__``).

    Returns:
        ``jfn(params, *inputs)`` over JAX arrays, usable under ``jax.jit``, ``jax.grad``,
        ``jax.value_and_grad`` and ``jax.vmap``.

    >>> import jax.numpy as jnp, torch
    >>> jfn = to_jax_function(lambda p, x: torch.tanh(x @ p["w"]).sum())
    >>> float(jax.grad(lambda p, x: jfn(p, x))({"w": jnp.zeros((2, 1))}, jnp.ones((3, 2)))["w"][0, 0])
    3.0
    """
    if vmap not in _VMAP:
        raise ValueError(f"to_jax_function: vmap must be one of {sorted(_VMAP)}, got {vmap!r}")
    label = name or f"to_jax_function({getattr(fn, '__name__', type(fn).__name__)})"
    cache: dict = {}

    @functools.wraps(fn)
    def jfn(*args: Any) -> Any:
        leaves, treedef = jax.tree_util.tree_flatten(args)
        leaves = [normalize_leaf(x) for x in leaves]
        bad = [type(x).__name__ for x in leaves if not hasattr(x, "dtype")]
        if bad:
            raise TypeError(f"{label}: arguments must be pytrees of arrays, got leaves of type {bad}")
        for i, x in enumerate(leaves):
            torch_dtype(x.dtype)
            if not jax.config.jax_enable_x64 and np.dtype(x.dtype).itemsize == 8 and not is_float(x.dtype):
                check_x64(torch.int64, f"{label}: argument leaf {i}")
        sig = (treedef, tuple((tuple(x.shape), np.dtype(x.dtype)) for x in leaves))
        if sig not in cache:
            cache[sig] = _Signature(fn, treedef, leaves, _VMAP[vmap], label)
        entry = cache[sig]
        outs = iter(entry.call(*leaves))
        return tpt.tree_unflatten([None if none else next(outs) for none in entry.nones], entry.out_spec)

    return jfn
