"""``torch.nn.Module`` shells over the core specs (one generic mechanism: :class:`Shell`)."""

from ..core import layers as _L
from .shell import Shell, shell_class

Linear = shell_class(_L.Linear)
Embedding = shell_class(_L.Embedding)
LayerNorm = shell_class(_L.LayerNorm)
RMSNorm = shell_class(_L.RMSNorm)
GroupNorm = shell_class(_L.GroupNorm)
MLP = shell_class(_L.MLP)
Dropout = shell_class(_L.Dropout)
DropPath = shell_class(_L.DropPath)

__all__ = ["Shell", "shell_class", "Linear", "Embedding", "LayerNorm", "RMSNorm", "GroupNorm", "MLP", "Dropout", "DropPath"]

from ..core import losses as _losses  # noqa: E402

Codebook = shell_class(_L.Codebook)
ContrastiveLoss = shell_class(_losses.ContrastiveLoss)
__all__ += ["Codebook", "ContrastiveLoss"]

BatchNorm = shell_class(_L.BatchNorm)
BatchNorm1d = shell_class(_L.BatchNorm1d)
BatchNorm2d = shell_class(_L.BatchNorm2d)
BatchNorm3d = shell_class(_L.BatchNorm3d)
Conv = shell_class(_L.Conv)
Conv1d = shell_class(_L.Conv1d)
Conv2d = shell_class(_L.Conv2d)
Conv3d = shell_class(_L.Conv3d)
ConvTranspose1d = shell_class(_L.ConvTranspose1d)
ConvTranspose2d = shell_class(_L.ConvTranspose2d)
ConvTranspose3d = shell_class(_L.ConvTranspose3d)
SamePadConv3d = shell_class(_L.SamePadConv3d)
SamePadConvTranspose3d = shell_class(_L.SamePadConvTranspose3d)
PatchEmbedding = shell_class(_L.PatchEmbedding)
LearnedPositionEmbedding = shell_class(_L.LearnedPositionEmbedding)
BroadcastedPositionEmbedding = shell_class(_L.BroadcastedPositionEmbedding)
__all__ += [
    "BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "Conv", "Conv1d", "Conv2d", "Conv3d",
    "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "SamePadConv3d", "SamePadConvTranspose3d",
    "PatchEmbedding", "LearnedPositionEmbedding", "BroadcastedPositionEmbedding",
]

from ..core.encoders import swin3d as _swin3d  # noqa: E402
from ..core.layers import window as _window  # noqa: E402

ShiftedWindowAttention3d = shell_class(_window.ShiftedWindowAttention3d)
PatchEmbed3d = shell_class(_swin3d.PatchEmbed3d)
PatchMerging = shell_class(_swin3d.PatchMerging)
SwinTransformerBlock3d = shell_class(_swin3d.SwinTransformerBlock3d)
Swin3D = shell_class(_swin3d.Swin3D)
__all__ += ["ShiftedWindowAttention3d", "PatchEmbed3d", "PatchMerging", "SwinTransformerBlock3d", "Swin3D"]

MultiHeadAttention = shell_class(_L.MultiHeadAttention)
__all__ += ["MultiHeadAttention"]

from ..models.gpt import MultimodalGPT as _MultimodalGPT  # noqa: E402

MultimodalGPT = shell_class(_MultimodalGPT)
__all__ += ["MultimodalGPT"]

from .clip import CLIP, CLIPModifiedResNet, CLIPTextTransformer, CLIPVisionTransformer  # noqa: E402

__all__ += ["CLIP", "CLIPVisionTransformer", "CLIPModifiedResNet", "CLIPTextTransformer"]

TransformerEncoderLayer = shell_class(_L.TransformerEncoderLayer)
TransformerDecoderLayer = shell_class(_L.TransformerDecoderLayer)
TransformerEncoder = shell_class(_L.TransformerEncoder)
TransformerDecoder = shell_class(_L.TransformerDecoder)
AttentionPooler = shell_class(_L.AttentionPooler)
CascadedAttentionPooler = shell_class(_L.CascadedAttentionPooler)
__all__ += ["TransformerEncoderLayer", "TransformerDecoderLayer", "TransformerEncoder", "TransformerDecoder",
            "AttentionPooler", "CascadedAttentionPooler"]
