"""Transformer encoder/decoder layers and stacks (pre- or post-norm), over the block seam.

Param names follow ``torch.nn.TransformerEncoderLayer`` / ``TransformerDecoderLayer``
(``self_attn``, ``multihead_attn``, ``linear1``, ``linear2``, ``norm1..3``), so their
state dicts load as they are; TorchMultimodal's names map in ``core/layers/convert_tmm.py``.
Stacks hold ``{"layers": [...], "norm": {...}}`` like ``torch.nn.TransformerEncoder``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import random as pr
from ..pytree import Params
from ..spec import Spec, check_floating, check_last_dim
from .activation import activation as get_activation
from .attention import MultiHeadAttention
from .dropout import drop_path, dropout
from .linear import Linear
from .norm import LayerNorm
from .seam import run_layers

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
    final norm) when asked; ``attentions``: per-layer ``(B, H, T, S)`` maps when asked; ``cache``:
    the per-layer KV caches when decoding with a cache."""

    last_hidden_state: Tensor
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    cache: list[Params] | None = None


def drop_path_rates(max_rate: float, num_layers: int) -> list[float]:
    """Stochastic-depth rates spaced linearly from 0 to ``max_rate`` over depth."""
    if num_layers == 1:
        return [0.0]
    return [max_rate * i / (num_layers - 1) for i in range(num_layers)]


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
        h = get_activation(self.activation)(l1(params["linear1"], x))
        return l2(params["linear2"], dropout(h, self.dropout, key=keys[0]))

    def _sub(self, params: Params, x: Tensor, norm: str, fn, keys: list) -> Tensor:
        """One residual sub-block: pre-norm ``x + f(norm(x))`` or post-norm ``norm(x + f(x))``."""
        if self.norm_first:
            return _residual(x, fn(self._norm()(params[norm], x)), self.drop_path, self.dropout, keys)
        return self._norm()(params[norm], _residual(x, fn(x), self.drop_path, self.dropout, keys))


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
    """Self-attention + feed-forward, each residual; ``(B, T, D) -> (B, T, D)`` (or unbatched ``(T, D)``).

    >>> from polymodal.core import random as pr
    >>> layer = TransformerEncoderLayer(8, 2, 16)
    >>> layer(layer.init(key=pr.key(0)), torch.ones(1, 3, 8))[0].shape
    torch.Size([1, 3, 8])
    """

    is_causal: bool = False  # causal self-attention (decoder-only stacks such as CLIP's text tower)

    def attn(self) -> MultiHeadAttention:
        return MultiHeadAttention(self.d_model, self.num_heads, bias=self.bias, dropout=self.attn_dropout,
                                  is_causal=self.is_causal, weight_init=self.weight_init)

    def init(self, *, key: Tensor) -> Params:
        ka, k1, k2 = pr.split(key, 3)
        l1, l2 = self._ff()
        n = self._norm()
        return {"self_attn": self.attn().init(key=ka), "linear1": l1.init(key=k1), "linear2": l2.init(key=k2),
                "norm1": n.init(key=key), "norm2": n.init(key=key)}

    def __call__(self, params: Params, x: Tensor, *, attn_mask: Tensor | None = None,
                 key_padding_mask: Tensor | None = None, need_weights: bool = False,
                 key: Tensor | None = None, select: int | Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Returns ``(y, attention weights or None)``.

        ``select``: compute the output at one position only (a pooled token: CLIP's class or
        end-of-text token), as an int or a ``(B,)`` tensor of positions; ``y`` is then
        ``(B, 1, D)`` and equals those rows of the full output. Every position still serves as
        a key, but the queries, the feed-forward and their backward shrink to one token.
        """
        check_floating(x, "x", self)
        check_last_dim(x, "x", self.d_model, self)
        ks = pr.maybe_split(key, 6)
        weights = []
        kv, mask = None, attn_mask
        if select is not None:
            if attn_mask is not None:
                raise ValueError(f"{type(self).__name__}: select does not combine with attn_mask; use "
                                 "key_padding_mask / is_causal, or select rows of the full output")
            kv = self._norm()(params["norm1"], x) if self.norm_first else x
            x, mask = _select_rows(x, select, self.is_causal)

        def sa(h: Tensor) -> Tensor:
            out = self.attn()(params["self_attn"], h, kv, attn_mask=mask, key_padding_mask=key_padding_mask,
                              is_causal=False if kv is not None else None, need_weights=need_weights, key=ks[0])
            weights.append(out.weights)
            return out.output

        x = self._sub(params, x, "norm1", sa, ks[1:3])
        x = self._sub(params, x, "norm2", lambda h: self._feedforward(params, h, ks[3:4]), ks[4:6])
        return x, weights[0]


@dataclass(frozen=True)
class TransformerDecoderLayer(_LayerBase):
    """Causal self-attention (with KV cache), optional cross-attention to ``memory``, feed-forward."""

    cross_attention: bool = True  # has a cross-attention sub-block
    dim_kv: int | None = None  # width of ``memory`` (None: d_model)

    def self_attn(self) -> MultiHeadAttention:
        return MultiHeadAttention(self.d_model, self.num_heads, bias=self.bias, dropout=self.attn_dropout,
                                  is_causal=True, weight_init=self.weight_init)

    def cross_attn(self) -> MultiHeadAttention:
        fused = self.dim_kv is None or self.dim_kv == self.d_model
        return MultiHeadAttention(self.d_model, self.num_heads, dim_kv=self.dim_kv, fused_qkv=fused, bias=self.bias,
                                  dropout=self.attn_dropout, weight_init=self.weight_init)

    def init(self, *, key: Tensor) -> Params:
        ka, kc, k1, k2 = pr.split(key, 4)
        l1, l2 = self._ff()
        n = self._norm()
        p = {"self_attn": self.self_attn().init(key=ka)}
        if self.cross_attention:
            p["multihead_attn"] = self.cross_attn().init(key=kc)
        p |= {"linear1": l1.init(key=k1), "linear2": l2.init(key=k2), "norm1": n.init(key=key), "norm2": n.init(key=key)}
        if self.cross_attention:
            p["norm3"] = n.init(key=key)
        return p

    def __call__(self, params: Params, x: Tensor, memory: Tensor | None = None, *, attn_mask: Tensor | None = None,
                 key_padding_mask: Tensor | None = None, memory_mask: Tensor | None = None,
                 memory_key_padding_mask: Tensor | None = None, cache: Params | None = None, use_cache: bool = False,
                 need_weights: bool = False, key: Tensor | None = None) -> tuple[Tensor, Any, Params | None]:
        """Returns ``(y, (self weights, cross weights), new cache or None)``.

        ``cache`` is ``{"self": {"k", "v"}, "cross": {"k", "v"}}`` (either part may be missing);
        with a cache, ``x`` holds only the new positions.
        """
        check_floating(x, "x", self)
        check_last_dim(x, "x", self.d_model, self)
        if self.cross_attention and memory is None and (cache is None or "cross" not in cache):
            raise ValueError("TransformerDecoderLayer: cross_attention=True needs memory (B, S, dim_kv) or a cross cache")
        ks = pr.maybe_split(key, 9)
        cache = cache or {}
        keep = use_cache or bool(cache)
        new_cache: Params = {}
        weights = []

        def sa(h: Tensor) -> Tensor:
            out = self.self_attn()(params["self_attn"], h, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                   cache=cache.get("self"), use_cache=keep, need_weights=need_weights, key=ks[0])
            new_cache["self"] = out.cache
            weights.append(out.weights)
            return out.output

        def ca(h: Tensor) -> Tensor:
            out = self.cross_attn()(params["multihead_attn"], h, memory, attn_mask=memory_mask,
                                    key_padding_mask=memory_key_padding_mask, cache=cache.get("cross"),
                                    use_cache=keep, need_weights=need_weights, key=ks[1])
            new_cache["cross"] = out.cache
            weights.append(out.weights)
            return out.output

        x = self._sub(params, x, "norm1", sa, ks[2:4])
        if self.cross_attention:
            x = self._sub(params, x, "norm2", ca, ks[4:6])
            ff_norm = "norm3"
        else:
            weights.append(None)
            ff_norm = "norm2"
        x = self._sub(params, x, ff_norm, lambda h: self._feedforward(params, h, ks[6:7]), ks[7:9])
        return x, tuple(weights), (new_cache if keep else None)


def _stack_init(stack, key: Tensor) -> Params:
    """``{"layers": [...], "norm"?}`` for an encoder or decoder stack (per-depth layer specs)."""
    keys = pr.split(key, stack.num_layers)
    p: Params = {"layers": [stack.layer_at(i).init(key=keys[i]) for i in range(stack.num_layers)]}
    if stack.final_norm:
        p["norm"] = stack.layer._norm().init(key=key)
    return p


def _hidden(auxs: list, x0: Tensor, want: bool) -> tuple[Tensor, ...] | None:
    return (x0,) + tuple(a[0] for a in auxs) if want else None


@dataclass(frozen=True)
class TransformerEncoder(Spec):
    """A stack of encoder layers with linearly spaced drop-path and an optional final norm.

    >>> from polymodal.core import random as pr
    >>> enc = TransformerEncoder(TransformerEncoderLayer(8, 2, 16, norm_first=True), 2, final_norm=True)
    >>> enc(enc.init(key=pr.key(0)), torch.ones(1, 3, 8)).last_hidden_state.shape
    torch.Size([1, 3, 8])
    """

    layer: TransformerEncoderLayer  # the block (its drop_path field is overridden per depth)
    num_layers: int  # depth
    final_norm: bool = False  # LayerNorm after the last block (pre-norm stacks)
    drop_path_max: float = 0.0  # stochastic depth of the last block; 0 at the first

    def layer_at(self, i: int) -> TransformerEncoderLayer:
        return dataclasses.replace(self.layer, drop_path=drop_path_rates(self.drop_path_max, self.num_layers)[i])

    def init(self, *, key: Tensor) -> Params:
        return _stack_init(self, key)

    def block_stacks(self) -> list[str]:
        return ["layers"]

    def __call__(self, params: Params, x: Tensor, *, attn_mask: Tensor | None = None,
                 key_padding_mask: Tensor | None = None, return_hidden_states: bool = False,
                 return_attention_weights: bool = False, key: Tensor | None = None,
                 select: int | Tensor | None = None) -> TransformerOutput:
        """``select``: the last block computes only that position (an int, or ``(B,)`` positions),
        so ``last_hidden_state`` is ``(B, 1, D)``: what a pooled (class / end-of-text) output needs."""
        if select is not None and return_hidden_states:
            raise ValueError("TransformerEncoder: select returns only the selected rows of the last block; "
                             "it does not combine with return_hidden_states")
        x0 = x
        last = len(params["layers"]) - 1

        def block(i, p, h, k, _):
            y, w = self.layer_at(i)(p, h, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                    need_weights=return_attention_weights, key=k,
                                    select=select if i == last else None)
            return y, (y if return_hidden_states else None, w)

        x, auxs = run_layers(block, params["layers"], x, key=key)
        hidden = _hidden(auxs, x0, return_hidden_states)
        if self.final_norm:
            x = self.layer._norm()(params["norm"], x)
        attns = tuple(a[1] for a in auxs) if return_attention_weights else None
        return TransformerOutput(x, hidden, attns, None)


@dataclass(frozen=True)
class TransformerDecoder(Spec):
    """A stack of decoder layers; cross-attention in every ``cross_attention_every``-th layer (0: never).

    Decoding with a cache: pass ``use_cache=True`` on the prompt, then feed the new tokens with the
    returned ``cache``; outputs equal the full causal pass.
    """

    layer: TransformerDecoderLayer  # the block (cross_attention and drop_path are set per depth)
    num_layers: int  # depth
    cross_attention_every: int = 1  # layer i cross-attends when i % every == 0 (as TorchMultimodal); 0: never
    final_norm: bool = False  # LayerNorm after the last block
    drop_path_max: float = 0.0  # stochastic depth of the last block

    def layer_at(self, i: int) -> TransformerDecoderLayer:
        every = self.cross_attention_every
        cross = every > 0 and i % every == 0
        return dataclasses.replace(self.layer, cross_attention=cross,
                                   drop_path=drop_path_rates(self.drop_path_max, self.num_layers)[i])

    def init(self, *, key: Tensor) -> Params:
        return _stack_init(self, key)

    def block_stacks(self) -> list[str]:
        return ["layers"]

    def __call__(self, params: Params, x: Tensor, memory: Tensor | None = None, *, attn_mask: Tensor | None = None,
                 key_padding_mask: Tensor | None = None, memory_key_padding_mask: Tensor | None = None,
                 memory_mask: Tensor | None = None, cache: list[Params] | None = None, use_cache: bool = False,
                 return_hidden_states: bool = False, return_attention_weights: bool = False,
                 key: Tensor | None = None) -> TransformerOutput:
        if cache is not None and len(cache) != self.num_layers:
            raise ValueError(f"TransformerDecoder: expected a cache with {self.num_layers} layers, got {len(cache)}")
        x0 = x

        def block(i, p, h, k, c):
            y, w, nc = self.layer_at(i)(p, h, memory, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                                        memory_mask=memory_mask, memory_key_padding_mask=memory_key_padding_mask,
                                        cache=c, use_cache=use_cache, need_weights=return_attention_weights, key=k)
            return y, (y if return_hidden_states else None, w, nc)

        x, auxs = run_layers(block, params["layers"], x, key=key, extras=cache)
        hidden = _hidden(auxs, x0, return_hidden_states)
        if self.final_norm:
            x = self.layer._norm()(params["norm"], x)
        attns = tuple(a[1] for a in auxs) if return_attention_weights else None
        new_cache = [a[2] for a in auxs] if (use_cache or cache is not None) else None
        return TransformerOutput(x, hidden, attns, new_cache)
