"""Unpadded ("packed") BERT blocks: the token-wise work of a layer only on the real tokens.

With ragged padding most of a BERT layer's time goes into token-wise matmuls (the q/k/v and output
projections, the feed-forward) and LayerNorms, all of which ``transformers`` runs on every padded
position too. Here the real tokens of a ``(B, T, D)`` batch are packed into ``(N, D)``
(``N = attention_mask.sum()``); each layer runs its projections, feed-forward, residuals and norms
on ``(N, D)`` and scatters ``q``, ``k``, ``v`` back to ``(B, H, T, Dh)`` only for the attention
itself (SDPA with the key-padding mask, exactly as the padded path). Outputs at real positions
equal the padded computation's (up to float rounding of matmuls of a different row count); outputs
at padded positions are **zeros** (Hugging Face computes them: pad queries attending to the real
keys). :class:`~polymodal.core.encoders.bert.BERTTextEncoder` takes this path when built with
``unpad=True`` and given a mask.

Shapes are data dependent (``N``): eager and ``torch.compile`` with
``torch._dynamo.config.capture_dynamic_output_shape_ops = True`` work; ``vmap`` does not (use the
padded path for per-sample gradients).

>>> import torch
>>> valid = torch.tensor([[True, True, False], [True, False, False]])
>>> idx = pack_index(valid)
>>> idx.tolist()
[0, 1, 3]
>>> unpack(torch.tensor([[1.0], [2.0], [3.0]]), idx, 2, 3)[..., 0].tolist()
[[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]]
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import random as pr
from ..layers.activation import activation as get_activation
from ..layers.attention import attention, merge_heads, split_heads
from ..layers.dropout import dropout
from ..layers.norm import LayerNorm
from ..layers.seam import run_layers
from ..layers.transformer import TransformerEncoder, TransformerEncoderLayer
from ..pytree import Params

__all__ = ["pack_index", "unpack", "packed_layer", "packed_encoder"]


def pack_index(valid: Tensor) -> Tensor:
    """``valid (B, T)`` bool -> ``(N,)`` flat indices (into ``B * T``) of the real tokens, row-major."""
    return valid.flatten().nonzero().squeeze(-1)


def unpack(x: Tensor, idx: Tensor, b: int, t: int) -> Tensor:
    """``x (N, ...)`` at flat positions ``idx`` -> ``(B, T, ...)`` with zeros elsewhere."""
    return x.new_zeros((b * t,) + x.shape[1:]).index_copy(0, idx, x).unflatten(0, (b, t))


def _qkv(p: Params, x: Tensor) -> Tensor:
    if "in_proj_weight" in p:
        return F.linear(x, p["in_proj_weight"], p.get("in_proj_bias"))
    return torch.cat([F.linear(x, p[n]["weight"], p[n].get("bias")) for n in ("q_proj", "k_proj", "v_proj")], -1)


def packed_layer(layer: TransformerEncoderLayer, params: Params, x: Tensor, idx: Tensor, shape: tuple[int, int],
                 key_padding_mask: Tensor, memory: Tensor | None = None, memory_key_padding_mask: Tensor | None = None,
                 *, need_weights: bool = False, key: Tensor | None = None) -> tuple[Tensor, Any]:
    """One encoder layer on packed tokens ``x (N, D)`` (positions ``idx`` of a ``shape = (B, T)`` batch,
    ``key_padding_mask (B, T)`` True = padding); returns ``(y (N, D), weights)`` as the layer's call
    (``weights``: self ``(B, H, T, T)``, or ``(self, cross)`` when the layer cross-attends)."""
    if layer.drop_path:
        raise ValueError("packed_layer: drop_path is per example and has no packed form; use the padded path")
    b, t = shape
    norm = LayerNorm(layer.d_model, eps=layer.layer_norm_eps, fp32=layer.fp32_norm, bias=layer.bias)
    if layer.cross_attention:
        ks = pr.maybe_split(key, 9)
    else:  # the layer's own key layout (transformer_layer.TransformerEncoderLayer.__call__)
        k = pr.maybe_split(key, 6)
        ks = [k[0], None, k[1], k[2], None, None, k[3], k[4], k[5]]
    weights: list[Tensor | None] = []

    def sub(h: Tensor, name: str, fn, keys: list) -> Tensor:  # pre- or post-norm residual sub-block
        if layer.norm_first:
            return h + dropout(fn(norm(params[name], h)), layer.dropout, key=keys[0])
        return norm(params[name], h + dropout(fn(h), layer.dropout, key=keys[0]))

    def self_attention(h: Tensor) -> Tensor:
        sa, p = layer.self_attn(), params["self_attn"]
        q, k_, v = (split_heads(z, sa.num_heads) for z in unpack(_qkv(p, h), idx, b, t).chunk(3, dim=-1))
        out, w = attention(q, k_, v, key_padding_mask=key_padding_mask, is_causal=sa.is_causal, dropout=sa.dropout,
                           key=ks[0], need_weights=need_weights)
        weights.append(w)
        o = merge_heads(out).flatten(0, 1).index_select(0, idx)
        return F.linear(o, p["out_proj"]["weight"], p["out_proj"].get("bias"))

    def cross_attention(h: Tensor) -> Tensor:
        out = layer.cross_attn()(params["multihead_attn"], unpack(h, idx, b, t), memory,
                                 key_padding_mask=memory_key_padding_mask, need_weights=need_weights, key=ks[1])
        weights.append(out.weights)
        return out.output.flatten(0, 1).index_select(0, idx)

    def feedforward(h: Tensor) -> Tensor:
        h = get_activation(layer.activation)(F.linear(h, params["linear1"]["weight"], params["linear1"].get("bias")))
        h = dropout(h, layer.dropout, key=ks[6])
        return F.linear(h, params["linear2"]["weight"], params["linear2"].get("bias"))

    x = sub(x, "norm1", self_attention, ks[2:4])
    if layer.cross_attention:
        x = sub(x, "norm2", cross_attention, ks[4:6])
    x = sub(x, "norm3" if layer.cross_attention else "norm2", feedforward, ks[7:9])
    return x, (tuple(weights) if layer.cross_attention else weights[0])


def packed_encoder(stack: TransformerEncoder, params: Params, x: Tensor, valid: Tensor, memory: Tensor | None = None,
                   memory_key_padding_mask: Tensor | None = None, *, key: Tensor | None = None,
                   return_hidden_states: bool = False, return_attention_weights: bool = False
                   ) -> tuple[Tensor, tuple[Tensor, ...] | None, tuple | None, tuple | None]:
    """``stack`` over the real tokens of ``x (B, T, D)`` (``valid (B, T)`` True = real), through ``run_layers``.

    Returns ``(last (B, T, D), hidden_states, attentions, cross_attentions)`` as
    :class:`~polymodal.core.layers.transformer.TransformerOutput`'s fields, zeros at padded positions."""
    if stack.final_norm:
        raise ValueError("packed_encoder: a stack with final_norm has no packed form here; use the padded path")
    b, t = valid.shape
    idx = pack_index(valid)
    kpm = ~valid

    def block(i, p, h, k, _):
        layer = stack.layer_at(i)
        y, w = packed_layer(layer, p, h, idx, (b, t), kpm, memory if layer.cross_attention else None,
                            memory_key_padding_mask, need_weights=return_attention_weights, key=k)
        return y, (unpack(y, idx, b, t) if return_hidden_states else None,
                   w if layer.cross_attention else (w, None))

    packed, auxs = run_layers(block, params["layers"], x.flatten(0, 1).index_select(0, idx), key=key)
    last = unpack(packed, idx, b, t)
    hidden = (x * valid[..., None].to(x.dtype),) + tuple(a[0] for a in auxs) if return_hidden_states else None
    attns = tuple(a[1][0] for a in auxs) if return_attention_weights else None
    has_cross = any(stack.layer_at(i).cross_attention for i in range(len(auxs)))
    cross = tuple(a[1][1] for a in auxs) if return_attention_weights and has_cross else None
    return last, hidden, attns, cross
