"""Every core layer spec (and the CLIP, Swin3D and BERT-layout encoders) as ``fn(params, *inputs)``
with small example inputs: the cases the JAX translation is checked on, spec by spec."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from polymodal.core import layers as L
from polymodal.core import random as pr
from polymodal.core.encoders.swin3d import PatchMerging, SwinTransformerBlock3d, swin3d


class Case(NamedTuple):
    name: str
    fn: Callable  # fn(params, *inputs) -> tensors
    args: tuple  # (params, *inputs)


def _g(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _ids(high: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(1))


def _spec(name: str, spec: Any, *inputs: Any, **kwargs: Any) -> Case:
    params = spec.init(key=pr.key(len(name)))
    return Case(name, lambda p, *xs: spec(p, *xs, **kwargs), (params, *inputs))


def _stateful(name: str, spec: Any, x: torch.Tensor, **kwargs: Any) -> Case:
    params = spec.init(key=pr.key(3))
    return Case(name, lambda p, x, s: spec(p, x, s, **kwargs), (params, x, spec.init_state()))


def bert_layout_encoder(width: int = 64, layers: int = 2, heads: int = 4) -> L.TransformerEncoder:
    """BERT's encoder layout (post-norm, GELU, 4x feed-forward, LayerNorm eps 1e-12) at a small
    width (BERT-base is 768 x 12; tests use this small width to stay CPU-fast)."""
    layer = L.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, activation="gelu", norm_first=False,
                                      layer_norm_eps=1e-12)
    return L.TransformerEncoder(layer, layers)


def layer_cases() -> list[Case]:
    """One or more cases per layer spec in ``polymodal.core.layers``."""
    x3 = _g(2, 5, 8)
    img = _g(2, 4, 6, 6)
    mha = L.MultiHeadAttention(8, 2)
    swa = L.ShiftedWindowAttention3d(8, 2, window_size=(2, 2, 2), shift_size=(1, 1, 1))
    pooler = L.AttentionPooler(8, 8, 2, num_queries=3)
    enc_layer = L.TransformerEncoderLayer(8, 2, dim_feedforward=16, activation="gelu")
    dec_layer = L.TransformerDecoderLayer(8, 2, dim_feedforward=16, norm_first=True)
    bn = L.BatchNorm2d(4)
    return [
        _spec("Linear", L.Linear(8, 4), x3),
        _spec("Identity", L.Identity(), x3),
        _spec("Embedding", L.Embedding(10, 6), _ids(10, 2, 5)),
        _spec("MLP", L.MLP(8, 4, hidden_dims=(16,), activation="gelu", norm="layer_norm"), x3),
        _spec("MLP-silu", L.MLP(8, 4, hidden_dims=(16, 12), activation="silu"), x3),
        _spec("LayerNorm", L.LayerNorm(8), x3),
        _spec("LayerNorm-fp32", L.LayerNorm(8, fp32=True, bias=False), x3),
        _spec("RMSNorm", L.RMSNorm(8), x3),
        _spec("GroupNorm", L.GroupNorm(2, 4), img),
        _stateful("BatchNorm2d-eval", bn, img),
        _stateful("BatchNorm2d-train", bn, img, training=True),
        _stateful("BatchNorm1d-eval", L.BatchNorm1d(5), x3.transpose(1, 2)[:, :5, :]),
        _spec("Conv1d", L.Conv1d(8, 6, 3, stride=2, padding=1), x3.transpose(1, 2)),
        _spec("Conv2d", L.Conv2d(4, 6, 3, padding=1, dilation=1, groups=2), img),
        _spec("Conv2d-reflect", L.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), img),
        _spec("Conv2d-stride-dilation", L.Conv2d(4, 2, 2, stride=2, dilation=2, bias=False), img),
        _spec("Conv3d", L.Conv3d(4, 2, (1, 2, 2), stride=(1, 2, 2)), _g(1, 4, 2, 4, 4)),
        _spec("ConvTranspose1d", L.ConvTranspose1d(8, 4, 3, stride=2, padding=1, output_padding=1), x3.transpose(1, 2)),
        _spec("ConvTranspose2d", L.ConvTranspose2d(4, 6, 3, stride=2, groups=2), img),
        _spec("ConvTranspose3d", L.ConvTranspose3d(4, 2, 2, stride=2), _g(1, 4, 2, 3, 3)),
        _spec("SamePadConv3d", L.SamePadConv3d(4, 3, 3, stride=2), _g(1, 4, 3, 4, 4)),
        _spec("SamePadConvTranspose3d", L.SamePadConvTranspose3d(4, 3, 4, stride=2), _g(1, 4, 2, 3, 3)),
        _spec("Dropout-eval", L.Dropout(0.5), x3),
        _spec("DropPath-eval", L.DropPath(0.5), x3),
        _spec("PatchEmbedding", L.PatchEmbedding(image_size=8, patch_size=4, num_channels=4, hidden_size=8), _g(2, 4, 8, 8)),
        _spec("AttentionPooler", pooler, x3),
        _spec("CascadedAttentionPooler", L.CascadedAttentionPooler((pooler, L.AttentionPooler(8, 8, 2, num_queries=1))),
              x3),
        _spec("LearnedPositionEmbedding", L.LearnedPositionEmbedding(10, 8), x3),
        _spec("BroadcastedPositionEmbedding", L.BroadcastedPositionEmbedding((2, 3), 6)),
        _spec("MultiHeadAttention", mha, x3),
        _spec("MultiHeadAttention-cross-causal", L.MultiHeadAttention(8, 2, dim_kv=6, is_causal=True), x3, _g(2, 5, 6)),
        _spec("MultiHeadAttention-padding", mha, x3, key_padding_mask=torch.tensor([[False] * 4 + [True]] * 2)),
        _spec("MultiHeadAttention-gqa", L.MultiHeadAttention(8, 4, num_kv_heads=2, fused_qkv=False), x3),
        _spec("ShiftedWindowAttention3d", swa, _g(1, 2, 4, 4, 8)),
        _spec("TransformerEncoderLayer", enc_layer, x3),
        _spec("TransformerEncoder-prenorm", L.TransformerEncoder(
            L.TransformerEncoderLayer(8, 2, dim_feedforward=16, norm_first=True, activation="quick_gelu"), 2,
            final_norm=True), x3),
        _spec("TransformerDecoderLayer", dec_layer, x3, _g(2, 3, 8)),
        _spec("TransformerDecoder", L.TransformerDecoder(dec_layer, 2), x3, _g(2, 3, 8)),
        _stateful("Codebook-eval", L.Codebook(6, 4), img),
    ]


def encoder_cases() -> list[Case]:
    """The Swin3D pieces and encoder, and a BERT-layout encoder (CLIP is built in the tests)."""
    bert = bert_layout_encoder()
    mask = torch.tensor([[False] * 7 + [True]] * 2)
    return [
        _spec("PatchMerging", PatchMerging(8), _g(1, 2, 4, 4, 8)),
        _spec("SwinTransformerBlock3d", SwinTransformerBlock3d(8, 2, window_size=(2, 2, 2), shift_size=(1, 1, 1)),
              _g(1, 2, 4, 4, 8)),
        _spec("Swin3D", swin3d(embed_dim=8, depths=(2, 1), num_heads=(1, 2), window_size=(2, 2, 2), num_classes=5),
              _g(1, 3, 4, 16, 16)),
        _spec("BERT-layout encoder", bert, _g(2, 8, 64), key_padding_mask=mask),
    ]
