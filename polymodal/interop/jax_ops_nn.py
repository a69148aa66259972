"""The op table of the JAX translation, part 2: the layer ops (matmul, linear, convolutions and
their transposes, norms, softmax, scaled-dot-product attention, activations, padding, pooling,
distances), each with torch's semantics in ``jax.numpy`` / ``jax.lax``; registered into
:data:`.jax_ops.OPS`.

``MUTATES`` names the ops whose torch kernel writes into an argument (batch norm's running
statistics): the interpreter rebinds those arguments to the values returned here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

import jax
import jax.numpy as jnp

from .jax_ops import OPS, dtype, register

__all__ = ["MUTATES"]

aten = torch.ops.aten
MUTATES = {aten.batch_norm.default: (3, 4)}  # op -> positions of arguments it updates in place

# --- products -----------------------------------------------------------------------------

OPS[aten.matmul.default] = OPS[aten.mm.default] = OPS[aten.bmm.default] = lambda x, y: jnp.matmul(x, y)
OPS[aten.einsum.default] = lambda eq, xs, path=None: jnp.einsum(eq, *xs)


@register(aten.linear.default)
def _linear(x, w, b=None):
    y = jnp.matmul(x, w.T)
    return y if b is None else y + b


@register(aten.addmm.default, aten.baddbmm.default)
def _addmm(c, a, b, *, beta=1, alpha=1):
    return beta * c + alpha * jnp.matmul(a, b)


# --- activations and softmax --------------------------------------------------------------

OPS[aten.gelu.default] = lambda x, approximate="none": jax.nn.gelu(x, approximate=approximate == "tanh")
OPS[aten.leaky_relu.default] = lambda x, slope=0.01: jax.nn.leaky_relu(x, slope)
OPS[aten.hardtanh.default] = lambda x, lo=-1.0, hi=1.0: jnp.clip(x, lo, hi)
OPS[aten.elu.default] = lambda x, alpha=1.0, scale=1.0, input_scale=1.0: scale * jax.nn.elu(x * input_scale, alpha)
OPS[aten.mish.default] = lambda x: x * jnp.tanh(jax.nn.softplus(x))
OPS[aten.glu.default] = lambda x, dim=-1: jax.nn.glu(x, axis=dim)


@register(aten.softmax.int, aten._softmax.default)
def _softmax(x, dim, dtype_or_half=None):
    d = dtype_or_half if not isinstance(dtype_or_half, bool) else None
    return jax.nn.softmax(x if d is None else x.astype(dtype(d)), axis=dim)


@register(aten.log_softmax.int, aten._log_softmax.default)
def _log_softmax(x, dim, dtype_or_half=None):
    d = dtype_or_half if not isinstance(dtype_or_half, bool) else None
    return jax.nn.log_softmax(x if d is None else x.astype(dtype(d)), axis=dim)


@register(aten.cross_entropy_loss.default)
def _cross_entropy(x, target, weight=None, reduction=1, ignore_index=-100, label_smoothing=0.0):
    """Class-index targets over axis 1 (``(N, C)`` or ``(N, C, d...)``), torch's reductions
    (0 none, 1 mean over the weights of the kept targets, 2 sum) and label smoothing."""
    logp = jax.nn.log_softmax(x, axis=1)
    c = x.shape[1]
    w = jnp.ones((c,), logp.dtype) if weight is None else weight
    keep = target != ignore_index
    safe = jnp.where(keep, target, 0)
    picked = jnp.take_along_axis(logp, jnp.expand_dims(safe, 1), axis=1).squeeze(1)
    wt = jnp.where(keep, w[safe], 0.0)
    nll = -picked * wt
    if label_smoothing:
        shape = (1, c) + (1,) * (x.ndim - 2)
        smooth = -(logp * w.reshape(shape)).sum(axis=1) * keep
        nll = (1 - label_smoothing) * nll + label_smoothing / c * smooth
    if reduction == 0:
        return nll
    if reduction == 2:
        return nll.sum()
    return nll.sum() / wt.sum()


@register(aten.scaled_dot_product_attention.default)
def _sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    """Torch's math path: ``softmax(q k^T * scale + mask) v``; GQA repeats each kv head."""
    if dropout_p:
        raise NotImplementedError("aten.scaled_dot_product_attention with dropout_p > 0 (torch's global RNG) is "
                                  "outside the translated set; polymodal attention drops out with explicit keys")
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = jnp.repeat(k, q.shape[-3] // k.shape[-3], axis=-3)
        v = jnp.repeat(v, q.shape[-3] // v.shape[-3], axis=-3)
    s = jnp.matmul(q, jnp.swapaxes(k, -1, -2)) * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if is_causal:
        s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -jnp.inf)
    if attn_mask is not None:
        s = jnp.where(attn_mask, s, -jnp.inf) if attn_mask.dtype == jnp.bool_ else s + attn_mask
    return jnp.matmul(jax.nn.softmax(s, axis=-1), v)


# --- norms --------------------------------------------------------------------------------


def _affine(y, w, b, shape):
    if w is not None:
        y = y * w.reshape(shape)
    return y if b is None else y + b.reshape(shape)


@register(aten.layer_norm.default)
def _layer_norm(x, normalized_shape, w=None, b=None, eps=1e-5, cudnn_enable=True):
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    mean = jnp.mean(x, axes, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axes, keepdims=True)
    return _affine((x - mean) * jax.lax.rsqrt(var + eps), w, b, tuple(normalized_shape))


@register(aten.rms_norm.default)
def _rms_norm(x, normalized_shape, w=None, eps=None):
    axes = tuple(range(x.ndim - len(normalized_shape), x.ndim))
    eps = jnp.finfo(x.dtype).eps if eps is None else eps
    return _affine(x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axes, keepdims=True) + eps), w, None,
                   tuple(normalized_shape))


@register(aten.group_norm.default)
def _group_norm(x, num_groups, w=None, b=None, eps=1e-5, cudnn_enable=True):
    g = x.reshape(x.shape[:1] + (num_groups, -1))
    mean = jnp.mean(g, -1, keepdims=True)
    var = jnp.mean(jnp.square(g - mean), -1, keepdims=True)
    y = ((g - mean) * jax.lax.rsqrt(var + eps)).reshape(x.shape)
    return _affine(y, w, b, (x.shape[1],) + (1,) * (x.ndim - 2))


@register(aten.batch_norm.default)
def _batch_norm(x, w, b, running_mean, running_var, training, momentum, eps, cudnn_enabled=True):
    """Returns ``y`` (eval, or no running statistics) or ``(y, new_mean, new_var)``: the values
    torch writes into ``running_mean`` / ``running_var`` (unbiased variance, as torch)."""
    shape = (x.shape[1],) + (1,) * (x.ndim - 2)
    axes = (0,) + tuple(range(2, x.ndim))
    if training or running_mean is None:
        mean, var = jnp.mean(x, axes), jnp.var(x, axes)
    else:
        mean, var = running_mean, running_var
    y = _affine((x - mean.reshape(shape)) * jax.lax.rsqrt(var.reshape(shape) + eps), w, b, shape)
    if not training or running_mean is None:
        return y
    n = x.size // x.shape[1]
    stats = jax.lax.stop_gradient((mean, var * n / max(n - 1, 1)))
    return (y, (1 - momentum) * running_mean + momentum * stats[0],
            (1 - momentum) * running_var + momentum * stats[1])


# --- convolutions -------------------------------------------------------------------------


def _tuple(v, n: int) -> tuple:
    return tuple(v) * (n // len(v)) if isinstance(v, Sequence) else (v,) * n


def _dimension_numbers(n: int) -> tuple:
    sp = "DHW"[3 - n:]
    return ("NC" + sp, "OI" + sp, "NC" + sp)


def _conv(x, w, b=None, stride=1, padding=0, dilation=1, groups=1):
    n = w.ndim - 2
    unbatched = x.ndim == n + 1
    if unbatched:
        x = x[None]
    dil = _tuple(dilation, n)
    if isinstance(padding, str):
        pad = padding.upper() if padding == "valid" else [
            ((d * (k - 1)) // 2, d * (k - 1) - (d * (k - 1)) // 2) for d, k in zip(dil, w.shape[2:])]
    else:
        pad = [(p, p) for p in _tuple(padding, n)]
    y = jax.lax.conv_general_dilated(x, w, _tuple(stride, n), pad, rhs_dilation=dil, feature_group_count=groups,
                                     dimension_numbers=_dimension_numbers(n), precision=jax.lax.Precision.HIGHEST)
    if b is not None:
        y = y + b.reshape((-1,) + (1,) * n)
    return y[0] if unbatched else y


for _op in (aten.conv1d.default, aten.conv2d.default, aten.conv3d.default, aten.conv1d.padding,
            aten.conv2d.padding, aten.conv3d.padding):
    OPS[_op] = _conv


def _conv_transpose(x, w, b=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """Torch's transposed convolution: the input dilated by ``stride``, the kernel flipped and
    its in/out axes swapped per group, padded by ``dilation * (k - 1) - padding`` (+ output padding)."""
    n = w.ndim - 2
    unbatched = x.ndim == n + 1
    if unbatched:
        x = x[None]
    cin, cout_g, ks = w.shape[0], w.shape[1], w.shape[2:]
    w = w.reshape((groups, cin // groups, cout_g) + ks).swapaxes(1, 2).reshape((groups * cout_g, cin // groups) + ks)
    w = jnp.flip(w, tuple(range(2, 2 + n)))
    dil, pad, opad = _tuple(dilation, n), _tuple(padding, n), _tuple(output_padding, n)
    pads = [(d * (k - 1) - p, d * (k - 1) - p + o) for d, k, p, o in zip(dil, ks, pad, opad)]
    y = jax.lax.conv_general_dilated(x, w, (1,) * n, pads, lhs_dilation=_tuple(stride, n), rhs_dilation=dil,
                                     feature_group_count=groups, dimension_numbers=_dimension_numbers(n),
                                     precision=jax.lax.Precision.HIGHEST)
    if b is not None:
        y = y + b.reshape((-1,) + (1,) * n)
    return y[0] if unbatched else y


for _op in (aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input):
    OPS[_op] = _conv_transpose

# --- padding and pooling ------------------------------------------------------------------

_PAD_MODES = {"constant": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}


@register(aten.pad.default, aten.constant_pad_nd.default)
def _pad(x, pad, mode="constant", value=None):
    if isinstance(mode, (int, float)):  # constant_pad_nd(x, pad, value)
        mode, value = "constant", mode
    pairs = [(0, 0)] * (x.ndim - len(pad) // 2) + [(pad[2 * i], pad[2 * i + 1]) for i in range(len(pad) // 2)][::-1]
    crop = tuple(slice(-lo if lo < 0 else None, hi if hi < 0 else None) for lo, hi in pairs)
    pairs = [(max(lo, 0), max(hi, 0)) for lo, hi in pairs]
    if mode not in _PAD_MODES:
        raise NotImplementedError(f"aten.pad mode {mode!r} is outside the translated set; expected one of "
                                  f"{sorted(_PAD_MODES)}")
    kw = {"constant_values": 0.0 if value is None else value} if mode == "constant" else {}
    return jnp.pad(x, pairs, mode=_PAD_MODES[mode], **kw)[crop]


def _pool_args(x, kernel, stride, padding, n):
    k = _tuple(kernel, n)
    s = _tuple(stride, n) if stride else k
    p = _tuple(padding, n)
    lead = x.ndim - n
    return (1,) * lead + k, (1,) * lead + s, [(0, 0)] * lead + [(q, q) for q in p]


def _avg_pool(n, x, kernel, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
              divisor_override=None):
    if ceil_mode:
        raise NotImplementedError("aten.avg_pool with ceil_mode=True is outside the translated set")
    window, strides, pads = _pool_args(x, kernel, stride, padding, n)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, pads)
    if divisor_override:
        return total / divisor_override
    if count_include_pad:
        return total / math.prod(window)
    count = jax.lax.reduce_window(jnp.ones_like(x), 0.0, jax.lax.add, window, strides, pads)
    return total / count


def _max_pool(n, x, kernel, stride=None, padding=0, dilation=1, ceil_mode=False):
    if ceil_mode or any(d != 1 for d in _tuple(dilation, n)):
        raise NotImplementedError("aten.max_pool with ceil_mode or dilation is outside the translated set")
    window, strides, pads = _pool_args(x, kernel, stride, padding, n)
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, strides, pads)


for _n in (1, 2, 3):
    OPS[getattr(aten, f"avg_pool{_n}d").default] = functools.partial(_avg_pool, _n)
    OPS[getattr(aten, f"max_pool{_n}d").default] = functools.partial(_max_pool, _n)


@register(aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool3d.default)
def _adaptive_avg_pool(x, output_size):
    out = _tuple(output_size, len(output_size) if isinstance(output_size, Sequence) else 1)
    n = len(out)
    sizes = x.shape[x.ndim - n:]
    if any(s % o for s, o in zip(sizes, out)):
        raise NotImplementedError(f"aten.adaptive_avg_pool with input {sizes} not divisible by output {out} is "
                                  "outside the translated set")
    lead = x.shape[:x.ndim - n]
    shape = lead + sum(((o, s // o) for s, o in zip(sizes, out)), ())
    return x.reshape(shape).mean(tuple(len(lead) + 2 * i + 1 for i in range(n)))


@register(aten.cdist.default, aten._cdist_forward.default)
def _cdist(x1, x2, p=2.0, compute_mode=None):
    diff = x1[..., :, None, :] - x2[..., None, :, :]
    if p == 2.0:
        return jnp.sqrt(jnp.sum(diff * diff, -1))
    return jnp.sum(jnp.abs(diff) ** p, -1) ** (1.0 / p)
