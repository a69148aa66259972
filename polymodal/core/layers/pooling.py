"""Pooling over a sequence: class token, mask-aware mean, end-of-text, learned-query attention poolers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import random as pr
from ..pytree import Params
from ..spec import Spec, check_floating, check_ndim
from .attention import MultiHeadAttention
from .norm import LayerNorm

__all__ = ["cls_pool", "mean_pool", "eot_pool", "AttentionPooler", "CascadedAttentionPooler"]


def cls_pool(x: Tensor) -> Tensor:
    """The first token: ``(B, T, D) -> (B, D)`` (``(T, D) -> (D,)`` under vmap)."""
    return x[..., 0, :]


def mean_pool(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over tokens; ``mask (B, T)`` is True for real tokens (padding excluded). Empty rows give 0."""
    if mask is None:
        return x.mean(-2)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(-2) / m.sum(-2).clamp_min(1.0)


def eot_pool(x: Tensor, ids: Tensor, eot_id: int | None = None) -> Tensor:
    """The hidden state at the end-of-text token: ``(B, T, D), ids (B, T) -> (B, D)``.

    With ``eot_id=None`` the position of the largest id is used (CLIP's convention: the
    end-of-text id is the largest in its vocabulary); otherwise the first occurrence of ``eot_id``.
    """
    pos = ids.argmax(-1) if eot_id is None else (ids == eot_id).int().argmax(-1)
    idx = pos[..., None, None].expand(*pos.shape, 1, x.shape[-1])
    return x.gather(-2, idx).squeeze(-2)


@dataclass(frozen=True)
class AttentionPooler(Spec):
    """Pool ``(B, T, input_dim)`` to ``(B, num_queries, output_dim)`` by cross-attention from learned
    queries (Set Transformer / CoCa). Params: ``query``, ``attn``, ``ln_q``, ``ln_k``, ``ln_post``,
    TorchMultimodal's names."""

    input_dim: int  # width of the pooled sequence
    output_dim: int  # width of the queries and of the output
    num_heads: int  # attention heads
    num_queries: int = 256  # learned queries (CoCa: 256 captioning, 1 contrastive)
    layer_norm_eps: float = 1e-5  # eps of the three LayerNorms

    def attn(self) -> MultiHeadAttention:
        return MultiHeadAttention(self.output_dim, self.num_heads, dim_kv=self.input_dim, fused_qkv=False)

    def init(self, *, key: Tensor) -> Params:
        kq, ka = pr.split(key)
        ln = lambda d: LayerNorm(d, self.layer_norm_eps).init(key=key)  # noqa: E731
        return {"query": pr.normal(kq, (self.num_queries, self.output_dim)), "attn": self.attn().init(key=ka),
                "ln_q": ln(self.output_dim), "ln_k": ln(self.input_dim), "ln_post": ln(self.output_dim)}

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        check_floating(x, "x", self)
        check_ndim(x, "x", (2, 3), f"(B, T, {self.input_dim})", self)
        x = LayerNorm(self.input_dim, self.layer_norm_eps)(params["ln_k"], x)
        q = LayerNorm(self.output_dim, self.layer_norm_eps)(params["ln_q"], params["query"])
        q = q.expand(*x.shape[:-2], *q.shape)
        out = self.attn()(params["attn"], q, x).output
        return LayerNorm(self.output_dim, self.layer_norm_eps)(params["ln_post"], out)


@dataclass(frozen=True)
class CascadedAttentionPooler(Spec):
    """Poolers applied in sequence, each on the previous one's output; returns every output (CoCa)."""

    poolers: tuple[AttentionPooler, ...]  # e.g. (captioning 256 queries, contrastive 1 query)

    def init(self, *, key: Tensor) -> Params:
        keys = pr.split(key, len(self.poolers))
        return {"poolers": [p.init(key=k) for p, k in zip(self.poolers, keys)]}

    def __call__(self, params: Params, x: Tensor) -> list[Tensor]:
        outs = []
        for spec, p in zip(self.poolers, params["poolers"]):
            x = spec(p, x)
            outs.append(x)
        return outs
