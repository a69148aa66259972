"""Layer specs and the functions behind them (see ``polymodal.core.spec`` for the contract)."""

from .activation import ACTIVATIONS, activation, geglu, gelu, quick_gelu, silu
from .attention import AttentionOutput, MultiHeadAttention, attention, merge_heads, split_heads
from .attention_kernel import sdpa
from .batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d
from .codebook import Codebook, CodebookOutput
from .conv import (
    Conv, Conv1d, Conv2d, Conv3d, ConvTranspose, ConvTranspose1d, ConvTranspose2d, ConvTranspose3d,
    SamePadConv3d, SamePadConvTranspose3d, same_padding, same_transpose_padding,
)
from .dropout import Dropout, DropPath, drop_path, dropout
from .embedding import Embedding
from .linear import Identity, Linear
from .linear_kernel import frozen_weights
from .mlp import MLP
from .norm import GroupNorm, LayerNorm, RMSNorm
from .patch import PatchEmbedding, PatchEmbeddingOutput, RandomMaskingOutput, random_masking, random_masking_2d
from .pooling import AttentionPooler, CascadedAttentionPooler, cls_pool, eot_pool, mean_pool
from .position import (
    BroadcastedPositionEmbedding, LearnedPositionEmbedding, decode_idx, sincos_1d, sincos_2d, sincos_3d,
    timestep_embedding,
)
from .seam import checkpoint_policy, compose, run_layers, use_policy
from .transformer import (
    TransformerDecoder, TransformerDecoderLayer, TransformerEncoder, TransformerEncoderLayer, TransformerOutput,
)
from .window import ShiftedWindowAttention3d

__all__ = [
    "ACTIVATIONS", "activation", "geglu", "gelu", "quick_gelu", "silu",
    "AttentionOutput", "MultiHeadAttention", "attention", "merge_heads", "split_heads", "sdpa",
    "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "Codebook", "CodebookOutput",
    "Conv", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
    "SamePadConv3d", "SamePadConvTranspose3d", "same_padding", "same_transpose_padding",
    "Dropout", "DropPath", "drop_path", "dropout",
    "Embedding", "Identity", "Linear", "MLP", "frozen_weights",
    "GroupNorm", "LayerNorm", "RMSNorm",
    "PatchEmbedding", "PatchEmbeddingOutput", "RandomMaskingOutput", "random_masking", "random_masking_2d",
    "AttentionPooler", "CascadedAttentionPooler", "cls_pool", "eot_pool", "mean_pool",
    "BroadcastedPositionEmbedding", "LearnedPositionEmbedding", "decode_idx", "sincos_1d", "sincos_2d", "sincos_3d",
    "timestep_embedding",
    "checkpoint_policy", "compose", "run_layers", "use_policy",
    "TransformerDecoder", "TransformerDecoderLayer", "TransformerEncoder", "TransformerEncoderLayer",
    "TransformerOutput",
    "ShiftedWindowAttention3d",
]
