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
from .attention import AttentionOutput, MultiHeadAttention, attention, merge_heads, split_heads
from .attention_kernel import sdpa

__all__ += ["AttentionOutput", "MultiHeadAttention", "attention", "merge_heads", "split_heads", "sdpa"]
