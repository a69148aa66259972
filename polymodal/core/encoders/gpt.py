"""Multimodal GPT: one decoder-only transformer over a joint vocabulary of two modalities.

The input modality (e.g. text ids) comes first, the output modality (e.g. a VQ-VAE's video
codes) second; each has its own token embedding and per-axis broadcasted position embedding.
Training right-shifts the concatenated sequence behind a learned start token (which receives
gradients, unlike TorchMultimodal's ``RightShift``, which concatenates ``sos.data``; ``detach_sos=True``
reproduces that for parity). Logits cover the joint vocabulary
``[0, num_in_tokens) + [num_in_tokens, num_in_tokens + num_out_tokens)`` and are masked so
each position predicts only its own modality's tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .. import random as pr
from ..layers import Embedding, LayerNorm, Linear
from ..layers.position import BroadcastedPositionEmbedding
from ..layers.transformer import TransformerDecoder, TransformerDecoderLayer, TransformerOutput
from ..pytree import Params
from ..spec import Spec, check_ids, check_ndim

__all__ = ["MultimodalGPT", "GPTOutput", "multimodal_gpt", "video_gpt"]

_INT = (torch.int64, torch.int32)


class GPTOutput(NamedTuple):
    """``logits (B, T, num_in + num_out)`` (other modality masked to -inf-like), ``decoder`` output."""

    logits: Tensor
    decoder: TransformerOutput


@dataclass(frozen=True)
class MultimodalGPT(Spec):
    """Decoder-only GPT over ``[in tokens, out tokens]``; build it with :func:`multimodal_gpt`.

    The fields are the sub-specs; params nest under the same names: ``in_embed``, ``out_embed``
    (token tables; replace with a VQ-VAE's codebook if desired), ``in_pos``, ``out_pos``
    (broadcasted per-axis), ``decoder``, ``in_proj`` / ``out_proj`` (when the token embeddings are
    narrower than the model), plus ``sos (d_model,)``, ``norm`` and ``to_logit`` (bias-free,
    zero-initialised as TorchMultimodal's).

    >>> from polymodal.core import random as pr
    >>> gpt = multimodal_gpt(num_in_tokens=10, num_out_tokens=6, in_shape=(4,), out_shape=(2, 2), d_model=16,
    ...                      num_heads=2, num_layers=2)
    >>> p = gpt.init(key=pr.key(0))
    >>> gpt(p, torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)).logits.shape
    torch.Size([1, 8, 16])
    """

    in_embed: Embedding  # input-modality token table (num_in_tokens rows)
    out_embed: Embedding  # output-modality token table (num_out_tokens rows)
    in_pos: BroadcastedPositionEmbedding  # positions over the input latent shape (e.g. (text_len,))
    out_pos: BroadcastedPositionEmbedding  # positions over the output latent shape (e.g. (T, H, W) of video codes)
    decoder: TransformerDecoder  # pre-norm causal blocks without cross-attention
    in_proj: Linear | None = None  # input token embedding -> d_model (None: the table is d_model wide)
    out_proj: Linear | None = None  # output token embedding -> d_model
    detach_sos: bool = False  # True: the start token gets no gradient (TorchMultimodal's RightShift, for parity)

    def __post_init__(self) -> None:
        d = self.d_model
        for name in ("in", "out"):
            emb, pos, proj = (getattr(self, f"{name}_{k}") for k in ("embed", "pos", "proj"))
            width = emb.embedding_dim if proj is None else proj.out_features
            if proj is not None and proj.in_features != emb.embedding_dim:
                raise ValueError(f"MultimodalGPT: {name}_proj: expected in_features {emb.embedding_dim}, "
                                 f"got {proj.in_features}")
            if width != d or pos.embedding_dim != d:
                raise ValueError(f"MultimodalGPT: the {name} embeddings must be d_model ({d}) wide, got token "
                                 f"width {width} and position width {pos.embedding_dim}")

    @property
    def d_model(self) -> int:
        return self.decoder.layer.d_model

    @property
    def num_in_tokens(self) -> int:
        return self.in_embed.num_embeddings

    @property
    def num_out_tokens(self) -> int:
        return self.out_embed.num_embeddings

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.in_pos.latent_shape

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.out_pos.latent_shape

    @property
    def in_len(self) -> int:
        return math.prod(self.in_shape)

    @property
    def out_len(self) -> int:
        return math.prod(self.out_shape)

    @property
    def vocab(self) -> int:
        return self.num_in_tokens + self.num_out_tokens

    def init(self, *, key: Tensor) -> Params:
        ks = pr.split(key, 8)
        p = {"in_embed": self.in_embed.init(key=ks[0]), "out_embed": self.out_embed.init(key=ks[1]),
             "in_pos": self.in_pos.init(key=ks[2]), "out_pos": self.out_pos.init(key=ks[3]),
             "sos": pr.normal(ks[4], (self.d_model,)) * 0.02, "decoder": self.decoder.init(key=ks[5]),
             "norm": LayerNorm(self.d_model).init(key=key),
             "to_logit": {"weight": torch.zeros(self.vocab, self.d_model)}}
        if self.in_proj is not None:
            p["in_proj"] = self.in_proj.init(key=ks[6])
        if self.out_proj is not None:
            p["out_proj"] = self.out_proj.init(key=ks[7])
        return p

    # -- pieces ---------------------------------------------------------------------------
    def embed(self, params: Params, ids: Tensor, modality: str, positions: Tensor | None = None) -> Tensor:
        """Token + position embeddings of ``ids (B, L)`` for ``modality`` in {"in", "out"};
        ``positions (L,)`` default ``0..L-1``."""
        if modality not in ("in", "out"):
            raise ValueError(f"modality must be 'in' or 'out', got {modality!r}")
        check_ids(ids, f"{modality}_ids", self.num_in_tokens if modality == "in" else self.num_out_tokens, self)
        limit = self.in_len if modality == "in" else self.out_len
        if positions is None and ids.shape[-1] > limit:
            what = "input (prompt)" if modality == "in" else "output"
            raise ValueError(f"MultimodalGPT: {modality}_ids: the {what} modality holds at most {limit} tokens "
                             f"(latent shape {self.in_shape if modality == 'in' else self.out_shape}), "
                             f"got {ids.shape[-1]}")
        x = self.embed_tokens(params, ids, modality)
        pos = self.in_pos if modality == "in" else self.out_pos
        if positions is None:
            positions = torch.arange(ids.shape[-1], device=ids.device)
        return x + pos(params[f"{modality}_pos"], positions)

    def embed_tokens(self, params: Params, ids: Tensor, modality: str) -> Tensor:
        """Token embeddings of ``ids (B, L)`` (projected to d_model), without positions."""
        emb, proj = (getattr(self, f"{modality}_{k}") for k in ("embed", "proj"))
        x = emb(params[f"{modality}_embed"], ids)
        return x if proj is None else proj(params[f"{modality}_proj"], x)

    def logits_mask(self, num_in: int, num_out: int, device=None) -> Tensor:
        """``(num_in + num_out, vocab)`` bool: position i may predict only its modality's tokens."""
        is_in = torch.arange(self.vocab, device=device) < self.num_in_tokens
        rows = torch.cat([is_in.expand(num_in, -1), (~is_in).expand(num_out, -1)])
        return rows

    def project(self, params: Params, hidden: Tensor, mask: Tensor | None) -> Tensor:
        h = LayerNorm(self.d_model)(params["norm"], hidden)
        logits = Linear(self.d_model, self.vocab, bias=False)(params["to_logit"], h)
        if mask is not None:
            logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
        return logits

    def right_shift(self, params: Params, x: Tensor) -> Tensor:
        """Prepend the learned start token and drop the last position: ``(B, L, D) -> (B, L, D)``."""
        sos = params["sos"].detach() if self.detach_sos else params["sos"]
        sos = sos.expand(*x.shape[:-2], 1, self.d_model)
        return torch.cat([sos, x[..., :-1, :]], dim=-2)

    # -- full pass ---------------------------------------------------------------------------
    def __call__(self, params: Params, in_ids: Tensor, out_ids: Tensor | None = None, *, key: Tensor | None = None,
                 return_hidden_states: bool = False) -> GPTOutput:
        """Teacher-forced pass: logits at position t predict token t of ``[in_ids, out_ids]``.

        Args:
            in_ids: ``(B, L_in)`` input-modality ids in ``[0, num_in_tokens)``.
            out_ids: ``(B, L_out)`` output-modality ids in ``[0, num_out_tokens)`` or None.
        """
        check_ndim(in_ids, "in_ids", (1, 2), "(B, L_in)", self)
        parts = [self.embed(params, in_ids, "in")]
        if out_ids is not None:
            check_ndim(out_ids, "out_ids", (1, 2), "(B, L_out)", self)
            parts.append(self.embed(params, out_ids, "out"))
        x = self.right_shift(params, torch.cat(parts, dim=-2))
        dec = self.decoder(params["decoder"], x, key=key, return_hidden_states=return_hidden_states)
        n_out = 0 if out_ids is None else out_ids.shape[-1]
        mask = self.logits_mask(in_ids.shape[-1], n_out, device=x.device)
        return GPTOutput(self.project(params, dec.last_hidden_state, mask), dec)

    def targets(self, in_ids: Tensor, out_ids: Tensor) -> Tensor:
        """Joint-vocabulary targets for the full pass: ``[in_ids, out_ids + num_in_tokens]``."""
        return torch.cat([in_ids, out_ids + self.num_in_tokens], dim=-1)

    # -- incremental decoding ------------------------------------------------------------------
    def prefill(self, params: Params, in_ids: Tensor) -> tuple[Tensor, list[Params]]:
        """Run ``[sos, in tokens]`` once; returns the logits predicting the first output token
        ``(B, vocab)`` (masked to the output vocabulary) and the KV cache."""
        x = torch.cat([params["sos"].expand(in_ids.shape[0], 1, self.d_model), self.embed(params, in_ids, "in")], 1)
        dec = self.decoder(params["decoder"], x, use_cache=True)
        mask = self.logits_mask(0, 1, device=x.device)[0]
        return self.project(params, dec.last_hidden_state[:, -1], mask), dec.cache

    def step(self, params: Params, out_id: Tensor, position: int | Tensor, cache: list[Params], *,
             pos_table: Tensor | None = None) -> tuple[Tensor, list[Params]]:
        """Feed output token ``out_id (B,)`` at output position ``position``; returns the logits for
        the next output token ``(B, vocab)`` and the grown cache. ``pos_table``: the output
        positions' embeddings ``(out_len, d_model)`` (``out_pos(params["out_pos"])``), computed once
        by a decoding loop instead of at every step."""
        pos = torch.as_tensor(position, device=out_id.device).reshape(1)
        if pos_table is None:
            x = self.embed(params, out_id[:, None], "out", positions=pos)
        else:
            x = self.embed_tokens(params, out_id[:, None], "out") + pos_table[pos]
        dec = self.decoder(params["decoder"], x, cache=cache)
        mask = self.logits_mask(0, 1, device=x.device)[0]
        return self.project(params, dec.last_hidden_state[:, -1], mask), dec.cache


def multimodal_gpt(num_in_tokens: int, num_out_tokens: int, in_shape: tuple[int, ...], out_shape: tuple[int, ...], *,
                   d_model: int = 768, num_heads: int = 8, num_layers: int = 8, dim_feedforward: int | None = None,
                   dropout: float = 0.0, attn_dropout: float = 0.0, activation: str = "gelu",
                   in_dim: int | None = None, out_dim: int | None = None, proj_bias: bool = True,
                   qkv_bias: bool | None = None, detach_sos: bool = False) -> MultimodalGPT:
    """A :class:`MultimodalGPT` from the usual hyperparameters: vocabularies and latent shapes of
    the two modalities, width, heads, depth, MLP width (default 4 x d_model), dropouts; ``in_dim`` /
    ``out_dim``: token embeddings that narrow, projected to ``d_model`` (None: d_model wide) by a Linear
    with a bias when ``proj_bias``; ``qkv_bias``: biases of the attention's q/k/v (None: yes);
    ``detach_sos``: TorchMultimodal's gradient-free start token."""
    layer = TransformerDecoderLayer(d_model, num_heads, dim_feedforward or 4 * d_model, dropout=dropout,
                                    attn_dropout=attn_dropout, activation=activation, norm_first=True,
                                    cross_attention=False, qkv_bias=qkv_bias)
    d_in, d_out = in_dim or d_model, out_dim or d_model
    return MultimodalGPT(
        in_embed=Embedding(num_in_tokens, d_in, weight_init="normal", init_std=0.02),
        out_embed=Embedding(num_out_tokens, d_out, weight_init="normal", init_std=0.02),
        in_pos=BroadcastedPositionEmbedding(tuple(in_shape), d_model),
        out_pos=BroadcastedPositionEmbedding(tuple(out_shape), d_model),
        decoder=TransformerDecoder(layer, num_layers, cross_attention_every=0),
        in_proj=None if in_dim is None else Linear(in_dim, d_model, bias=proj_bias, weight_init="normal"),
        out_proj=None if out_dim is None else Linear(out_dim, d_model, bias=proj_bias, weight_init="normal"),
        detach_sos=detach_sos)


def video_gpt(latent_shape: tuple[int, ...] = (8, 32, 32), *, d_model: int = 576, num_heads: int = 4,
              num_layers: int = 16, dropout: float = 0.2, attn_dropout: float = 0.3, num_in_tokens: int = 1024,
              num_out_tokens: int = 1024, embedding_dim: int = 256, detach_sos: bool = False) -> MultimodalGPT:
    """VideoGPT (Yan et al. 2021, Tables A.1/A.2 "BAIR / RoboNet"; TorchMultimodal's ``video_gpt``):
    conditioning-video codes in, video codes out, both over (8, 32, 32) latents of the 1024 x 256
    video VQ-VAE codebooks (the token tables, projected bias-free to d_model 576), 16 pre-norm layers,
    4 heads, MLP 4x with TorchMultimodal's ``SiLU`` (x * sigmoid(1.702 x), our ``quick_gelu``),
    bias-free q/k/v."""
    return multimodal_gpt(num_in_tokens, num_out_tokens, latent_shape, latent_shape, d_model=d_model,
                          num_heads=num_heads, num_layers=num_layers, dropout=dropout, attn_dropout=attn_dropout,
                          activation="quick_gelu", in_dim=embedding_dim, out_dim=embedding_dim, proj_bias=False,
                          qkv_bias=False, detach_sos=detach_sos)
