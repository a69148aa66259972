"""Transformer encoder and decoder layers (pre- or post-norm), the blocks of :mod:`.transformer`'s stacks.

Param names follow ``torch.nn.TransformerEncoderLayer`` / ``TransformerDecoderLayer``
(``self_attn``, ``multihead_attn``, ``linear1``, ``linear2``, ``norm1..3``), so their state dicts
load as they are. Both layers share one body: self-attention (causal or not; DETR's ``pos`` added
to queries and keys), optional cross-attention to ``memory`` (``multihead_attn``, ``norm2``; the
feed-forward's norm is then ``norm3``, as in torch's decoder layer), feed-forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import random as pr
from ..pytree import Params
from ..spec import Spec, check_floating, check_last_dim
from .attention import MultiHeadAttention
from .dropout import drop_path, dropout
from .linear import Linear
from .norm import LayerNorm

__all__ = ["TransformerEncoderLayer", "TransformerDecoderLayer"]


def _residual(x: Tensor, branch: Tensor, rate: float, drop: float, keys: list) -> Tensor:
    branch = dropout(branch, drop, key=keys[0])
    return x + drop_path(branch, rate, key=keys[1], batch_dims=max(x.dim() - 2, 0))


@dataclass(frozen=True)
class _LayerBase(Spec):
    d_model: int  # model width D
    num_heads: int  # attention heads
    dim_feedforward: int = 2048  # hidden width of the feed-forward MLP
    dropout: float = 0.0  # dropout on residual branches and inside the feed-forward
    attn_dropout: float = 0.0  # dropout on attention probabilities
    activation: str = "relu"  # feed-forward activation (torch's default relu; ViTs use gelu)
    norm_first: bool = False  # pre-norm (True) or post-norm (False, torch's default)
    layer_norm_eps: float = 1e-5  # eps of every LayerNorm
    fp32_norm: bool = False  # compute layer norms in fp32 (TorchMultimodal's Fp32LayerNorm)
    drop_path: float = 0.0  # stochastic depth rate of both residual branches
    bias: bool = True  # biases in projections and feed-forward
    weight_init: str = "torch"  # init of the Linears
    qkv_bias: bool | None = None  # biases of the self-attention's q/k/v projections (None: bias); False with
    # bias=True is TorchMultimodal's GPT decoder layer (bias-free q/k/v, biased output projection)

    _cross_key: ClassVar[bool] = False  # init splits a cross-attention key even without cross-attention

    def _norm(self) -> LayerNorm:
        return LayerNorm(self.d_model, eps=self.layer_norm_eps, fp32=self.fp32_norm, bias=self.bias)

    def _ff(self) -> tuple[Linear, Linear]:
        gate = 2 if self.activation == "geglu" else 1
        return (
            Linear(self.d_model, self.dim_feedforward * gate, self.bias, self.weight_init),
            Linear(self.dim_feedforward, self.d_model, self.bias, self.weight_init),
        )

    def _feedforward(self, params: Params, x: Tensor, keys: list) -> Tensor:
        l1, l2 = self._ff()
        h = l1(params["linear1"], x, activation=self.activation)  # fused into the GEMM on oneDNN where it can be
        return l2(params["linear2"], dropout(h, self.dropout, key=keys[0]))

    def _sub(self, params: Params, x: Tensor, norm: str, fn, keys: list) -> Tensor:
        """One residual sub-block: pre-norm ``x + f(norm(x))`` or post-norm ``norm(x + f(x))``."""
        if self.norm_first:
            return _residual(x, fn(self._norm()(params[norm], x)), self.drop_path, self.dropout, keys)
        return self._norm()(params[norm], _residual(x, fn(x), self.drop_path, self.dropout, keys))

    def self_attn(self) -> MultiHeadAttention:
        qkv_bias = self.bias if self.qkv_bias is None else self.qkv_bias
        return MultiHeadAttention(self.d_model, self.num_heads, bias=qkv_bias, dropout=self.attn_dropout,
                                  is_causal=self.is_causal, weight_init=self.weight_init)

    def cross_attn(self) -> MultiHeadAttention:
        fused = self.dim_kv is None or self.dim_kv == self.d_model
        return MultiHeadAttention(self.d_model, self.num_heads, dim_kv=self.dim_kv, fused_qkv=fused, bias=self.bias,
                                  dropout=self.attn_dropout, weight_init=self.weight_init)

    def init(self, *, key: Tensor) -> Params:
        """``self_attn``, [``multihead_attn``], ``linear1``, ``linear2``, ``norm1``, ``norm2``, [``norm3``]:
        torch's decoder-layer names (with cross-attention ``norm2`` is its norm and ``norm3`` the feed-forward's)."""
        if self.cross_attention or self._cross_key:
            ka, kc, k1, k2 = pr.split(key, 4)
        else:  # the encoder layer's split before it could cross-attend: same seed, same params
            (ka, k1, k2), kc = pr.split(key, 3), None
        l1, l2 = self._ff()
        n = self._norm()
        p = {"self_attn": self.self_attn().init(key=ka)}
        if self.cross_attention:
            p["multihead_attn"] = self.cross_attn().init(key=kc)
        p |= {"linear1": l1.init(key=k1), "linear2": l2.init(key=k2), "norm1": n.init(key=key), "norm2": n.init(key=key)}
        if self.cross_attention:
            p["norm3"] = n.init(key=key)
        return p

    def _layer(self, params: Params, x: Tensor, memory: Tensor | None, ks: list, *, self_kw: dict, cross_kw: dict,
               cache: Params, keep: bool, need_weights: bool) -> tuple[Tensor, tuple, Params]:
        """Self-attention, [cross-attention], feed-forward; returns ``(y, (self w, cross w), new cache)``."""
        new_cache: Params = {}
        weights = []
        kv = self_kw.pop("kv", None)

        def sa(h: Tensor) -> Tensor:
            out = self.self_attn()(params["self_attn"], h, kv, cache=cache.get("self"),
                                   use_cache=keep, need_weights=need_weights, key=ks[0], **self_kw)
            new_cache["self"] = out.cache
            weights.append(out.weights)
            return out.output

        def ca(h: Tensor) -> Tensor:
            out = self.cross_attn()(params["multihead_attn"], h, memory, cache=cache.get("cross"), use_cache=keep,
                                    need_weights=need_weights, key=ks[1], **cross_kw)
            new_cache["cross"] = out.cache
            weights.append(out.weights)
            return out.output

        x = self._sub(params, x, "norm1", sa, ks[2:4])
        if self.cross_attention:
            x = self._sub(params, x, "norm2", ca, ks[4:6])
        else:
            weights.append(None)
        ff_norm = "norm3" if self.cross_attention else "norm2"
        x = self._sub(params, x, ff_norm, lambda h: self._feedforward(params, h, ks[6:7]), ks[7:9])
        return x, tuple(weights), new_cache


def _select_rows(x: Tensor, select: int | Tensor, causal: bool) -> tuple[Tensor, Tensor | None]:
    """Rows ``select`` of ``x (..., T, D)`` as ``(..., 1, D)`` and, for causal attention, the bool
    mask (True = attend) that lets each selected query see the keys up to its own position."""
    t = x.shape[-2]
    if isinstance(select, int):
        if not -t <= select < t:
            raise ValueError(f"select: expected a position in [0, {t}), got {select}")
        select %= t
        rows = x[..., select:select + 1, :]
        pos = torch.arange(t, device=x.device)
        return rows, ((pos <= select) if causal else None)
    if select.dtype not in (torch.int32, torch.int64) or select.shape != x.shape[:-2]:
        raise ValueError(f"select: expected an int or integer positions of shape {tuple(x.shape[:-2])}, "
                         f"got {select.dtype} {tuple(select.shape)}")
    rows = x.gather(-2, select[..., None, None].expand(*select.shape, 1, x.shape[-1]))
    if not causal:
        return rows, None
    allowed = torch.arange(t, device=x.device) <= select[..., None]  # (..., T)
    return rows, allowed[..., None, None, :]  # broadcasts against (B, H, 1, T)


@dataclass(frozen=True)
class TransformerEncoderLayer(_LayerBase):
    """Self-attention, optional cross-attention to ``memory`` (ALBEF's fusion layers, BLIP-2's Q-Former),
    feed-forward, each residual; ``(B, T, D) -> (B, T, D)`` (or unbatched ``(T, D)``).

    >>> from polymodal.core import random as pr
    >>> layer = TransformerEncoderLayer(8, 2, 16)
    >>> layer(layer.init(key=pr.key(0)), torch.ones(1, 3, 8))[0].shape
    torch.Size([1, 3, 8])
    >>> fusion = TransformerEncoderLayer(8, 2, 16, cross_attention=True, dim_kv=6)
    >>> fusion(fusion.init(key=pr.key(0)), torch.ones(1, 3, 8), torch.ones(1, 5, 6))[0].shape
    torch.Size([1, 3, 8])
    """

    is_causal: bool = False  # causal self-attention (decoder-only stacks such as CLIP's text tower)
    cross_attention: bool = False  # a cross-attention sub-block after self-attention (params multihead_attn, norm3)
    dim_kv: int | None = None  # width of ``memory`` (None: d_model)

    def attn(self) -> MultiHeadAttention:
        return self.self_attn()

    def __call__(self, params: Params, x: Tensor, memory: Tensor | None = None, *, attn_mask: Tensor | None = None,
                 key_padding_mask: Tensor | None = None, memory_mask: Tensor | None = None,
                 memory_key_padding_mask: Tensor | None = None, pos: Tensor | None = None,
                 memory_pos: Tensor | None = None, need_weights: bool = False, key: Tensor | None = None,
                 select: int | Tensor | None = None) -> tuple[Tensor, Any]:
        """Returns ``(y, weights)``: the self-attention weights (or None), or with cross-attention the
        pair ``(self weights, cross weights)``.

        ``memory (B, S, dim_kv)`` with ``memory_mask`` / ``memory_key_padding_mask (B, S)``: what the
        cross-attention reads. ``pos`` is added to the queries and keys of self-attention (not the
        values) and ``memory_pos`` to the keys of cross-attention: DETR's ``forward_post(src, pos)``.

        ``select``: compute the output at one position only (a pooled token: CLIP's class or
        end-of-text token), as an int or a ``(B,)`` tensor of positions; ``y`` is then
        ``(B, 1, D)`` and equals those rows of the full output. Every position still serves as
        a key, but the queries, the feed-forward and their backward shrink to one token.
        """
        check_floating(x, "x", self)
        check_last_dim(x, "x", self.d_model, self)
        if self.cross_attention and memory is None:
            raise ValueError(f"TransformerEncoderLayer: cross_attention=True needs memory (B, S, "
                             f"{self.dim_kv or self.d_model}), got None")
        if memory is not None and not self.cross_attention:
            raise ValueError("TransformerEncoderLayer: memory was given but this layer has no cross-attention "
                             "(cross_attention=False)")
        if self.cross_attention:
            ks = pr.maybe_split(key, 9)
        else:  # the split from before cross-attention existed: same key, same dropout
            k = pr.maybe_split(key, 6)
            ks = [k[0], None, k[1], k[2], None, None, k[3], k[4], k[5]]
        self_kw: dict = {"attn_mask": attn_mask, "key_padding_mask": key_padding_mask}
        if pos is not None:
            self_kw |= {"query_pos": pos, "key_pos": pos}
        if select is not None:
            if attn_mask is not None or pos is not None or memory_mask is not None:
                raise ValueError(f"{type(self).__name__}: select does not combine with attn_mask, memory_mask or "
                                 "pos; use key_padding_mask / is_causal, or select rows of the full output")
            self_kw["kv"] = self._norm()(params["norm1"], x) if self.norm_first else x
            x, self_kw["attn_mask"] = _select_rows(x, select, self.is_causal)
            self_kw["is_causal"] = False
        cross_kw = {"attn_mask": memory_mask, "key_padding_mask": memory_key_padding_mask, "key_pos": memory_pos}
        y, w, _ = self._layer(params, x, memory, ks, self_kw=self_kw, cross_kw=cross_kw, cache={}, keep=False,
                              need_weights=need_weights)
        return y, (w if self.cross_attention else w[0])


@dataclass(frozen=True)
class TransformerDecoderLayer(_LayerBase):
    """Self-attention (causal by default, with KV cache), optional cross-attention to ``memory``, feed-forward.

    >>> from polymodal.core import random as pr
    >>> layer = TransformerDecoderLayer(8, 2, 16, is_causal=False)  # DETR's decoder: queries see each other
    >>> layer(layer.init(key=pr.key(0)), torch.ones(1, 3, 8), torch.ones(1, 5, 8))[0].shape
    torch.Size([1, 3, 8])
    """

    cross_attention: bool = True  # has a cross-attention sub-block
    dim_kv: int | None = None  # width of ``memory`` (None: d_model)
    _cross_key: ClassVar[bool] = True
    is_causal: bool = True  # causal self-attention (False: DETR / MDETR object queries attend to each other)

    def __call__(self, params: Params, x: Tensor, memory: Tensor | None = None, *, attn_mask: Tensor | None = None,
                 key_padding_mask: Tensor | None = None, memory_mask: Tensor | None = None,
                 memory_key_padding_mask: Tensor | None = None, pos: Tensor | None = None,
                 query_pos: Tensor | None = None, cache: Params | None = None, use_cache: bool = False,
                 need_weights: bool = False, key: Tensor | None = None) -> tuple[Tensor, Any, Params | None]:
        """Returns ``(y, (self weights, cross weights), new cache or None)``.

        ``cache`` is ``{"self": {"k", "v"}, "cross": {"k", "v"}}`` (either part may be missing);
        with a cache, ``x`` holds only the new positions. As DETR's ``forward_post(tgt, memory, pos,
        query_pos)``: ``query_pos`` is added to the queries and keys of self-attention and to the
        queries of cross-attention, ``pos`` to the keys of cross-attention (never to values).
        """
        check_floating(x, "x", self)
        check_last_dim(x, "x", self.d_model, self)
        if self.cross_attention and memory is None and (cache is None or "cross" not in cache):
            raise ValueError("TransformerDecoderLayer: cross_attention=True needs memory (B, S, dim_kv) or a cross cache")
        ks = pr.maybe_split(key, 9)
        cache = cache or {}
        keep = use_cache or bool(cache)
        self_kw: dict = {"attn_mask": attn_mask, "key_padding_mask": key_padding_mask}
        if query_pos is not None:
            self_kw |= {"query_pos": query_pos, "key_pos": query_pos}
        cross_kw = {"attn_mask": memory_mask, "key_padding_mask": memory_key_padding_mask, "query_pos": query_pos,
                    "key_pos": pos}
        y, w, new_cache = self._layer(params, x, memory if self.cross_attention else None, ks, self_kw=self_kw,
                                      cross_kw=cross_kw, cache=cache, keep=keep, need_weights=need_weights)
        return y, w, (new_cache if keep else None)
