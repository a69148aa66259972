"""MDETR's pieces between the encoders: 2-D sine position embeddings, the text feature resizer and the
DETR transformer over the concatenated image and text tokens (Kamath et al. 2021, Section 2.2).

The transformer is 6 post-norm encoder layers over ``[image tokens; text tokens]`` (the sine position
embedding added to the queries and keys of the image tokens only) and 6 post-norm decoder layers whose
object queries attend to each other and to that memory (the learnt query embedding added to queries
and self-attention keys, the image positions to the memory keys), with one LayerNorm applied to every
decoder layer's output (DETR's auxiliary outputs). Params follow TorchMultimodal's
``MDETRTransformer`` up to the per-layer names, which are torch.nn's (``linear1``, ``norm2``, ...):
``models/mdetr/convert.py`` maps them.

>>> import torch
>>> from polymodal.core import random as pr
>>> t = mdetr_transformer(d_model=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=32)
>>> out = t(t.init(key=pr.key(0)), torch.ones(1, 16, 2, 3), torch.zeros(1, 2, 3, dtype=torch.bool),
...         torch.ones(4, 16), torch.ones(1, 16, 2, 3), torch.ones(1, 5, 16), torch.zeros(1, 5, dtype=torch.bool))
>>> out.decoder_hidden_states.shape, out.text_memory.shape
(torch.Size([2, 1, 4, 16]), torch.Size([1, 5, 16]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ...core import random as pr
from ...core.layers.dropout import dropout as apply_dropout
from ...core.layers.linear import Linear
from ...core.layers.norm import LayerNorm
from ...core.layers.transformer import TransformerDecoder, TransformerEncoder
from ...core.layers.transformer_layer import TransformerDecoderLayer, TransformerEncoderLayer
from ...core.pytree import Params, flatten, unflatten
from ...core.spec import Spec, check_floating, check_last_dim

__all__ = ["sine_position_embedding_2d", "FeatureResizer", "MDETRTransformer", "MDETRTransformerOutput",
           "mdetr_transformer"]


def sine_position_embedding_2d(mask: Tensor, num_pos_feats: int = 128, temperature: float = 10000.0,
                               scale: float | None = 2 * math.pi) -> Tensor:
    """DETR's sine embedding of the unpadded pixels: ``mask (B, H, W)`` bool (True = padding) ->
    ``(B, 2 * num_pos_feats, H, W)`` float32, the y half first. ``scale`` normalises the cumulative
    coordinates to ``[0, scale]`` (None: raw pixel counts), as TorchMultimodal's ``PositionEmbedding2D``."""
    if mask.dim() != 3 or mask.dtype != torch.bool:
        raise ValueError(f"sine_position_embedding_2d: mask: expected a bool tensor (B, H, W), got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    not_mask = ~mask
    y = not_mask.cumsum(1, dtype=torch.float32)
    x = not_mask.cumsum(2, dtype=torch.float32)
    if scale is not None:
        y = y / (y[:, -1:, :] + 1e-6) * scale
        x = x / (x[:, :, -1:] + 1e-6) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    px, py = x[..., None] / dim_t, y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2)


@dataclass(frozen=True)
class FeatureResizer(Spec):
    """``(*, in_dim) -> (*, out_dim)``: linear, LayerNorm (eps 1e-12), dropout; params ``fc``, ``layer_norm``."""

    in_dim: int  # text encoder width (RoBERTa-base: 768)
    out_dim: int  # transformer width
    dropout: float = 0.1  # dropout on the output (with a call key)

    def init(self, *, key: Tensor) -> Params:
        return {"fc": Linear(self.in_dim, self.out_dim).init(key=key),
                "layer_norm": LayerNorm(self.out_dim, eps=1e-12).init(key=key)}

    def __call__(self, params: Params, x: Tensor, *, key: Tensor | None = None) -> Tensor:
        x = LayerNorm(self.out_dim, eps=1e-12)(params["layer_norm"], Linear(self.in_dim, self.out_dim)(params["fc"], x))
        return apply_dropout(x, self.dropout, key=key)


class MDETRTransformerOutput(NamedTuple):
    """``decoder_hidden_states (L, B, Q, D)``: every decoder layer's output after the shared LayerNorm;
    ``text_memory (B, T, D)``: the encoder's output at the text positions."""

    decoder_hidden_states: Tensor
    text_memory: Tensor


def _xavier(params: Params, key: Tensor) -> Params:
    """Every matrix Xavier-uniform (DETR's ``_reset_parameters``); vectors kept."""
    flat = flatten(params)
    out = {}
    for i, (k, v) in enumerate(flat.items()):
        if v.dim() > 1:
            a = math.sqrt(6.0 / (v.shape[0] + v[0].numel()))
            out[k] = (pr.uniform(pr.fold_in(key, i), tuple(v.shape)) * 2 - 1).to(v.dtype) * a
        else:
            out[k] = v
    return unflatten(out)


@dataclass(frozen=True)
class MDETRTransformer(Spec):
    """See the module docstring. ``__call__(params, image_embeddings (B, D, H, W), image_mask (B, H, W) bool,
    query_embed (Q, D), pos_embed (B, D, H, W), text_memory (B, T, D), text_padding_mask (B, T) bool, *, key)``
    -> :class:`MDETRTransformerOutput` (masks: True = padding)."""

    encoder: TransformerEncoder  # post-norm, relu layers with DETR's pos
    decoder: TransformerDecoder  # non-causal post-norm layers, final_norm=True (shared by every layer's output)

    @property
    def d_model(self) -> int:
        return self.encoder.layer.d_model

    def init(self, *, key: Tensor) -> Params:
        ke, kd, kx = pr.split(key, 3)
        return _xavier({"encoder": self.encoder.init(key=ke), "decoder": self.decoder.init(key=kd)}, kx)

    def __call__(self, params: Params, image_embeddings: Tensor, image_mask: Tensor, query_embed: Tensor,
                 pos_embed: Tensor, text_memory: Tensor, text_padding_mask: Tensor, *,
                 key: Tensor | None = None) -> MDETRTransformerOutput:
        check_floating(image_embeddings, "image_embeddings", self)
        check_last_dim(text_memory, "text_memory", self.d_model, self)
        if image_embeddings.dim() != 4 or image_embeddings.shape[1] != self.d_model:
            raise ValueError(f"MDETRTransformer: image_embeddings: expected (B, {self.d_model}, H, W), got "
                             f"{tuple(image_embeddings.shape)}")
        b, t = image_embeddings.shape[0], text_memory.shape[1]
        img = image_embeddings.flatten(2).transpose(1, 2)  # (B, HW, D)
        pos = pos_embed.flatten(2).transpose(1, 2).to(img.dtype)
        memory = torch.cat([img, text_memory], dim=1)
        pad = torch.cat([image_mask.flatten(1), text_padding_mask], dim=1)
        pos = torch.cat([pos, torch.zeros_like(text_memory)], dim=1)  # no positions on text tokens
        ke, kd = pr.maybe_split(key, 2)
        memory = self.encoder(params["encoder"], memory, key_padding_mask=pad, pos=pos, key=ke).last_hidden_state
        query_pos = query_embed.unsqueeze(0).expand(b, -1, -1)
        out = self.decoder(params["decoder"], torch.zeros_like(query_pos), memory, memory_key_padding_mask=pad,
                           pos=pos, query_pos=query_pos, return_hidden_states=True, key=kd)
        norm = self.decoder.layer._norm()
        hs = torch.stack([norm(params["decoder"]["norm"], h) for h in out.hidden_states[1:]])
        return MDETRTransformerOutput(hs, memory[:, memory.shape[1] - t:])


def mdetr_transformer(d_model: int = 256, num_heads: int = 8, num_encoder_layers: int = 6,
                      num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1
                      ) -> MDETRTransformer:
    """DETR's transformer as MDETR configures it (Kamath et al. 2021, Section 3: 6 + 6 layers, width 256,
    8 heads, feed-forward 2048, dropout 0.1)."""
    kw = dict(dim_feedforward=dim_feedforward, dropout=dropout, attn_dropout=dropout, activation="relu")
    enc = TransformerEncoderLayer(d_model, num_heads, **kw)
    dec = TransformerDecoderLayer(d_model, num_heads, is_causal=False, **kw)
    return MDETRTransformer(TransformerEncoder(enc, num_encoder_layers),
                            TransformerDecoder(dec, num_decoder_layers, final_norm=True))
