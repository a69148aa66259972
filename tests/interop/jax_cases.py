"""Every core layer spec (and the Swin3D and BERT-family encoders) as ``fn(params, *inputs)``
with small example inputs: the cases the JAX translation is checked on, spec by spec (CLIP is built
in the tests)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from polymodal.core import layers as L
from polymodal.core import random as pr
from polymodal.core.encoders.bert_heads import MaskedLMHead, SequenceClassificationHead
from polymodal.core.encoders.swin3d import PatchEmbed3d, PatchMerging, SwinTransformerBlock3d, swin3d
from polymodal.core.encoders.text import text_transformer
from polymodal.core.encoders.vit import vision_transformer
from polymodal.core.losses import ContrastiveLoss
from polymodal.models.bert import bert_base_uncased, distilbert_base_uncased, roberta_base


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


# The BERT family's published layouts at a small width (2 layers, width 32: full size is too slow on CPU).
BERT_SMALL = dict(vocab_size=50, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                  max_position_embeddings=16)


def bert_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask`` (row 0 padded at its end, id 0 = BERT's pad) and
    ``token_type_ids`` (segments A and B), each ``(2, 6)``."""
    ids = torch.tensor([[2, 5, 7, 9, 3, 0], [2, 4, 8, 3, 6, 11]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    types = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 1, 1]])
    return ids, mask, types


def bert_cases() -> list[Case]:
    """The BERT family's encoders (``polymodal.models.bert`` builders, small width): BERT with an
    attention mask and token types; RoBERTa (positions counted from ``pad_token_id + 1`` by a
    cumulative sum, padding id 1 masked from the ids); DistilBERT (no token types, no pooler). The
    two variants differ from BERT outside the blocks: one block each keeps the compile short."""
    ids, mask, types = bert_inputs()
    roberta_ids = torch.where(mask.bool(), ids + 2, torch.ones_like(ids))  # 1: RoBERTa's padding id
    one_block = BERT_SMALL | dict(num_layers=1)
    return [
        _spec("BERT", bert_base_uncased(**BERT_SMALL), ids, mask, types),
        _spec("RoBERTa", roberta_base(**one_block), roberta_ids),
        _spec("DistilBERT", distilbert_base_uncased(**one_block), ids, mask),
    ]


CLASS_WEIGHTS = torch.tensor([0.5, 1.0, 2.0, 1.5, 0.75])  # a constant of the exported graph


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
        _spec("Embedding-padding_idx", L.Embedding(10, 6, padding_idx=0), torch.tensor([[0, 3, 0], [5, 0, 3]])),
        _spec("MLP", L.MLP(8, 4, hidden_dims=(16,), activation="gelu", norm="layer_norm"), x3),
        _spec("MLP-silu", L.MLP(8, 4, hidden_dims=(16, 12), activation="silu"), x3),
        _spec("LayerNorm", L.LayerNorm(8), x3),
        _spec("LayerNorm-fp32", L.LayerNorm(8, fp32=True, bias=False), x3),
        _spec("RMSNorm", L.RMSNorm(8), x3),
        _spec("GroupNorm", L.GroupNorm(2, 4), img),
        _stateful("BatchNorm2d-eval", bn, img),
        _stateful("BatchNorm2d-train", bn, img, training=True),
        _stateful("BatchNorm1d-eval", L.BatchNorm1d(5), x3.transpose(1, 2)[:, :5, :]),
        _stateful("BatchNorm3d-train", L.BatchNorm3d(4), _g(2, 4, 2, 3, 3), training=True),
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
        _spec("TransformerEncoder-cross-every-2-pos", L.TransformerEncoder(
            L.TransformerEncoderLayer(8, 2, dim_feedforward=16, dim_kv=6), 2, cross_attention_every=2),
            x3, memory=_g(2, 3, 6), pos=_g(2, 5, 8, seed=4)),
        _stateful("Codebook-eval", L.Codebook(6, 4), img),
        _spec("ContrastiveLoss", ContrastiveLoss(), _g(4, 8), _g(4, 8, seed=5)),
        Case("cross_entropy-weighted-ignore-smoothed", lambda x, t: torch.nn.functional.cross_entropy(
            x, t, weight=CLASS_WEIGHTS, ignore_index=2, label_smoothing=0.1),
             (_g(6, 5, seed=7), torch.tensor([0, 2, 4, 1, 2, 3]))),
        Case("cross_entropy-none-2d", lambda p, x, t: torch.nn.functional.cross_entropy(x * p["s"], t, reduction="none"),
             ({"s": torch.tensor(1.5)}, _g(2, 4, 3, seed=8), torch.tensor([[0, 3, 1], [2, 2, 0]]))),
        _spec("MaskedLMHead", MaskedLMHead(8, 10), x3, _g(10, 8, seed=6)),
        _spec("SequenceClassificationHead", SequenceClassificationHead(8, 3), _g(2, 8)),
    ]


def encoder_cases() -> list[Case]:
    """The shared ViT and text transformer, the Swin3D pieces and encoder, and the BERT family's encoders."""
    return [
        _spec("VisionTransformer-cls", vision_transformer(image_size=8, patch_size=4, width=8, layers=2, heads=2),
              _g(2, 3, 8, 8)),
        _spec("VisionTransformer-map-postnorm", vision_transformer(image_size=8, patch_size=4, width=8, layers=1,
                                                                   heads=2, pool="map", norm_first=False),
              _g(2, 3, 8, 8)),
        _spec("TextTransformer-causal-eot", text_transformer(vocab_size=20, context_length=6, width=8, layers=2,
                                                             heads=2), _ids(20, 2, 6)),
        _spec("TextTransformer-mean-padded", text_transformer(vocab_size=20, context_length=6, width=8, layers=1,
                                                              heads=2, causal=False, pool="mean", pad_id=0),
              torch.tensor([[3, 5, 7, 0, 0, 0], [4, 6, 8, 9, 2, 1]])),
        _spec("PatchEmbed3d", PatchEmbed3d(in_channels=3, embed_dim=8), _g(1, 3, 4, 8, 8)),
        _spec("PatchMerging", PatchMerging(8), _g(1, 2, 4, 4, 8)),
        _spec("SwinTransformerBlock3d", SwinTransformerBlock3d(8, 2, window_size=(2, 2, 2), shift_size=(1, 1, 1)),
              _g(1, 2, 4, 4, 8)),
        _spec("Swin3D", swin3d(embed_dim=8, depths=(2, 1), num_heads=(1, 2), window_size=(2, 2, 2), num_classes=5),
              _g(1, 3, 4, 16, 16)),
        *bert_cases(),
    ]
