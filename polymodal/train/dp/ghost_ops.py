"""Recorded ops for the norm-only DP step: per-example gradient norms and clipped sums of
linear, conv and embedding weights from each call's saved input ``A`` and output gradient ``G``.

Every recorded use of a weight has the *linear form* ``M_i = G_i^T A_i`` for example ``i``:

* linear ``(B, *, in) -> (B, *, out)``: ``A (B, T, in)``, ``G (B, T, out)``, ``T`` = the middle axes;
* conv (groups 1): ``A`` = the input's patches ``(B, L, C * prod(kernel))`` (a reshape for
  patchifying convs, ``unfold`` otherwise), ``G (B, L, out)``;
* embedding ``(V, D)``: ``G`` = one-hot ids ``(B, T, V)`` (never built), ``A`` = the output
  gradient ``(B, T, D)`` (zero at ``padding_idx``).

For the calls of one weight (several calls are summed: shared weights), the squared norm is
``||sum_c G_c^T A_c||_F^2 = sum_{c,c'} <A_c A_c'^T, G_c G_c'^T>`` (the *ghost norm*: Gram
matrices ``(B, T, T)``) when ``T^2 < in * out``, else the direct per-example product; embeddings
alone use a per-example segment sum over ids (``O(B T D)``). The clipped sum
``sum_i c_i M_i = (c * G)^T A`` is one matmul from the stored tensors (book-keeping): no second
backward. :class:`Call` holds one record; the autograd functions fill in ``G`` in backward and
return no gradient for the weight (the DP step computes it).

>>> import torch
>>> a, g = torch.randn(4, 7, 5), torch.randn(4, 7, 3)
>>> call = Call("linear", x=a); call.g = g
>>> per_example = torch.einsum("bto,bti->boi", g, a)
>>> bool(torch.allclose(sq_norms([call], 3, 5), per_example.flatten(1).pow(2).sum(1), rtol=1e-4))
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Call", "LinearFn", "ConvFn", "EmbeddingFn", "LayerNormFn", "sq_norms", "clipped_sum", "materialize"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_BLOCK = 64 * 2**20  # elements of a per-example intermediate before we loop over examples


class Call:
    """One recorded use of a weight: the saved input ``x`` and (after backward) output gradient ``g``.

    ``meta`` holds the conv geometry (``dims, kernel, stride, padding, dilation``) or the
    embedding's ``(num_embeddings, padding_idx)``. ``gb`` is the per-example bias gradient
    ``(B, out)`` when the op had a recorded bias.
    """

    __slots__ = ("kind", "x", "g", "meta", "gb", "gw")

    def __init__(self, kind: str, x: Tensor, meta: Any = None) -> None:
        self.kind, self.x, self.meta = kind, x, meta
        self.g: Tensor | None = None
        self.gb: Tensor | None = None
        self.gw: Tensor | None = None

    @property
    def batch(self) -> int:
        return self.x.shape[0]

    def a(self) -> Tensor:
        """``(B, T, d_in)``: the activation side of the linear form."""
        if self.kind == "linear":
            return self.x.reshape(self.batch, -1, self.x.shape[-1])
        if self.kind == "embedding":
            g = self.g.reshape(self.batch, -1, self.g.shape[-1])
            pad = self.meta[1]
            return g if pad is None else g * (self.ids() != pad).unsqueeze(-1).to(g.dtype)
        return _patches(self.x, *self.meta)

    def gmat(self) -> Tensor:
        """``(B, T, d_out)``: the gradient side (dense kinds only)."""
        if self.kind == "linear":
            return self.g.reshape(self.batch, -1, self.g.shape[-1])
        return self.g.flatten(2).transpose(1, 2)  # conv: (B, out, *L) -> (B, L, out)

    def ids(self) -> Tensor:
        return self.x.reshape(self.batch, -1)


def _patches(x: Tensor, dims: int, kernel: tuple, stride: tuple, padding: tuple, dilation: tuple) -> Tensor:
    """``(B, L, C * prod(kernel))`` patches in the order of ``weight.reshape(out, -1)`` and of ``G``'s ``L``."""
    b, c = x.shape[:2]
    if stride == kernel and not any(padding) and all(d == 1 for d in dilation):
        grid = [s // k for s, k in zip(x.shape[2:], kernel)]
        x = x[(slice(None), slice(None)) + tuple(slice(0, g * k) for g, k in zip(grid, kernel))]
        shape = [b, c] + [v for g, k in zip(grid, kernel) for v in (g, k)]
        perm = [0] + [2 + 2 * i for i in range(dims)] + [1] + [3 + 2 * i for i in range(dims)]
        return x.reshape(shape).permute(perm).reshape(b, math.prod(grid), c * math.prod(kernel))
    if dims == 1:
        x, kernel, stride, padding, dilation = (x.unsqueeze(2), (1,) + kernel, (1,) + stride, (0,) + padding,
                                                (1,) + dilation)
    return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)


def _float(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _gram_g(c: Call, gc: Tensor | None, d: Call, gd: Tensor | None) -> Tensor:
    """``G_c G_d^T`` per example ``(B, Tc, Td)`` (``gc``/``gd``: dense ``G`` or None for an embedding,
    whose ``G`` is one-hot ids)."""
    if gc is None and gd is None:
        return (c.ids().unsqueeze(2) == d.ids().unsqueeze(1)).to(c.g.dtype)
    if gd is None:
        ids = d.ids()
        return gc.gather(2, ids.unsqueeze(1).expand(-1, gc.shape[1], -1))
    if gc is None:
        return _gram_g(d, gd, c, gc).transpose(1, 2)
    return torch.bmm(gc, gd.transpose(1, 2))


def _gram_a(c: Call, ac: Tensor, d: Call, ad: Tensor, cache: dict | None) -> Tensor:
    """``A_c A_d^T`` ``(B, Tc, Td)``, shared through ``cache`` between calls that read the same input."""
    if c is d and cache is not None and c.kind == "linear":
        if id(c.x) not in cache:
            cache[id(c.x)] = torch.bmm(ac, ac.transpose(1, 2))
        return cache[id(c.x)]
    return torch.bmm(ac, ad.transpose(1, 2))


def _length(c: Call) -> int:
    """``T`` of the call's linear form, from shapes only."""
    if c.kind == "linear":
        return math.prod(c.x.shape[1:-1])
    return math.prod(c.x.shape[1:]) if c.kind == "embedding" else math.prod(c.g.shape[2:])


def _examples_per_block(size_per_example: int, b: int) -> int:
    return max(1, min(b, _BLOCK // max(size_per_example, 1)))


def materialize(calls: Sequence[Call], d_out: int, d_in: int, start: int = 0, stop: int | None = None) -> Tensor:
    """Per-example ``sum_c M_c`` for examples ``[start, stop)``: ``(b, d_out, d_in)``."""
    stop = calls[0].batch if stop is None else stop
    out = None
    for c in calls:
        a = c.a()[start:stop]
        if c.kind == "embedding":
            b = stop - start
            rows = (torch.arange(b, device=a.device).unsqueeze(1) * d_out + c.ids()[start:stop]).reshape(-1)
            m = a.new_zeros(b * d_out, d_in).index_add_(0, rows, a.reshape(-1, d_in)).reshape(b, d_out, d_in)
        else:
            m = torch.bmm(c.gmat()[start:stop].transpose(1, 2), a)
        out = m if out is None else out + m
    return out


def sq_norms(calls: Sequence[Call], d_out: int, d_in: int, cache: dict | None = None) -> Tensor:
    """Squared Frobenius norms ``(B,)`` of the per-example ``sum_c G_c^T A_c`` (see the module doc).

    ``cache`` (``id(x) -> A A^T``) shares the input Gram between calls that read the same tensor."""
    b = calls[0].batch
    t = sum(_length(c) for c in calls)
    if all(c.kind == "embedding" for c in calls):
        ids = torch.cat([c.ids() for c in calls], 1)
        g = _float(torch.cat([c.a() for c in calls], 1))
        keys = (torch.arange(b, device=ids.device).unsqueeze(1) * d_out + ids).reshape(-1)
        uniq, inv = torch.unique(keys, return_inverse=True)
        agg = g.new_zeros(uniq.shape[0], d_in).index_add_(0, inv, g.reshape(-1, d_in))
        return g.new_zeros(b).index_add_(0, torch.div(uniq, d_out, rounding_mode="floor"), agg.pow(2).sum(1))
    if t * t < d_out * d_in:  # ghost norm: Gram matrices of both sides
        a = [c.a() for c in calls]
        g = [None if c.kind == "embedding" else c.gmat() for c in calls]
        total = None
        for i, c in enumerate(calls):
            for j in range(i, len(calls)):
                gram_g = _gram_g(c, g[i], calls[j], g[j])
                s = (_float(_gram_a(c, a[i], calls[j], a[j], cache)) * _float(gram_g)).sum((1, 2))
                s = s if i == j else 2 * s
                total = s if total is None else total + s
        return total
    step = _examples_per_block(d_out * d_in, b)
    return torch.cat([_float(materialize(calls, d_out, d_in, s, min(b, s + step))).pow(2).sum((1, 2))
                      for s in range(0, b, step)])


def clipped_sum(calls: Sequence[Call], factors: Tensor, d_out: int, d_in: int, cache: dict | None = None,
                drop: Tensor | None = None) -> Tensor:
    """Book-keeping: ``sum_i factors_i * sum_c G_{c,i}^T A_{c,i}`` as ``(d_out, d_in)``, one matmul per call.

    The factors scale the narrower of ``A``/``G``; ``cache`` (``id(x) -> c * A``) shares a scaled
    input between calls that read the same tensor (``in_proj_weight[:n]`` and ``[n:]``).
    ``drop`` ``(B,)`` bool: examples left out entirely, their rows of ``A`` and ``G`` zeroed first
    (a zero factor alone would give ``0 * inf = nan`` for an example with a non-finite gradient)."""
    keep = None if drop is None else ~drop.reshape(-1, 1, 1)

    def rows(t: Tensor) -> Tensor:
        return t if keep is None else torch.where(keep, t, t.new_zeros(()))

    out = None
    for c in calls:
        w = factors.to(c.x.dtype if c.x.is_floating_point() else c.g.dtype).reshape(-1, 1, 1)
        if c.kind == "embedding":
            a = rows(c.a())
            m = a.new_zeros(d_out, d_in).index_add_(0, c.ids().reshape(-1), (a * w).reshape(-1, d_in))
        else:
            g = rows(c.gmat())
            if g.shape[-1] < d_in:
                a = rows(c.a())
                g = g * w
            elif cache is not None and c.kind == "linear" and id(c.x) in cache:
                a = cache[id(c.x)]
            else:
                a = rows(c.a()) * w
                if cache is not None and c.kind == "linear":
                    cache[id(c.x)] = a
            m = g.reshape(-1, d_out).T @ a.reshape(-1, d_in)
        out = m if out is None else out + m
    return out


def _reduce(t: Tensor, keep_last: int) -> Tensor:
    """Sum over the middle axes: ``(B, *mid, *last) -> (B, *last)``.

    One ``ones @ t_i`` (gemv) per example: on CPU several times faster than ``t.sum(1)``."""
    if t.dim() - keep_last <= 1:
        return t
    last = tuple(t.shape[t.dim() - keep_last:])
    t3 = t.reshape(t.shape[0], -1, math.prod(last))
    ones = t3.new_ones(t3.shape[1])
    return torch.stack([ones @ ti for ti in t3]).reshape((t.shape[0],) + last)


# --- autograd functions: forward as usual, backward records G and returns no weight gradient --


class LinearFn(torch.autograd.Function):
    """``F.linear(x, w, b)`` that records ``G`` (and the per-example bias gradient) in backward."""

    @staticmethod
    def forward(ctx, anchor, x, w, b, call, want_gb):
        ctx.save_for_backward(w)
        ctx.call, ctx.want_gb, ctx.zero = call, want_gb, anchor.new_zeros(0)
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        ctx.call.g = g
        if ctx.want_gb:
            ctx.call.gb = _reduce(g, 1)
        gx = g @ w if ctx.needs_input_grad[1] else None
        return ctx.zero, gx, None, None, None, None


class ConvFn(torch.autograd.Function):
    """Convolution (groups 1) that records ``G`` in backward; ``call.meta`` holds its geometry."""

    @staticmethod
    def forward(ctx, anchor, x, w, b, call, want_gb):
        dims, _, stride, padding, dilation = call.meta
        ctx.save_for_backward(x, w)
        ctx.call, ctx.want_gb, ctx.zero = call, want_gb, anchor.new_zeros(0)
        return _CONV[dims](x, w, b, stride, padding, dilation, 1)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        dims, _, stride, padding, dilation = ctx.call.meta
        ctx.call.g = g
        if ctx.want_gb:
            ctx.call.gb = g.flatten(2).sum(2)
        gx = None
        if ctx.needs_input_grad[1]:
            gx = torch.ops.aten.convolution_backward(g, x, w, None, list(stride), list(padding), list(dilation), False,
                                                     [0] * dims, 1, [True, False, False])[0]
        return ctx.zero, gx, None, None, None, None


class EmbeddingFn(torch.autograd.Function):
    """``F.embedding(ids, w, padding_idx)`` that records ``G`` in backward."""

    @staticmethod
    def forward(ctx, anchor, ids, w, call):
        ctx.call, ctx.zero = call, anchor.new_zeros(0)
        return F.embedding(ids, w, call.meta[1])

    @staticmethod
    def backward(ctx, g):
        ctx.call.g = g
        return ctx.zero, None, None, None


class LayerNormFn(torch.autograd.Function):
    """``F.layer_norm`` that stores per-example affine gradients ``call.gw``/``call.gb`` ``(B, *shape)``."""

    @staticmethod
    def forward(ctx, anchor, x, w, b, call, shape, eps):
        y, mean, rstd = torch.ops.aten.native_layer_norm(x, list(shape), w, b, eps)
        ctx.save_for_backward(x, mean, rstd, w, b)
        ctx.call, ctx.shape, ctx.zero = call, list(shape), anchor.new_zeros(0)
        return y

    @staticmethod
    def backward(ctx, g):
        x, mean, rstd, w, b = ctx.saved_tensors
        k = len(ctx.shape)
        if w is not None:
            ctx.call.gw = _reduce(g * ((x - mean) * rstd), k)
        if b is not None:
            ctx.call.gb = _reduce(g, k)
        gx = None
        if ctx.needs_input_grad[1]:
            gx = torch.ops.aten.native_layer_norm_backward(g, x, ctx.shape, mean, rstd, w, b, [True, False, False])[0]
        return ctx.zero, gx, None, None, None, None, None
