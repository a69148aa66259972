"""Transformer encoder/decoder layers and stacks (pre- or post-norm), over the block seam.

Param names follow ``torch.nn.TransformerEncoderLayer`` / ``TransformerDecoderLayer``
(``self_attn``, ``multihead_attn``, ``linear1``, ``linear2``, ``norm1..3``), so their
state dicts load as they are; TorchMultimodal's names map in ``core/layers/convert_tmm.py``.
Stacks hold ``{"layers": [...], "norm": {...}}`` like ``torch.nn.TransformerEncoder``; the layers
live in :mod:`.transformer_layer` (re-exported here).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .. import random as pr
from ..pytree import Params
from ..spec import Spec
from .seam import run_layers
from .transformer_layer import TransformerDecoderLayer, TransformerEncoderLayer

__all__ = [
    "TransformerOutput",
    "TransformerEncoderLayer",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerDecoder",
    "drop_path_rates",
]


class TransformerOutput(NamedTuple):
    """``last_hidden_state (B, T, D)``; ``hidden_states``: input + every layer's output (before the
    final norm) when asked; ``attentions``: per-layer self-attention ``(B, H, T, T)`` maps when asked;
    ``cache``: the per-layer KV caches when decoding with a cache; ``cross_attentions``: per-layer
    cross-attention ``(B, H, T, S)`` maps (None for a layer without) when asked and some layer
    cross-attends (Hugging Face's ``cross_attentions``)."""

    last_hidden_state: Tensor
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    cache: list[Params] | None = None
    cross_attentions: tuple[Tensor | None, ...] | None = None


def drop_path_rates(max_rate: float, num_layers: int) -> list[float]:
    """Stochastic-depth rates spaced linearly from 0 to ``max_rate`` over depth."""
    if num_layers == 1:
        return [0.0]
    return [max_rate * i / (num_layers - 1) for i in range(num_layers)]


def _stack_init(stack, key: Tensor) -> Params:
    """``{"layers": [...], "norm"?}`` for an encoder or decoder stack (per-depth layer specs)."""
    keys = pr.split(key, stack.num_layers)
    p: Params = {"layers": [stack.layer_at(i).init(key=keys[i]) for i in range(stack.num_layers)]}
    if stack.final_norm:
        p["norm"] = stack.layer._norm().init(key=key)
    return p


def _cross_at(every: int | None, default: bool, i: int) -> bool:
    return default if every is None else (every > 0 and i % every == 0)


def _output(stack, params: Params, x: Tensor, x0: Tensor, auxs: list, hidden: bool, attns: bool,
            cache: bool) -> TransformerOutput:
    """Assemble the stack's output from the per-layer ``(y or None, (self w, cross w), cache)``."""
    if stack.final_norm:
        x = stack.layer._norm()(params["norm"], x)
    has_cross = any(stack.layer_at(i).cross_attention for i in range(len(auxs)))
    return TransformerOutput(
        x,
        (x0,) + tuple(a[0] for a in auxs) if hidden else None,
        tuple(a[1][0] for a in auxs) if attns else None,
        [a[2] for a in auxs] if cache else None,
        tuple(a[1][1] for a in auxs) if attns and has_cross else None,
    )


@dataclass(frozen=True)
class TransformerEncoder(Spec):
    """A stack of encoder layers with linearly spaced drop-path and an optional final norm; with
    ``cross_attention_every=k`` layers ``0, k, 2k, ...`` also cross-attend to ``memory`` (ALBEF's
    fusion encoder: ``k=1``; BLIP-2's Q-Former: ``k=2``).

    >>> from polymodal.core import random as pr
    >>> enc = TransformerEncoder(TransformerEncoderLayer(8, 2, 16, norm_first=True), 2, final_norm=True)
    >>> enc(enc.init(key=pr.key(0)), torch.ones(1, 3, 8)).last_hidden_state.shape
    torch.Size([1, 3, 8])
    >>> qformer = TransformerEncoder(TransformerEncoderLayer(8, 2, 16, dim_kv=6), 4, cross_attention_every=2)
    >>> out = qformer(qformer.init(key=pr.key(0)), torch.ones(1, 3, 8), torch.ones(1, 5, 6), return_attention_weights=True)
    >>> [None if w is None else tuple(w.shape) for w in out.cross_attentions]
    [(1, 2, 3, 5), None, (1, 2, 3, 5), None]
    """

    layer: TransformerEncoderLayer  # the block (drop_path, and cross_attention when every is set, vary per depth)
    num_layers: int  # depth
    final_norm: bool = False  # LayerNorm after the last block (pre-norm stacks)
    drop_path_max: float = 0.0  # stochastic depth of the last block; 0 at the first
    cross_attention_every: int | None = None  # layer i cross-attends when i % every == 0 (0: never); None: as the layer

    def layer_at(self, i: int) -> TransformerEncoderLayer:
        return dataclasses.replace(self.layer, drop_path=drop_path_rates(self.drop_path_max, self.num_layers)[i],
                                   cross_attention=_cross_at(self.cross_attention_every, self.layer.cross_attention, i))

    def init(self, *, key: Tensor) -> Params:
        return _stack_init(self, key)

    def block_stacks(self) -> list[str]:
        return ["layers"]

    def __call__(self, params: Params, x: Tensor, memory: Tensor | None = None, *, attn_mask: Tensor | None = None,
                 key_padding_mask: Tensor | None = None, memory_mask: Tensor | None = None,
                 memory_key_padding_mask: Tensor | None = None, pos: Tensor | None = None,
                 memory_pos: Tensor | None = None, return_hidden_states: bool = False,
                 return_attention_weights: bool = False, key: Tensor | None = None,
                 select: int | Tensor | None = None) -> TransformerOutput:
        """``x (B, T, D)``; ``memory (B, S, dim_kv)`` for the cross-attending layers (with its
        ``memory_key_padding_mask (B, S)``, True = padding); ``pos`` / ``memory_pos`` are added to
        queries and keys (DETR). ``attentions`` holds each layer's self-attention weights and
        ``cross_attentions`` (when some layer cross-attends) each layer's cross weights or None.

        ``select``: the last block computes only that position (an int, or ``(B,)`` positions),
        so ``last_hidden_state`` is ``(B, 1, D)``: what a pooled (class / end-of-text) output needs."""
        if select is not None and return_hidden_states:
            raise ValueError("TransformerEncoder: select returns only the selected rows of the last block; "
                             "it does not combine with return_hidden_states")
        crosses = [self.layer_at(i).cross_attention for i in range(self.num_layers)]
        if any(crosses) and memory is None:
            raise ValueError(f"TransformerEncoder: layers {[i for i, c in enumerate(crosses) if c]} cross-attend; "
                             "expected memory (B, S, dim_kv), got None")
        if memory is not None and not any(crosses):
            raise ValueError("TransformerEncoder: memory was given but no layer cross-attends "
                             "(set cross_attention_every or the layer's cross_attention)")
        x0 = x
        last = len(params["layers"]) - 1

        def block(i, p, h, k, _):
            layer = self.layer_at(i)
            cross = {"memory_mask": memory_mask, "memory_key_padding_mask": memory_key_padding_mask,
                     "memory_pos": memory_pos} if layer.cross_attention else {}
            y, w = layer(p, h, memory if layer.cross_attention else None, attn_mask=attn_mask,
                         key_padding_mask=key_padding_mask, pos=pos, need_weights=return_attention_weights, key=k,
                         select=select if i == last else None, **cross)
            return y, (y if return_hidden_states else None, w if layer.cross_attention else (w, None))

        x, auxs = run_layers(block, params["layers"], x, key=key)
        auxs = [(a[0], a[1], None) for a in auxs]
        return _output(self, params, x, x0, auxs, return_hidden_states, return_attention_weights, False)


@dataclass(frozen=True)
class TransformerDecoder(Spec):
    """A stack of decoder layers; cross-attention in every ``cross_attention_every``-th layer (0: never).

    Decoding with a cache: pass ``use_cache=True`` on the prompt, then feed the new tokens with the
    returned ``cache``; outputs equal the full causal pass. ``attentions`` / ``cross_attentions``
    hold each layer's self / cross weights (None where a layer has no cross-attention).
    """

    layer: TransformerDecoderLayer  # the block (cross_attention and drop_path are set per depth)
    num_layers: int  # depth
    cross_attention_every: int = 1  # layer i cross-attends when i % every == 0 (as TorchMultimodal); 0: never
    final_norm: bool = False  # LayerNorm after the last block
    drop_path_max: float = 0.0  # stochastic depth of the last block

    def layer_at(self, i: int) -> TransformerDecoderLayer:
        return dataclasses.replace(self.layer, cross_attention=_cross_at(self.cross_attention_every, True, i),
                                   drop_path=drop_path_rates(self.drop_path_max, self.num_layers)[i])

    def init(self, *, key: Tensor) -> Params:
        return _stack_init(self, key)

    def block_stacks(self) -> list[str]:
        return ["layers"]

    def __call__(self, params: Params, x: Tensor, memory: Tensor | None = None, *, attn_mask: Tensor | None = None,
                 key_padding_mask: Tensor | None = None, memory_key_padding_mask: Tensor | None = None,
                 memory_mask: Tensor | None = None, pos: Tensor | None = None, query_pos: Tensor | None = None,
                 cache: list[Params] | None = None, use_cache: bool = False, return_hidden_states: bool = False,
                 return_attention_weights: bool = False, key: Tensor | None = None) -> TransformerOutput:
        """``pos`` (memory keys) and ``query_pos`` (queries and self-attention keys) as DETR's decoder."""
        if cache is not None and len(cache) != self.num_layers:
            raise ValueError(f"TransformerDecoder: expected a cache with {self.num_layers} layers, got {len(cache)}")
        x0 = x

        def block(i, p, h, k, c):
            y, w, nc = self.layer_at(i)(p, h, memory, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                        memory_mask=memory_mask, memory_key_padding_mask=memory_key_padding_mask,
                                        pos=pos, query_pos=query_pos, cache=c, use_cache=use_cache,
                                        need_weights=return_attention_weights, key=k)
            return y, (y if return_hidden_states else None, w, nc)

        x, auxs = run_layers(block, params["layers"], x, key=key, extras=cache)
        return _output(self, params, x, x0, auxs, return_hidden_states, return_attention_weights,
                       use_cache or cache is not None)
