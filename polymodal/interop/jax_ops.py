"""The op table of the JAX translation, part 1: elementwise, reductions, shapes, indexing, creation.

``OPS`` maps an ATen overload (as ``torch.export`` writes it) to a ``jax.numpy`` / ``jax.lax``
function with the same signature and torch's semantics; the layer ops (linear, convolutions,
norms, attention, pooling) are in :mod:`.jax_ops_nn`, which adds them to ``OPS``. Arguments
arrive as JAX arrays, Python scalars, lists, and torch dtypes (translated by :func:`dtype`).
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Sequence
from typing import Any, Callable

import torch

import jax
import jax.numpy as jnp

from .jax_arrays import check_x64, jax_dtype

__all__ = ["OPS", "dtype", "register"]

aten = torch.ops.aten
OPS: dict[Any, Callable] = {}


def register(*ops: Any) -> Callable:
    def deco(f: Callable) -> Callable:
        for op in ops:
            OPS[op] = f
        return f
    return deco


def dtype(d: Any) -> Any:
    """A torch dtype in the graph as the JAX dtype it computes in (int64 indices narrow to int32
    without x64, as JAX's own integer arrays do; float64 without x64 raises)."""
    if d is None:
        return None
    if d in (torch.float64, torch.complex128):
        check_x64(d, "a value in the exported graph")
    return jax.dtypes.canonicalize_dtype(jax_dtype(d))


def _kw_dtype(kw: dict) -> Any:
    return dtype(kw.get("dtype"))


def _dims(dim: Any, ndim: int) -> tuple | None:
    if dim is None or (isinstance(dim, Sequence) and len(dim) == 0):
        return None
    return tuple(d % ndim for d in (dim if isinstance(dim, Sequence) else [dim]))


# --- elementwise --------------------------------------------------------------------------

_UNARY = {
    aten.neg.default: jnp.negative, aten.exp.default: jnp.exp, aten.log.default: jnp.log,
    aten.sqrt.default: jnp.sqrt, aten.rsqrt.default: jax.lax.rsqrt, aten.tanh.default: jnp.tanh,
    aten.sigmoid.default: jax.nn.sigmoid, aten.relu.default: jax.nn.relu, aten.silu.default: jax.nn.silu,
    aten.abs.default: jnp.abs, aten.sin.default: jnp.sin, aten.cos.default: jnp.cos, aten.erf.default: jax.lax.erf,
    aten.reciprocal.default: jnp.reciprocal, aten.floor.default: jnp.floor, aten.ceil.default: jnp.ceil,
    aten.round.default: jnp.round, aten.sign.default: jnp.sign, aten.log1p.default: jnp.log1p,
    aten.expm1.default: jnp.expm1, aten.square.default: jnp.square, aten.bitwise_not.default: jnp.invert,
    aten.logical_not.default: jnp.logical_not, aten.isnan.default: jnp.isnan, aten.isinf.default: jnp.isinf,
    aten.log2.default: jnp.log2, aten.trunc.default: jnp.trunc, aten.softplus.default: jax.nn.softplus,
}
for _op, _f in _UNARY.items():
    OPS[_op] = (lambda f: lambda x, *a, **k: f(x))(_f)

_BINARY = {
    "mul": operator.mul, "eq": jnp.equal, "ne": jnp.not_equal, "lt": jnp.less, "le": jnp.less_equal,
    "gt": jnp.greater, "ge": jnp.greater_equal, "maximum": jnp.maximum, "minimum": jnp.minimum,
    "bitwise_and": jnp.bitwise_and, "bitwise_or": jnp.bitwise_or, "bitwise_xor": jnp.bitwise_xor,
    "__and__": jnp.bitwise_and, "__or__": jnp.bitwise_or, "__xor__": jnp.bitwise_xor,
    "__rshift__": jnp.right_shift, "__lshift__": jnp.left_shift, "logical_and": jnp.logical_and,
    "logical_or": jnp.logical_or, "fmod": jnp.fmod, "remainder": jnp.remainder, "atan2": jnp.arctan2,
}
for _name, _f in _BINARY.items():
    for _ov in ("Tensor", "Scalar", "default"):
        if hasattr(getattr(aten, _name), _ov):
            OPS[getattr(getattr(aten, _name), _ov)] = (lambda f: lambda x, y: f(x, y))(_f)


@register(aten.add.Tensor, aten.add.Scalar)
def _add(x, y, alpha=1):
    return x + (y if alpha == 1 else alpha * y)


@register(aten.sub.Tensor, aten.sub.Scalar)
def _sub(x, y, alpha=1):
    return x - (y if alpha == 1 else alpha * y)


@register(aten.rsub.Scalar, aten.rsub.Tensor)
def _rsub(x, y, alpha=1):
    return y - alpha * x


@register(aten.div.Tensor, aten.div.Scalar, aten.div.Tensor_mode, aten.div.Scalar_mode)
def _div(x, y, rounding_mode=None):
    q = jnp.true_divide(x, y)
    if rounding_mode == "floor":
        return jnp.floor_divide(x, y) if jnp.issubdtype(jnp.result_type(x, y), jnp.integer) else jnp.floor(q)
    if rounding_mode == "trunc":
        return jnp.trunc(q).astype(jnp.result_type(x, y)) if jnp.issubdtype(jnp.result_type(x, y), jnp.integer) \
            else jnp.trunc(q)
    return q


@register(aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.pow.Scalar)
def _pow(x, y):
    return jnp.power(x, y)


@register(aten.clamp.default, aten.clamp.Tensor)
def _clamp(x, min=None, max=None):
    return jnp.clip(x, min, max)


OPS[aten.clamp_min.default] = OPS[aten.clamp_min.Tensor] = lambda x, m: jnp.maximum(x, m)
OPS[aten.clamp_max.default] = OPS[aten.clamp_max.Tensor] = lambda x, m: jnp.minimum(x, m)


@register(aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar)
def _where(c, x, y):
    return jnp.where(c, x, y)


@register(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def _masked_fill(x, mask, value):
    return jnp.where(mask, jnp.asarray(value, x.dtype), x)


@register(aten.nan_to_num.default)
def _nan_to_num(x, nan=0.0, posinf=None, neginf=None):
    return jnp.nan_to_num(x, nan=nan, posinf=posinf, neginf=neginf)


@register(aten.detach.default)
def _detach(x):
    return jax.lax.stop_gradient(x)


for _op in (aten.alias.default, aten.clone.default, aten.contiguous.default, aten.lift_fresh_copy.default):
    OPS[_op] = lambda x, *a, **k: x
OPS[aten._assert_tensor_metadata.default] = lambda *a, **k: None
OPS[aten.dropout.default] = lambda x, p=0.5, train=False: x if not train or p == 0 else _unsupported_dropout()


def _unsupported_dropout():
    raise NotImplementedError("aten.dropout with train=True (torch's global RNG) is outside the translated set; "
                              "polymodal layers take explicit keys instead")


@register(aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.to.device)
def _to(x, *args, **kw):
    d = kw.get("dtype", next((a for a in args if isinstance(a, torch.dtype)), None))
    return x if d is None else x.astype(dtype(d))


OPS[aten.type_as.default] = lambda x, other: x.astype(other.dtype)

# --- reductions ---------------------------------------------------------------------------


def _reduction(f: Callable) -> Callable:
    def red(x, dim=None, keepdim=False, *, dtype=None):
        out = f(x, axis=_dims(dim, x.ndim), keepdims=keepdim)
        return out if dtype is None else out.astype(globals()["dtype"](dtype))
    return red


for _name, _f in (("sum", jnp.sum), ("mean", jnp.mean), ("amax", jnp.max), ("amin", jnp.min), ("prod", jnp.prod),
                  ("any", jnp.any), ("all", jnp.all), ("logsumexp", jax.nn.logsumexp)):
    for _ov in ("default", "dim", "dim_IntList", "dims", "int"):
        if hasattr(getattr(aten, _name), _ov):
            OPS[getattr(getattr(aten, _name), _ov)] = _reduction(_f)


@register(aten.var.correction, aten.std.correction, aten.var.dim, aten.std.dim)
def _var(x, dim=None, *args, correction=None, keepdim=False, unbiased=None):
    if args:  # var.dim(x, dim, unbiased, keepdim)
        unbiased, keepdim = args[0], (args[1] if len(args) > 1 else keepdim)
    ddof = correction if correction is not None else (1 if unbiased in (None, True) else 0)
    return jnp.var(x, axis=_dims(dim, x.ndim), ddof=ddof, keepdims=keepdim)


OPS[aten.std.correction] = OPS[aten.std.dim] = lambda *a, **k: jnp.sqrt(_var(*a, **k))


@register(aten.var_mean.correction)
def _var_mean(x, dim=None, *, correction=None, keepdim=False):
    return _var(x, dim, correction=correction, keepdim=keepdim), jnp.mean(x, _dims(dim, x.ndim), keepdims=keepdim)


OPS[aten.argmax.default] = lambda x, dim=None, keepdim=False: jnp.argmax(x, axis=dim, keepdims=keepdim)
OPS[aten.argmin.default] = lambda x, dim=None, keepdim=False: jnp.argmin(x, axis=dim, keepdims=keepdim)
OPS[aten.max.dim] = lambda x, dim, keepdim=False: (jnp.max(x, dim, keepdims=keepdim),
                                                   jnp.argmax(x, dim, keepdims=keepdim))
OPS[aten.min.dim] = lambda x, dim, keepdim=False: (jnp.min(x, dim, keepdims=keepdim),
                                                   jnp.argmin(x, dim, keepdims=keepdim))
OPS[aten.max.default] = lambda x: jnp.max(x)
OPS[aten.min.default] = lambda x: jnp.min(x)
OPS[aten.cumsum.default] = lambda x, dim, dtype=None: jnp.cumsum(x, axis=dim, dtype=globals()["dtype"](dtype))


@register(aten.linalg_vector_norm.default)
def _vector_norm(x, ord=2, dim=None, keepdim=False, *, dtype=None):
    axis = _dims(dim, x.ndim)
    if ord == 2:  # sqrt of a sum of squares: differentiable like torch's (0 at 0 only where all are 0)
        return jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=keepdim))
    if ord == 1:
        return jnp.sum(jnp.abs(x), axis=axis, keepdims=keepdim)
    if ord == math.inf:
        return jnp.max(jnp.abs(x), axis=axis, keepdims=keepdim)
    return jnp.sum(jnp.abs(x) ** ord, axis=axis, keepdims=keepdim) ** (1.0 / ord)


# --- shapes and indexing ------------------------------------------------------------------


OPS[aten.reshape.default] = OPS[aten.view.default] = OPS[aten._unsafe_view.default] = \
    lambda x, size: jnp.reshape(x, tuple(size))
OPS[aten.transpose.int] = lambda x, a, b: jnp.swapaxes(x, a, b)
OPS[aten.t.default] = lambda x: x.T
OPS[aten.permute.default] = lambda x, dims: jnp.transpose(x, tuple(d % x.ndim for d in dims))
OPS[aten.movedim.int] = OPS[aten.movedim.intlist] = lambda x, s, d: jnp.moveaxis(x, s, d)
OPS[aten.unsqueeze.default] = lambda x, d: jnp.expand_dims(x, d % (x.ndim + 1))
OPS[aten.squeeze.dim] = lambda x, d: jnp.squeeze(x, d) if x.shape[d] == 1 else x
OPS[aten.squeeze.dims] = lambda x, ds: jnp.squeeze(x, tuple(d % x.ndim for d in ds if x.shape[d] == 1))
OPS[aten.squeeze.default] = lambda x: jnp.squeeze(x)
OPS[aten.flip.default] = lambda x, dims: jnp.flip(x, tuple(dims))
OPS[aten.roll.default] = lambda x, shifts, dims=(): jnp.roll(x, tuple(shifts), tuple(dims) or None)
OPS[aten.tril.default] = lambda x, diagonal=0: jnp.tril(x, diagonal)
OPS[aten.triu.default] = lambda x, diagonal=0: jnp.triu(x, diagonal)
OPS[aten.cat.default] = OPS[aten.concat.default] = lambda xs, dim=0: jnp.concatenate(
    [jnp.asarray(x) for x in xs if x.size or len(xs) == 1], axis=dim)
OPS[aten.stack.default] = lambda xs, dim=0: jnp.stack(xs, axis=dim)
OPS[aten.unbind.int] = lambda x, dim=0: [jnp.take(x, i, axis=dim) for i in range(x.shape[dim])]
OPS[aten.select.int] = lambda x, dim, i: jnp.take(x, i, axis=dim)
OPS[aten.gather.default] = lambda x, dim, index, sparse_grad=False: jnp.take_along_axis(x, index, axis=dim)
OPS[aten.index_select.default] = lambda x, dim, index: jnp.take(x, index, axis=dim)


@register(aten.embedding.default)
def _embedding(w, ids, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    """Rows of ``w``; as torch's backward, positions holding ``padding_idx`` send no gradient
    (BERT's word table: the padding row's gradient is zero)."""
    if scale_grad_by_freq:
        raise NotImplementedError("aten.embedding with scale_grad_by_freq=True is outside the translated set")
    rows = jnp.take(w, ids, axis=0)
    if padding_idx is None or padding_idx < 0:
        return rows
    return jnp.where((ids == padding_idx)[..., None], jax.lax.stop_gradient(rows), rows)


OPS[aten.one_hot.default] = lambda x, num_classes=-1: jax.nn.one_hot(x, num_classes, dtype=jnp.int32)
OPS[aten.repeat.default] = lambda x, reps: jnp.tile(x, tuple(reps))
OPS[aten.outer.default] = lambda x, y: jnp.outer(x, y)
OPS[aten.sym_size.int] = lambda x, d: x.shape[d]
OPS[aten.expand_as.default] = lambda x, other: jnp.broadcast_to(x, other.shape)
OPS[aten.meshgrid.indexing] = lambda xs, indexing="ij": list(jnp.meshgrid(*xs, indexing=indexing))
OPS[aten.meshgrid.default] = lambda xs: list(jnp.meshgrid(*xs, indexing="ij"))
OPS[getattr(operator, "getitem")] = lambda xs, i: xs[i]


@register(aten.repeat_interleave.self_int)
def _repeat_interleave(x, repeats, dim=None, output_size=None):
    return jnp.repeat(x, repeats, axis=dim)


@register(aten.expand.default)
def _expand(x, size, implicit=False):
    lead = len(size) - x.ndim
    return jnp.broadcast_to(x, tuple(x.shape[i - lead] if s == -1 else s for i, s in enumerate(size)))


@register(aten.flatten.using_ints)
def _flatten(x, start_dim=0, end_dim=-1):
    if x.ndim == 0:
        return x.reshape(1)
    s, e = start_dim % x.ndim, end_dim % x.ndim
    return x.reshape(x.shape[:s] + (-1,) + x.shape[e + 1:])


@register(aten.unflatten.int)
def _unflatten(x, dim, sizes):
    d = dim % x.ndim
    return x.reshape(x.shape[:d] + tuple(sizes) + x.shape[d + 1:])


@register(aten.slice.Tensor)
def _slice(x, dim=0, start=None, end=None, step=1):
    idx = [slice(None)] * x.ndim
    idx[dim] = slice(start, end, step)
    return x[tuple(idx)]


@register(aten.narrow.default)
def _narrow(x, dim, start, length):
    return _slice(x, dim, start, start + length)


def _split_at(x, sizes: Sequence[int], dim: int) -> list:
    return jnp.split(x, list(itertools.accumulate(sizes))[:-1], axis=dim)


@register(aten.chunk.default)
def _chunk(x, chunks, dim=0):
    n = x.shape[dim]
    size = -(-n // chunks)
    return _split_at(x, [min(size, n - i) for i in range(0, n, size)], dim)


@register(aten.split.Tensor)
def _split(x, split_size, dim=0):
    n = x.shape[dim]
    return _split_at(x, [min(split_size, n - i) for i in range(0, n, split_size)], dim)


OPS[aten.split_with_sizes.default] = lambda x, sizes, dim=0: _split_at(x, list(sizes), dim)


@register(aten.index.Tensor)
def _index(x, indices):
    return x[tuple(slice(None) if i is None else i for i in indices)]


@register(aten.index_put.default)
def _index_put(x, indices, values, accumulate=False):
    at = x.at[tuple(slice(None) if i is None else i for i in indices)]
    return at.add(values) if accumulate else at.set(values)


# --- creation -----------------------------------------------------------------------------

@register(aten.arange.default, aten.arange.start, aten.arange.start_step)
def _arange(*args, **kw):
    d = _kw_dtype(kw)
    if d is None:
        d = dtype(torch.float32 if any(isinstance(a, float) for a in args) else torch.int64)
    return jnp.arange(*args, dtype=d)


@register(aten.full.default)
def _full(size, fill_value, **kw):
    d = _kw_dtype(kw) or (jnp.float32 if isinstance(fill_value, float) else dtype(torch.int64)
                          if not isinstance(fill_value, bool) else jnp.bool_)
    return jnp.full(tuple(size), fill_value, d)


OPS[aten.zeros.default] = lambda size, **kw: jnp.zeros(tuple(size), _kw_dtype(kw) or jnp.float32)
OPS[aten.ones.default] = lambda size, **kw: jnp.ones(tuple(size), _kw_dtype(kw) or jnp.float32)
OPS[aten.empty.memory_format] = OPS[aten.zeros.default]
OPS[aten.scalar_tensor.default] = lambda v, **kw: jnp.asarray(v, _kw_dtype(kw) or jnp.float32)
OPS[aten.zeros_like.default] = lambda x, **kw: jnp.zeros_like(x, dtype=_kw_dtype(kw))
OPS[aten.ones_like.default] = lambda x, **kw: jnp.ones_like(x, dtype=_kw_dtype(kw))
OPS[aten.empty_like.default] = OPS[aten.zeros_like.default]
OPS[aten.full_like.default] = lambda x, v, **kw: jnp.full_like(x, v, dtype=_kw_dtype(kw))
OPS[aten.new_zeros.default] = lambda x, size, **kw: jnp.zeros(tuple(size), _kw_dtype(kw) or x.dtype)
OPS[aten.new_ones.default] = lambda x, size, **kw: jnp.ones(tuple(size), _kw_dtype(kw) or x.dtype)
OPS[aten.new_full.default] = lambda x, size, v, **kw: jnp.full(tuple(size), v, _kw_dtype(kw) or x.dtype)
OPS[aten.new_empty.default] = OPS[aten.new_zeros.default]
