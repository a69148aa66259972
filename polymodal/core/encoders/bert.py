"""The BERT family's text encoder: BERT, RoBERTa, DistilBERT, MiniLM, TorchMultimodal's FLAVA / ALBEF towers.

:class:`BERTTextEmbeddings` (word + position [+ token-type] embeddings, LayerNorm, dropout) feeds a
:class:`~polymodal.core.layers.TransformerEncoder` of post-norm blocks (pre-norm + a final LayerNorm
for FLAVA), optionally cross-attending every k-th layer to ``encoder_hidden_states`` (ALBEF's fusion
encoder, BLIP-2's Q-Former), and an optional tanh pooler on the first token. The blocks run through
``run_layers``, so activation checkpointing and sharding apply. Params use Hugging Face's names where
they agree::

    embeddings: {word_embeddings, position_embeddings, [token_type_embeddings]: {weight}, LayerNorm: {weight, bias}}
    encoder: {layers: [torch.nn.TransformerEncoderLayer names] * L}   (HF: encoder.layer.{i}.attention...)
    [layernorm: {weight, bias}]  [pooler: {dense: {weight, bias}}]

``models/bert/convert.py`` maps Hugging Face's and TorchMultimodal's layouts onto these.

>>> import torch
>>> from polymodal.core import random as pr
>>> enc = bert_text_encoder(vocab_size=100, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
>>> out = enc(enc.init(key=pr.key(0)), torch.tensor([[1, 5, 7, 2, 0, 0]]))
>>> out.last_hidden_state.shape, out.pooled.shape
(torch.Size([1, 6, 32]), torch.Size([1, 32]))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .. import random as pr
from ..layers.dropout import dropout as apply_dropout
from ..layers.embedding import Embedding
from ..layers.linear import Linear
from ..layers.norm import LayerNorm
from ..layers.transformer import TransformerEncoder, TransformerEncoderLayer
from ..pytree import Params
from ..spec import Spec, check_dtype, check_ids, check_sizes
from .bert_unpad import packed_encoder

__all__ = ["BERTTextEmbeddings", "BERTTextEncoder", "BERTOutput", "bert_text_encoder"]

_INT = (torch.int64, torch.int32)


def _check_shape(x: Tensor | None, name: str, want: tuple[int, ...], spec: object) -> None:
    if x is not None and tuple(x.shape) != want:
        raise ValueError(f"{type(spec).__name__}: {name}: expected shape {want} (the shape of input_ids), "
                         f"got {tuple(x.shape)}")


@dataclass(frozen=True)
class BERTTextEmbeddings(Spec):
    """``input_ids (B, T) -> (B, T, D)``: word + position (+ token-type) embeddings, LayerNorm, dropout.

    ``position_offset=True`` is RoBERTa's numbering (fairseq's ``make_positions``): real tokens
    count from ``pad_token_id + 1``, padding sits at ``pad_token_id``. ``type_vocab_size=0`` is
    DistilBERT's layout (no token types). Params: ``word_embeddings``, ``position_embeddings``,
    [``token_type_embeddings``] ``{weight}`` and ``LayerNorm {weight, bias}`` (Hugging Face's names).
    """

    vocab_size: int  # rows of the word table
    hidden_size: int  # D
    max_position_embeddings: int = 512  # rows of the position table
    type_vocab_size: int = 2  # token types (segment A / B); 0: none (DistilBERT)
    pad_token_id: int = 0  # padding id (its word row starts at zero; RoBERTa's position offset)
    layer_norm_eps: float = 1e-12  # eps of the LayerNorm
    dropout: float = 0.0  # dropout after the LayerNorm (with a call key)
    position_offset: bool = False  # RoBERTa: positions pad_token_id+1.. over real tokens
    init_std: float = 0.02  # N(0, std) init of the tables (BERT's initializer_range)

    def __post_init__(self) -> None:
        check_sizes(self, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                    max_position_embeddings=self.max_position_embeddings, type_vocab_size=self.type_vocab_size)

    def word(self) -> Embedding:
        return Embedding(self.vocab_size, self.hidden_size, padding_idx=self.pad_token_id, init_std=self.init_std)

    def position(self) -> Embedding:
        return Embedding(self.max_position_embeddings, self.hidden_size, init_std=self.init_std)

    def token_type(self) -> Embedding:
        return Embedding(self.type_vocab_size, self.hidden_size, init_std=self.init_std)

    def norm(self) -> LayerNorm:
        return LayerNorm(self.hidden_size, eps=self.layer_norm_eps)

    def init(self, *, key: Tensor) -> Params:
        kw, kp, kt = pr.split(key, 3)
        p = {"word_embeddings": self.word().init(key=kw), "position_embeddings": self.position().init(key=kp)}
        if self.type_vocab_size:
            p["token_type_embeddings"] = self.token_type().init(key=kt)
        p["LayerNorm"] = self.norm().init(key=key)
        return p

    def position_ids(self, input_ids: Tensor) -> Tensor:
        """``(B, T)`` positions: ``0..T-1``, or RoBERTa's ``cumsum(real) * real + pad_token_id``."""
        t = input_ids.shape[-1]
        if self.position_offset:
            real = (input_ids != self.pad_token_id).long()
            return real.cumsum(-1) * real + self.pad_token_id
        return torch.arange(t, device=input_ids.device).expand(input_ids.shape)

    def __call__(self, params: Params, input_ids: Tensor, token_type_ids: Tensor | None = None,
                 position_ids: Tensor | None = None, *, key: Tensor | None = None) -> Tensor:
        check_dtype(input_ids, f"{type(self).__name__}: input_ids", _INT)
        shape = tuple(input_ids.shape)
        _check_shape(token_type_ids, "token_type_ids", shape, self)
        _check_shape(position_ids, "position_ids", shape, self)
        if token_type_ids is not None and not self.type_vocab_size:
            raise ValueError(f"{type(self).__name__}: token_type_ids given, but this layout has no token types "
                             "(type_vocab_size=0, DistilBERT)")
        if position_ids is None:
            position_ids = self.position_ids(input_ids)
        check_ids(position_ids, "position_ids", self.max_position_embeddings, self)
        x = self.word()(params["word_embeddings"], input_ids)
        x = x + self.position()(params["position_embeddings"], position_ids)
        if self.type_vocab_size:
            if token_type_ids is None:
                x = x + params["token_type_embeddings"]["weight"][0]
            else:
                x = x + self.token_type()(params["token_type_embeddings"], token_type_ids)
        x = self.norm()(params["LayerNorm"], x)
        return apply_dropout(x, self.dropout, key=key)


class BERTOutput(NamedTuple):
    """``last_hidden_state (B, T, D)``; ``pooled (B, D)`` (tanh pooler on the first token, or None);
    ``hidden_states`` (embeddings output + each layer's output) and ``attentions`` (per-layer
    ``(B, H, T, T)``) when asked; ``cross_attentions`` when some layer cross-attends and weights are asked."""

    last_hidden_state: Tensor
    pooled: Tensor | None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    cross_attentions: tuple[Tensor | None, ...] | None = None


@dataclass(frozen=True)
class BERTTextEncoder(Spec):
    """``input_ids (B, T) -> BERTOutput``.

    ``__call__(params, input_ids, attention_mask=None, token_type_ids=None, *, position_ids=None,
    encoder_hidden_states=None, encoder_attention_mask=None, key=None, return_hidden_states=False,
    return_attention_weights=False)``. ``attention_mask (B, T)``: 1 = real token; without it
    ``input_ids != pad_token_id`` (``mask_padding=True``, TorchMultimodal's rule) or nothing is masked.
    ``encoder_hidden_states (B, S, dim_kv)`` (+ ``encoder_attention_mask (B, S)``, 1 = real) feed the
    cross-attending layers.

    ``unpad=True`` (with a mask: ``attention_mask`` or ``mask_padding``) runs the blocks on the real
    tokens only (:mod:`.bert_unpad`): real positions equal the padded path's, padded positions of
    ``last_hidden_state`` and ``hidden_states`` are zeros (Hugging Face returns the pad queries'
    attention over the real tokens there), and the pooler reads position 0 as always. Not under
    ``vmap`` (data-dependent shapes); ``torch.compile`` needs
    ``torch._dynamo.config.capture_dynamic_output_shape_ops = True``.
    """

    embeddings: BERTTextEmbeddings  # ids -> (B, T, D)
    encoder: TransformerEncoder  # post-norm BERT blocks (cross_attention_every for fusion encoders)
    pooler: bool = True  # tanh(dense(first token)) as the pooled output
    final_norm: bool = False  # a LayerNorm after the blocks (pre-norm stacks: TorchMultimodal's FLAVA)
    mask_padding: bool = True  # without attention_mask, mask the pad_token_id positions out of attention
    unpad: bool = False  # token-wise work on real tokens only (bert_unpad.py); last_hidden_state is 0 at padding

    def __post_init__(self) -> None:
        d, w = self.embeddings.hidden_size, self.encoder.layer.d_model
        if d != w:
            raise ValueError(f"{type(self).__name__}: embeddings.hidden_size ({d}) must equal the encoder width ({w})")

    @property
    def hidden_size(self) -> int:
        return self.embeddings.hidden_size

    def dense(self) -> Linear:
        return Linear(self.hidden_size, self.hidden_size)

    def norm(self) -> LayerNorm:
        return LayerNorm(self.hidden_size, eps=self.encoder.layer.layer_norm_eps)

    def init(self, *, key: Tensor) -> Params:
        ke, kt, kp = pr.split(key, 3)
        p: Params = {"embeddings": self.embeddings.init(key=ke), "encoder": self.encoder.init(key=kt)}
        if self.final_norm:
            p["layernorm"] = self.norm().init(key=key)
        if self.pooler:
            w = pr.normal(kp, (self.hidden_size, self.hidden_size)) * self.embeddings.init_std
            p["pooler"] = {"dense": {"weight": w, "bias": torch.zeros(self.hidden_size)}}
        return p

    def valid(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor | None:
        """``(B, T)`` bool, True at real tokens, or None when nothing is masked."""
        if attention_mask is not None:
            _check_shape(attention_mask, "attention_mask", tuple(input_ids.shape), self)
            return attention_mask.bool()
        return input_ids != self.embeddings.pad_token_id if self.mask_padding else None

    def __call__(self, params: Params, input_ids: Tensor, attention_mask: Tensor | None = None,
                 token_type_ids: Tensor | None = None, *, position_ids: Tensor | None = None,
                 encoder_hidden_states: Tensor | None = None, encoder_attention_mask: Tensor | None = None,
                 key: Tensor | None = None, return_hidden_states: bool = False,
                 return_attention_weights: bool = False) -> BERTOutput:
        check_dtype(input_ids, f"{type(self).__name__}: input_ids", _INT)
        if input_ids.dim() == 1:  # one unbatched row (under vmap): the masks need a batch axis
            add = (lambda t: None if t is None else t[None])
            enc = dataclasses.replace(self, unpad=False) if self.unpad else self  # vmap needs static shapes
            out = enc(params, input_ids[None], add(attention_mask), add(token_type_ids), position_ids=add(position_ids),
                       encoder_hidden_states=add(encoder_hidden_states),
                       encoder_attention_mask=add(encoder_attention_mask), key=key,
                       return_hidden_states=return_hidden_states, return_attention_weights=return_attention_weights)
            return BERTOutput(*(None if v is None else v[0] if isinstance(v, Tensor)
                                else tuple(None if h is None else h[0] for h in v) for v in out))
        if input_ids.dim() != 2:
            raise ValueError(f"{type(self).__name__}: input_ids: expected shape (B, T), got {tuple(input_ids.shape)}")
        valid = self.valid(input_ids, attention_mask)
        if encoder_attention_mask is not None and encoder_hidden_states is not None:
            want = tuple(encoder_hidden_states.shape[:-1])
            if tuple(encoder_attention_mask.shape) != want:
                raise ValueError(f"{type(self).__name__}: encoder_attention_mask: expected shape {want} (the shape "
                                 f"of encoder_hidden_states without its last axis), got "
                                 f"{tuple(encoder_attention_mask.shape)}")
        k_emb, k_enc = pr.maybe_split(key, 2)
        x = self.embeddings(params["embeddings"], input_ids, token_type_ids, position_ids, key=k_emb)
        mem_pad = None if encoder_attention_mask is None else ~encoder_attention_mask.bool()
        if self.unpad and valid is not None:
            return self._packed(params, x, valid, encoder_hidden_states, mem_pad, k_enc, return_hidden_states,
                                return_attention_weights)
        out = self.encoder(params["encoder"], x, encoder_hidden_states,
                           key_padding_mask=None if valid is None else ~valid, memory_key_padding_mask=mem_pad,
                           key=k_enc, return_hidden_states=return_hidden_states,
                           return_attention_weights=return_attention_weights)
        return self._finish(params, out.last_hidden_state, out.hidden_states, out.attentions, out.cross_attentions)

    def _finish(self, params: Params, h: Tensor, *rest) -> BERTOutput:
        if self.final_norm:
            h = self.norm()(params["layernorm"], h)
        pooled = torch.tanh(self.dense()(params["pooler"]["dense"], h[:, 0])) if self.pooler else None
        return BERTOutput(h, pooled, *rest)

    def _packed(self, params: Params, x: Tensor, valid: Tensor, memory: Tensor | None, mem_pad: Tensor | None,
                key: Tensor | None, hidden: bool, weights: bool) -> BERTOutput:
        crosses = [i for i in range(self.encoder.num_layers) if self.encoder.layer_at(i).cross_attention]
        if crosses and memory is None:
            raise ValueError(f"{type(self).__name__}: layers {crosses} cross-attend; expected "
                             "encoder_hidden_states (B, S, dim_kv), got None")
        if memory is not None and not crosses:
            raise ValueError(f"{type(self).__name__}: encoder_hidden_states was given but no layer cross-attends")
        h, hs, attns, cross = packed_encoder(self.encoder, params["encoder"], x, valid, memory, mem_pad, key=key,
                                             return_hidden_states=hidden, return_attention_weights=weights)
        return self._finish(params, h, hs, attns, cross)


def bert_text_encoder(*, vocab_size: int = 30522, hidden_size: int = 768, num_layers: int = 12, num_heads: int = 12,
                      intermediate_size: int = 3072, max_position_embeddings: int = 512, type_vocab_size: int = 2,
                      pad_token_id: int = 0, layer_norm_eps: float = 1e-12, dropout: float = 0.0,
                      attn_dropout: float | None = None, activation: str = "gelu", position_offset: bool = False,
                      pooler: bool = True, norm_first: bool = False, final_norm: bool | None = None,
                      cross_attention_every: int | None = None, dim_kv: int | None = None,
                      mask_padding: bool = True, init_std: float = 0.02, unpad: bool = False,
                      is_causal: bool = False) -> BERTTextEncoder:
    """A :class:`BERTTextEncoder` from Hugging Face's ``BertConfig`` hyperparameters (defaults: bert-base).

    ``cross_attention_every=k``: layers ``0, k, 2k, ...`` cross-attend to ``dim_kv``-wide memory
    (``k=1``: every layer, Hugging Face's ``add_cross_attention``; ``k=2``: BLIP-2's Q-Former).
    ``unpad=True``: the blocks skip padded positions (zeros there; see :class:`BERTTextEncoder`).
    ``is_causal=True``: causal self-attention (Hugging Face's ``is_decoder=True``, ``BertLMHeadModel``);
    ALBEF's fusion encoder and BLIP-2's Q-Former cross-attend bidirectionally (the default).
    """
    layer = TransformerEncoderLayer(hidden_size, num_heads, dim_feedforward=intermediate_size, dropout=dropout,
                                    attn_dropout=dropout if attn_dropout is None else attn_dropout,
                                    activation=activation, norm_first=norm_first, layer_norm_eps=layer_norm_eps,
                                    dim_kv=dim_kv if dim_kv != hidden_size else None, weight_init="normal",
                                    is_causal=is_causal)
    emb = BERTTextEmbeddings(vocab_size, hidden_size, max_position_embeddings, type_vocab_size, pad_token_id,
                             layer_norm_eps, dropout, position_offset, init_std)
    return BERTTextEncoder(emb, TransformerEncoder(layer, num_layers, cross_attention_every=cross_attention_every),
                           pooler, norm_first if final_norm is None else final_norm, mask_padding, unpad)
