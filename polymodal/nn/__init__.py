"""``torch.nn.Module`` shells over the core specs (one generic mechanism: :class:`Shell`).

Layers are listed here; model families are not: ``polymodal.nn.build("clip_vit_b32")`` (alias
``Model``) builds the shell of any registered builder, and ``polymodal.nn.<SpecClass>`` (``CLIP``,
``MultimodalGPT``, ...) is found through the family registry (:mod:`.family`) on first use.
"""

from ..core import layers as _L
from .family import FamilyShell, Model, build, spec_shell
from .shell import Shell, shell_class

Linear = shell_class(_L.Linear)
Embedding = shell_class(_L.Embedding)
LayerNorm = shell_class(_L.LayerNorm)
RMSNorm = shell_class(_L.RMSNorm)
GroupNorm = shell_class(_L.GroupNorm)
MLP = shell_class(_L.MLP)
Dropout = shell_class(_L.Dropout)
DropPath = shell_class(_L.DropPath)

__all__ = ["Shell", "shell_class", "FamilyShell", "Model", "build", "spec_shell", "Linear", "Embedding", "LayerNorm", "RMSNorm", "GroupNorm", "MLP", "Dropout", "DropPath"]

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
Swin3D = spec_shell(_swin3d.Swin3D)  # also a family's model: the same class build("swin3d_t") gives
__all__ += ["ShiftedWindowAttention3d", "PatchEmbed3d", "PatchMerging", "SwinTransformerBlock3d", "Swin3D"]

MultiHeadAttention = shell_class(_L.MultiHeadAttention)
__all__ += ["MultiHeadAttention"]


TransformerEncoderLayer = shell_class(_L.TransformerEncoderLayer)
TransformerDecoderLayer = shell_class(_L.TransformerDecoderLayer)
TransformerEncoder = shell_class(_L.TransformerEncoder)
TransformerDecoder = shell_class(_L.TransformerDecoder)
AttentionPooler = shell_class(_L.AttentionPooler)
CascadedAttentionPooler = shell_class(_L.CascadedAttentionPooler)
__all__ += ["TransformerEncoderLayer", "TransformerDecoderLayer", "TransformerEncoder", "TransformerDecoder",
            "AttentionPooler", "CascadedAttentionPooler"]


def __getattr__(name: str):
    """A family's shell by its spec class name (``CLIP``, ``MultimodalGPT``, ...), found once."""
    from .family import find_shell

    if name.startswith("_") or (shell := find_shell(name)) is None:
        raise AttributeError(f"module 'polymodal.nn' has no attribute {name!r}")
    globals()[name] = shell
    return shell
