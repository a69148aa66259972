"""Multi-head attention: :func:`attention` (masks, GQA, dropout, weights) and :class:`MultiHeadAttention`.

:func:`attention` takes the fast path (``scaled_dot_product_attention``, whose fused kernels
:mod:`.attention_kernel` gives the vmap batching rules torch lacks) unless per-head weights, a
head mask or keyed dropout are asked for; then it computes the softmax explicitly. Rows whose
keys are all masked give zeros (and zero weights), not NaN, on both paths.

>>> import torch
>>> from polymodal.core import random as pr
>>> mha = MultiHeadAttention(dim_q=16, num_heads=4, is_causal=True)
>>> p = mha.init(key=pr.key(0))
>>> out = mha(p, torch.randn(2, 5, 16), use_cache=True)
>>> out.output.shape, out.cache["k"].shape
(torch.Size([2, 5, 16]), torch.Size([2, 4, 5, 4]))
>>> step = mha(p, torch.randn(2, 1, 16), cache=out.cache)  # one more token, KV cache appended
>>> step.cache["k"].shape
torch.Size([2, 4, 6, 4])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import random as pr
from ..pytree import Params
from ..spec import Spec, check_floating, check_sizes
from .attention_kernel import repeat_kv, sdpa
from .init import initializer
from .linear_kernel import linear

__all__ = ["attention", "split_heads", "merge_heads", "MultiHeadAttention", "AttentionOutput"]

_NEG_INF = float("-inf")


def split_heads(x: Tensor, n: int) -> Tensor:
    """``(B, T, n * Dh) -> (B, n, T, Dh)`` (any leading shape: ``(..., T, n * Dh) -> (..., n, T, Dh)``)."""
    if x.shape[-1] % n:
        raise ValueError(f"split_heads: last axis {x.shape[-1]} is not divisible by {n} heads (shape {tuple(x.shape)})")
    return x.unflatten(-1, (n, x.shape[-1] // n)).transpose(-3, -2)


def merge_heads(x: Tensor) -> Tensor:
    """``(B, n, T, Dh) -> (B, T, n * Dh)``, the inverse of :func:`split_heads`."""
    return x.transpose(-3, -2).flatten(-2)


def _combine(mask: Tensor | None, key_padding_mask: Tensor | None, causal: bool, tq: int, tk: int,
             device: torch.device) -> Tensor | None:
    """One mask from the three sources: bool (True = attend) when all are bool, else additive float."""
    parts = [] if mask is None else [mask]
    if key_padding_mask is not None:
        kpm = key_padding_mask[:, None, None, :]
        parts.append(~kpm if kpm.dtype == torch.bool else kpm)  # True = padding, as torch.nn.MultiheadAttention
    if causal:  # bottom-right aligned: the queries are the last tq of tk positions
        parts.append(torch.ones(tq, tk, dtype=torch.bool, device=device).tril(tk - tq))
    bools = [m for m in parts if m.dtype == torch.bool]
    floats = [m for m in parts if m.dtype != torch.bool]
    b = None
    for m in bools:
        b = m if b is None else b & m
    f = None
    for m in floats:
        f = m if f is None else f + m
    if f is None:
        return b
    return f if b is None else torch.where(b, f, _NEG_INF)


def _math_attention(q: Tensor, k: Tensor, v: Tensor, m: Tensor | None, dropout: float, key: Tensor | None,
                    head_mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    n = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n), repeat_kv(v, n)
    s = (q @ k.transpose(-2, -1)) * scale
    valid = None
    if m is not None:
        if m.dtype == torch.bool:
            valid = m.any(-1, keepdim=True)
            s = s.masked_fill(~m & valid, _NEG_INF)
        else:
            valid = (m > _NEG_INF).any(-1, keepdim=True)
            s = s + torch.where(valid, m, 0.0).to(s.dtype)
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    if valid is not None:
        p = p * valid.to(p.dtype)
    if key is not None and dropout > 0.0:
        p = p * pr.bernoulli(key, 1.0 - dropout, p.shape).to(p.dtype) / (1.0 - dropout)
    if head_mask is not None:
        p = p * (head_mask.reshape(-1, 1, 1) if head_mask.dim() == 1 else head_mask)
    return p @ v, p


def _check_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, mask: Tensor | None,
                     dropout: float) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_floating(t, name, None)
        if t.dim() != 4:
            raise ValueError(f"attention: {name}: expected shape (B, H, T, D), got {tuple(t.shape)}")
    b, h, _, d = q.shape
    if k.shape[0] != b or k.shape[-1] != d or h % max(k.shape[1], 1):
        raise ValueError(f"attention: k: expected shape ({b}, Hkv dividing {h}, Tk, {d}), got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"attention: v: expected shape {tuple(k.shape[:3]) + ('Dv',)}, got {tuple(v.shape)}")
    if key_padding_mask is not None and (key_padding_mask.dim() != 2 or key_padding_mask.shape[-1] != k.shape[2]):
        raise ValueError(f"attention: key_padding_mask: expected shape ({b}, {k.shape[2]}), "
                         f"got {tuple(key_padding_mask.shape)}")
    if mask is not None and not (mask.dtype == torch.bool or mask.is_floating_point()):
        raise TypeError(f"attention: mask: expected a bool or floating mask, got dtype {mask.dtype}")
    if mask is not None:
        target = (b, h, q.shape[2], k.shape[2])
        if mask.dim() > 4 or any(m not in (1, t) for m, t in zip(mask.shape[::-1], target[::-1])):
            raise ValueError(f"attention: mask: expected a shape broadcastable to (B, H, Tq, Tk) = {target}, "
                             f"got {tuple(mask.shape)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"attention: dropout: expected a rate in [0, 1), got {dropout}")


def attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None, key_padding_mask: Tensor | None = None,
              is_causal: bool = False, dropout: float = 0.0, key: Tensor | None = None, need_weights: bool = False,
              head_mask: Tensor | None = None, scale: float | None = None) -> tuple[Tensor, Tensor | None]:
    """Scaled dot-product attention over heads.

    Args:
        q: ``(B, H, Tq, D)``. k: ``(B, Hkv, Tk, D)``; v: ``(B, Hkv, Tk, Dv)``; when ``Hkv < H``
            (it must divide ``H``) each kv head serves ``H // Hkv`` query heads (grouped-query).
        mask: bool (True = attend, as SDPA) or additive float, broadcastable to ``(B, H, Tq, Tk)``.
        key_padding_mask: ``(B, Tk)``, bool with True = padding (as ``torch.nn.MultiheadAttention``)
            or additive float.
        is_causal: query ``i`` sees keys ``j <= i + Tk - Tq`` (bottom-right aligned: the queries are
            the last ``Tq`` positions, as in KV-cache decoding).
        dropout, key: dropout rate on the probabilities, applied only when ``key`` is given.
        need_weights: also return the probabilities ``(B, H, Tq, Tk)`` (after dropout and head mask).
        head_mask: multiplies the probabilities; ``(H,)`` or broadcastable to ``(B, H, Tq, Tk)``.
        scale: logit scale, default ``1 / sqrt(D)``.

    Returns:
        ``(out (B, H, Tq, Dv), weights or None)``; rows with every key masked are zeros.

    >>> q = torch.randn(2, 4, 3, 8); kv = torch.randn(2, 2, 6, 8)
    >>> out, w = attention(q, kv, kv, is_causal=True, need_weights=True)
    >>> out.shape, w.shape, bool(w[0, 0, 0, 5] == 0)
    (torch.Size([2, 4, 3, 8]), torch.Size([2, 4, 3, 6]), True)
    """
    _check_attention(q, k, v, key_padding_mask, mask, dropout)
    tq, tk = q.shape[2], k.shape[2]
    math_path = need_weights or head_mask is not None or (key is not None and dropout > 0.0)
    if not math_path and is_causal and tq == tk and mask is None and key_padding_mask is None:
        return sdpa(q, k, v, None, True, scale), None
    m = _combine(mask, key_padding_mask, is_causal, tq, tk, q.device)
    if not math_path:
        return sdpa(q, k, v, m, False, scale), None
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out, p = _math_attention(q, k, v, m, dropout, key, head_mask, scale)
    return out, (p if need_weights else None)


def _add(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


class AttentionOutput(NamedTuple):
    """``output (B, T, dim_q)``; ``weights (B, H, T, S)`` per head when asked; ``cache {"k", "v"}``."""

    output: Tensor
    weights: Tensor | None = None
    cache: Params | None = None


@dataclass(frozen=True)
class MultiHeadAttention(Spec):
    """Multi-head (self- or cross-) attention with projections and an explicit KV cache.

    Params, fused (``fused_qkv``, ``dim_kv`` equal to ``dim_q``, no GQA): ``in_proj_weight
    (3 * H * Dh, dim_q)``, ``in_proj_bias``, ``out_proj {weight, bias}``: the names of
    ``torch.nn.MultiheadAttention``, whose state dict loads as is. Otherwise ``q_proj``,
    ``k_proj``, ``v_proj``, ``out_proj``, each ``{weight, bias}``.

    Call ``mha(params, x, kv=None, *, attn_mask, key_padding_mask, is_causal, cache, use_cache,
    need_weights, head_mask, key) -> AttentionOutput(output, weights, cache)``:

    * ``x (B, T, dim_q)`` (or unbatched ``(T, dim_q)``, e.g. under vmap: then every other input
      and output drops its batch axis too); ``kv (B, S, dim_kv)`` makes it cross-attention.
    * ``attn_mask``: bool with True = attend (SDPA's convention, the opposite of
      ``nn.MultiheadAttention``'s) or additive float, broadcastable to ``(B, H, T, S)``.
      ``key_padding_mask (B, S)``: True = padding (as ``nn.MultiheadAttention``). With a
      self-attention cache, ``S`` counts cached plus new positions.
    * ``is_causal``: None uses the field; causal masks are bottom-right aligned, so new tokens fed
      with a cache see every cached position.
    * ``cache``: None or ``{"k": (B, Hkv, S, Dh), "v": ...}``. Self-attention appends the new
      keys/values; cross-attention reuses the cached ones (``kv`` may then be None: caches made by
      a cross-attention call carry a zero-size ``"static": (B, 0)`` leaf that marks them). The
      cache is returned when one was given or ``use_cache=True``.
    * ``need_weights``: per-head probabilities ``(B, H, T, S)``; ``key``: dropout key (None: no dropout).
    * ``query_pos`` / ``key_pos``: position embeddings added to the inputs of the query / key
      projections only (values see ``x`` / ``kv`` as they are), as DETR's ``with_pos_embed``;
      broadcastable to ``x`` / ``kv``. ``key_pos`` of self-attention with a cache covers the new positions.

    >>> import torch
    >>> from polymodal.core import random as pr
    >>> mha = MultiHeadAttention(dim_q=16, num_heads=4, dim_kv=12)
    >>> p = mha.init(key=pr.key(0))
    >>> mha(p, torch.randn(2, 5, 16), torch.randn(2, 7, 12), need_weights=True).weights.shape
    torch.Size([2, 4, 5, 7])
    """

    dim_q: int  # width of x and of the output
    num_heads: int  # query heads H
    dim_kv: int | None = None  # width of kv for cross-attention (None: dim_q)
    num_kv_heads: int | None = None  # key/value heads Hkv dividing H, grouped-query attention (None: H)
    head_dim: int | None = None  # per-head width Dh (None: dim_q // num_heads)
    fused_qkv: bool = True  # one in_proj_weight (nn.MultiheadAttention's layout) when dim_kv == dim_q and no GQA
    bias: bool = True  # biases of the q/k/v projections
    out_bias: bool = True  # bias of the output projection
    dropout: float = 0.0  # dropout on attention probabilities (applied when a call key is given)
    is_causal: bool = False  # causal self-attention unless a call says otherwise
    weight_init: str = "torch"  # "torch": nn.MultiheadAttention's (xavier in-proj, zero biases); else a core.layers.init name
    init_std: float = 0.02  # std of the normal-family inits

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_sizes(self, dim_q=self.dim_q, num_heads=self.num_heads)
        if self.num_heads < 1 or (self.head_dim is None and self.dim_q % self.num_heads):
            raise ValueError(f"{name}: dim_q ({self.dim_q}) must be divisible by num_heads ({self.num_heads}) "
                             "unless head_dim is given")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"{name}: num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{name}: dropout: expected a rate in [0, 1), got {self.dropout}")

    @property
    def kv_dim(self) -> int:
        return self.dim_q if self.dim_kv is None else self.dim_kv

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def dh(self) -> int:
        return self.dim_q // self.num_heads if self.head_dim is None else self.head_dim

    @property
    def fused(self) -> bool:
        return self.fused_qkv and self.kv_dim == self.dim_q and self.kv_heads == self.num_heads

    def _weight(self, key: Tensor, out_f: int, in_f: int, torch_init: str) -> Tensor:
        name = torch_init if self.weight_init == "torch" else self.weight_init
        return initializer(name)(key, (out_f, in_f), fan_in=in_f, fan_out=out_f, std=self.init_std)

    def init(self, *, key: Tensor) -> Params:
        kq, kk, kv, ko = pr.split(key, 4)
        inner, kv_inner = self.num_heads * self.dh, self.kv_heads * self.dh
        if self.fused:
            p: Params = {"in_proj_weight": self._weight(kq, 3 * inner, self.dim_q, "xavier_uniform")}
            if self.bias:
                p["in_proj_bias"] = torch.zeros(3 * inner)
        else:
            p = {}
            for name, k, out_f, in_f in (("q_proj", kq, inner, self.dim_q), ("k_proj", kk, kv_inner, self.kv_dim),
                                         ("v_proj", kv, kv_inner, self.kv_dim)):
                p[name] = {"weight": self._weight(k, out_f, in_f, "xavier_uniform")}
                if self.bias:
                    p[name]["bias"] = torch.zeros(out_f)
        p["out_proj"] = {"weight": self._weight(ko, self.dim_q, inner, "uniform_fan_in")}
        if self.out_bias:
            p["out_proj"]["bias"] = torch.zeros(self.dim_q)
        return p

    def _project_q(self, params: Params, x: Tensor) -> Tensor:
        if self.fused:
            n = self.num_heads * self.dh
            b = params.get("in_proj_bias")
            return F.linear(x, params["in_proj_weight"][:n], None if b is None else b[:n])
        return F.linear(x, params["q_proj"]["weight"], params["q_proj"].get("bias"))

    def _project_kv(self, params: Params, src: Tensor, key_src: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Keys from ``key_src`` (default ``src``: one matmul when fused), values from ``src``."""
        if self.fused:
            n = self.num_heads * self.dh
            w, b = params["in_proj_weight"], params.get("in_proj_bias")
            if key_src is None:
                return F.linear(src, w[n:], None if b is None else b[n:]).chunk(2, dim=-1)
            return (F.linear(key_src, w[n:2 * n], None if b is None else b[n:2 * n]),
                    F.linear(src, w[2 * n:], None if b is None else b[2 * n:]))
        k_src = src if key_src is None else key_src
        return (F.linear(k_src, params["k_proj"]["weight"], params["k_proj"].get("bias")),
                F.linear(src, params["v_proj"]["weight"], params["v_proj"].get("bias")))

    def _check(self, x: Tensor, kv: Tensor | None, cache: Params | None, key_padding_mask: Tensor | None,
               self_attn: bool) -> None:
        name = type(self).__name__
        check_floating(x, "x", self)
        if x.dim() not in (2, 3) or x.shape[-1] != self.dim_q:
            want = f"(B, T, {self.dim_q})" if x.dim() != 2 else f"(T, {self.dim_q})"
            raise ValueError(f"{name}: x: expected shape {want}, got {tuple(x.shape)}")
        b = f"{x.shape[0]}, " if x.dim() == 3 else ""  # the batch axis in messages
        if kv is not None:
            check_floating(kv, "kv", self)
            if kv.dim() != x.dim() or kv.shape[-1] != self.kv_dim or kv.shape[:-2] != x.shape[:-2]:
                raise ValueError(f"{name}: kv: expected shape ({b}S, {self.kv_dim}), got {tuple(kv.shape)}")
        elif self_attn and self.kv_dim != self.dim_q:
            raise ValueError(f"{name}: kv is None (self-attention) but dim_kv={self.kv_dim} != dim_q={self.dim_q}; "
                             "pass kv (B, S, dim_kv), or a cross-attention cache")
        if cache is not None:
            if not isinstance(cache, dict) or "k" not in cache or "v" not in cache:
                raise ValueError(f"{name}: cache: expected None or a dict with 'k' and 'v', got {cache!r:.80}")
            for part in ("k", "v"):
                t = cache[part]
                if t.dim() != x.dim() + 1 or t.shape[:-2] != x.shape[:-2] + (self.kv_heads,) or t.shape[-1] != self.dh:
                    raise ValueError(f"{name}: cache['{part}']: expected shape ({b}{self.kv_heads}, S, {self.dh}), "
                                     f"got {tuple(t.shape)}")
        if key_padding_mask is not None and (key_padding_mask.dim() != x.dim() - 1
                                             or key_padding_mask.shape[:-1] != x.shape[:-2]):
            raise ValueError(f"{name}: key_padding_mask: expected shape ({b}S), got {tuple(key_padding_mask.shape)}")

    def _check_pos(self, pos: Tensor | None, target: Tensor | None, what: str) -> None:
        if pos is None:
            return
        name = type(self).__name__
        check_floating(pos, what, self)
        if target is None:
            raise ValueError(f"{name}: {what} needs the tensor it is added to (kv is None with a cross-attention cache)")
        try:
            ok = torch.broadcast_shapes(pos.shape, target.shape) == target.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"{name}: {what}: expected a shape broadcastable to {tuple(target.shape)}, "
                             f"got {tuple(pos.shape)}")

    def __call__(self, params: Params, x: Tensor, kv: Tensor | None = None, *, attn_mask: Tensor | None = None,
                 key_padding_mask: Tensor | None = None, is_causal: bool | None = None, cache: Params | None = None,
                 use_cache: bool = False, need_weights: bool = False, head_mask: Tensor | None = None,
                 query_pos: Tensor | None = None, key_pos: Tensor | None = None,
                 key: Tensor | None = None) -> AttentionOutput:
        cross = kv is not None or (cache is not None and "static" in cache)
        self._check(x, kv, cache, key_padding_mask, not cross)
        self._check_pos(query_pos, x, "query_pos")
        self._check_pos(key_pos, kv if cross else x, "key_pos")
        unbatched = x.dim() == 2
        if unbatched:  # one example (e.g. under vmap): add the batch axis, drop it at the end
            x = x[None]
            kv = None if kv is None else kv[None]
            key_padding_mask = None if key_padding_mask is None else key_padding_mask[None]
            cache = None if cache is None else {n: t[None] for n, t in cache.items()}
        positions = query_pos is not None or key_pos is not None
        if not cross and self.fused and not positions:  # self-attention: q, k and v from one matmul
            b = params.get("in_proj_bias")
            qkv = linear(x, params["in_proj_weight"], b).chunk(3, dim=-1)  # oneDNN on CPU inference
            q, k, v = (split_heads(t, self.num_heads) for t in qkv)
            if cache is not None:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        elif cross and cache is not None:
            q = split_heads(self._project_q(params, _add(x, query_pos)), self.num_heads)
            k, v = cache["k"], cache["v"]
        else:  # positions (DETR) are added to the queries' and keys' inputs, never the values'
            src = kv if cross else x
            q = split_heads(self._project_q(params, _add(x, query_pos)), self.num_heads)
            key_src = None if key_pos is None else src + key_pos
            k, v = (split_heads(t, self.kv_heads) for t in self._project_kv(params, src, key_src))
            if cache is not None:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
        out, weights = attention(
            q, k, v, mask=attn_mask, key_padding_mask=key_padding_mask,
            is_causal=self.is_causal if is_causal is None else is_causal, dropout=self.dropout, key=key,
            need_weights=need_weights, head_mask=head_mask,
        )
        out_p = params["out_proj"]
        y = linear(merge_heads(out), out_p["weight"], out_p.get("bias"))
        new_cache = None
        if cache is not None or use_cache:
            new_cache = {"k": k, "v": v}
            if cross:
                new_cache["static"] = k.new_zeros((k.shape[0], 0))
        if unbatched:
            y = y[0]
            weights = None if weights is None else weights[0]
            new_cache = None if new_cache is None else {n: t[0] for n, t in new_cache.items()}
        return AttentionOutput(y, weights, new_cache)
