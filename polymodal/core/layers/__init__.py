"""Basic layer specs (see ``polymodal.core.spec`` for the contract)."""

from .activation import ACTIVATIONS, activation, geglu, gelu, quick_gelu, silu
from .dropout import Dropout, DropPath, drop_path, dropout
from .embedding import Embedding
from .linear import Identity, Linear
from .mlp import MLP
from .norm import GroupNorm, LayerNorm, RMSNorm

__all__ = [
    "ACTIVATIONS", "activation", "geglu", "gelu", "quick_gelu", "silu",
    "Dropout", "DropPath", "drop_path", "dropout",
    "Embedding", "Identity", "Linear", "MLP",
    "GroupNorm", "LayerNorm", "RMSNorm",
]
from .codebook import Codebook, CodebookOutput

__all__ += ["Codebook", "CodebookOutput"]
from .batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .conv import (
    Conv, Conv1d, Conv2d, Conv3d, ConvTranspose, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d,
    SamePadConv3d, SamePadConvTranspose3d, same_padding, same_transpose_padding,
)
from .patch import PatchEmbedding, PatchEmbeddingOutput, RandomMaskingOutput, random_masking, random_masking_2d
from .position import (
    BroadcastedPositionEmbedding, LearnedPositionEmbedding, decode_idx, sincos_1d, sincos_2d, sincos_3d,
    timestep_embedding,
)

__all__ += [
    "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "Conv", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
    "SamePadConv3d", "SamePadConvTranspose3d", "same_padding", "same_transpose_padding",
    "PatchEmbedding", "PatchEmbeddingOutput", "RandomMaskingOutput", "random_masking", "random_masking_2d",
    "BroadcastedPositionEmbedding", "LearnedPositionEmbedding", "decode_idx", "sincos_1d", "sincos_2d", "sincos_3d",
    "timestep_embedding",
]
from .attention import AttentionOutput, MultiHeadAttention, attention, merge_heads, split_heads
from .attention_kernel import sdpa

__all__ += ["AttentionOutput", "MultiHeadAttention", "attention", "merge_heads", "split_heads", "sdpa"]
