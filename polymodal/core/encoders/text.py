"""A text transformer: token + learned position embeddings, causal or bidirectional blocks, a final
LayerNorm, pooling at the end-of-text token, the class (first) token, or the mask-aware mean.

The spec's fields are its sub-specs (the token :class:`~polymodal.core.layers.Embedding` and the
:class:`~polymodal.core.layers.TransformerEncoder`, whose layer says causal or not) plus the
pooling; :func:`text_transformer` builds it from the usual hyperparameters. Padding is masked out
of attention as a key padding mask, from an ``attention_mask`` (1 = real token) or from
``pad_id``. Rows may be shorter than ``context_length`` (positions ``0..T-1``). Params use
open_clip's ``TextTransformer`` names::

    token_embedding: {weight (V, D)}, positional_embedding (context_length, D),
    transformer: {layers: [torch.nn.TransformerEncoderLayer names] * L}, ln_final: {weight, bias}

>>> import torch
>>> from polymodal.core import random as pr
>>> enc = text_transformer(vocab_size=100, context_length=8, width=32, layers=2, heads=2)
>>> out = enc(enc.init(key=pr.key(0)), torch.tensor([[98, 5, 7, 99, 0, 0]]))
>>> out.last_hidden_state.shape, out.pooled.shape
(torch.Size([1, 6, 32]), torch.Size([1, 32]))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .. import random as pr
from ..layers.embedding import Embedding
from ..layers.norm import LayerNorm
from ..layers.pooling import eot_pool, mean_pool
from ..layers.transformer import TransformerEncoder, TransformerEncoderLayer
from ..pytree import Params
from ..spec import Spec, check_dtype, reading_values_ok

__all__ = ["TextTransformer", "TextOutput", "text_transformer"]

_INT = (torch.int64, torch.int32)
_POOLS = ("eot", "cls", "mean", "none")


class TextOutput(NamedTuple):
    """``last_hidden_state (B, T, D)`` after ``ln_final`` (``(B, 1, D)`` with ``pooled_only``);
    ``pooled (B, D)`` (``None`` for ``pool="none"``); ``hidden_states`` (block inputs and outputs,
    before ``ln_final``) when asked."""

    last_hidden_state: Tensor
    pooled: Tensor | None
    hidden_states: tuple[Tensor, ...] | None = None


@dataclass(frozen=True)
class TextTransformer(Spec):
    """``tokens (B, T) int -> TextOutput`` with ``1 <= T <= context_length`` (``B`` optional).

    ``__call__(params, tokens, attention_mask=None, *, key=None, return_hidden_states=False,
    pooled_only=False)``: ``attention_mask (B, T)`` (1 / True = real token) or, without it,
    ``tokens != pad_id`` masks padding keys; ``pool="mean"`` averages the real tokens only.
    ``pooled_only`` (``eot`` / ``cls``) computes only the pooled position in the last block.
    A row with no real token at all has nothing to attend to (NaN), as in torch.
    """

    token_embedding: Embedding  # ids -> (D,) vectors
    transformer: TransformerEncoder  # the blocks; layer.is_causal for decoder-style (CLIP) text towers
    context_length: int  # rows of the learned position table (the longest sequence)
    pool: str = "eot"  # "eot" (end-of-text token), "cls" (first token), "mean" (mask-aware), "none"
    eot_id: int | None = None  # pool="eot": this id's first position; None: the row's largest id (CLIP)
    pad_id: int | None = None  # padding id masked out of attention (None: no padding mask unless given)
    final_norm: bool = True  # ln_final after the blocks

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.pool not in _POOLS:
            raise ValueError(f"{name}: pool: expected one of {_POOLS}, got {self.pool!r}")
        d, w = self.token_embedding.embedding_dim, self.transformer.layer.d_model
        if d != w:
            raise ValueError(f"{name}: token_embedding.embedding_dim ({d}) must equal transformer width ({w})")
        if isinstance(self.context_length, bool) or self.context_length < 1:
            raise ValueError(f"{name}: context_length: expected a positive int, got {self.context_length!r}")

    @property
    def width(self) -> int:
        return self.token_embedding.embedding_dim

    def norm(self) -> LayerNorm:
        return LayerNorm(self.width, eps=self.transformer.layer.layer_norm_eps)

    def init(self, *, key: Tensor) -> Params:
        k_tok, k_pos, k_tr = pr.split(key, 3)
        p = {"token_embedding": self.token_embedding.init(key=k_tok),
             "positional_embedding": pr.normal(k_pos, (self.context_length, self.width)) * 0.01,
             "transformer": self.transformer.init(key=k_tr)}
        if self.final_norm:
            p["ln_final"] = self.norm().init(key=key)
        return p

    def check_tokens(self, tokens: Tensor) -> None:
        name, t = type(self).__name__, self.context_length
        check_dtype(tokens, f"{name}: tokens", _INT)
        if tokens.dim() not in (1, 2) or not 1 <= tokens.shape[-1] <= t:
            raise ValueError(f"{name}: tokens: expected shape (B, T) with 1 <= T <= {t} (context_length {t}), "
                             f"got {tuple(tokens.shape)}")

    def check_rows(self, tokens: Tensor) -> None:
        """``pool="eot"``: every row holds its end-of-text token. An empty row (all padding) would
        silently pool a padding position. Values are read only on CPU outside ``torch.compile`` /
        ``torch.func`` transforms (as ``core.spec.check_ids``)."""
        if self.pool == "eot" and tokens.device.type == "cpu" and tokens.numel() and reading_values_ok(tokens):
            has_eot = tokens.amax(-1) > 0 if self.eot_id is None else (tokens == self.eot_id).any(-1)
            if not bool(has_eot.all()):
                rows = (~has_eot).reshape(-1).nonzero().flatten().tolist()
                what = "a non-zero token (the end-of-text id is the row's largest)" if self.eot_id is None \
                    else f"the end-of-text id {self.eot_id}"
                raise ValueError(f"{type(self).__name__}: tokens: expected every row to hold {what}, "
                                 f"got empty rows {rows[:10]}")

    def valid(self, tokens: Tensor, attention_mask: Tensor | None) -> Tensor | None:
        """``(B, T)`` bool, True at real tokens, or ``None`` when nothing is padding."""
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(tokens.shape):
                raise ValueError(f"{type(self).__name__}: attention_mask: expected shape {tuple(tokens.shape)}, "
                                 f"got {tuple(attention_mask.shape)}")
            return attention_mask.bool()
        return None if self.pad_id is None else tokens != self.pad_id

    def pool_position(self, tokens: Tensor) -> Tensor:
        """The pooled position of each row (``pool="eot"``): ``(B,)``."""
        return tokens.argmax(-1) if self.eot_id is None else (tokens == self.eot_id).int().argmax(-1)

    def __call__(self, params: Params, tokens: Tensor, attention_mask: Tensor | None = None, *,
                 key: Tensor | None = None, return_hidden_states: bool = False,
                 pooled_only: bool = False) -> TextOutput:
        self.check_tokens(tokens)
        if tokens.dim() == 1:  # one unbatched row (under vmap): the attention masks need a batch axis
            mask = None if attention_mask is None else attention_mask[None]
            out = self(params, tokens[None], mask, key=key, return_hidden_states=return_hidden_states,
                       pooled_only=pooled_only)
            return TextOutput(*(None if v is None else v[0] if isinstance(v, Tensor) else tuple(h[0] for h in v)
                                for v in out))
        if pooled_only and (self.pool not in ("eot", "cls") or return_hidden_states):
            raise ValueError(f"{type(self).__name__}: pooled_only needs pool 'eot' or 'cls' and no "
                             f"return_hidden_states, got pool={self.pool!r}")
        valid = self.valid(tokens, attention_mask)
        self.check_rows(tokens)
        x = self.token_embedding(params["token_embedding"], tokens)
        x = x + params["positional_embedding"][: tokens.shape[-1]].to(x.dtype)
        select = None
        if pooled_only:
            select = self.pool_position(tokens) if self.pool == "eot" else 0
        out = self.transformer(params["transformer"], x, key_padding_mask=None if valid is None else ~valid, key=key,
                               return_hidden_states=return_hidden_states, select=select)
        x = out.last_hidden_state
        if self.final_norm:
            x = self.norm()(params["ln_final"], x)
        if pooled_only:
            pooled = x[..., 0, :]
        elif self.pool == "eot":
            pooled = eot_pool(x, tokens, self.eot_id)
        elif self.pool == "cls":
            pooled = x[..., 0, :]
        elif self.pool == "mean":
            pooled = mean_pool(x, valid)
        else:
            pooled = None
        return TextOutput(x, pooled, out.hidden_states)


def text_transformer(*, vocab_size: int, context_length: int, width: int, layers: int, heads: int,
                     mlp_dim: int | None = None, causal: bool = True, activation: str = "gelu",
                     norm_first: bool = True, layer_norm_eps: float = 1e-5, final_norm: bool | None = None,
                     pool: str = "eot", eot_id: int | None = None, pad_id: int | None = None, dropout: float = 0.0,
                     attn_dropout: float = 0.0, embed_init_std: float = 0.02) -> TextTransformer:
    """A :class:`TextTransformer` from the usual hyperparameters (open_clip's ``TextTransformer``
    defaults: causal pre-norm blocks, MLP 4 x width, token init ``N(0, 0.02)``)."""
    layer = TransformerEncoderLayer(width, heads, dim_feedforward=mlp_dim or 4 * width, dropout=dropout,
                                    attn_dropout=attn_dropout, activation=activation, norm_first=norm_first,
                                    layer_norm_eps=layer_norm_eps, is_causal=causal)
    return TextTransformer(Embedding(vocab_size, width, init_std=embed_init_std), TransformerEncoder(layer, layers),
                           context_length, pool, eot_id, pad_id, norm_first if final_norm is None else final_norm)
