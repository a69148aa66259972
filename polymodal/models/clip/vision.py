"""CLIP's vision transformer image tower.

Bias-free patchifying conv, a class token, learned positions, ``ln_pre``, pre-norm blocks with
QuickGELU (through the block seam), ``ln_post`` on the class token, and a linear projection
into the joint embedding space (Radford et al. 2021, section 2.4).

Params (the patch embedding is the core :class:`~polymodal.core.layers.PatchEmbedding`, so its
names are TorchMultimodal's; ``convert.py`` maps OpenAI's ``conv1`` / ``class_embedding`` /
``positional_embedding``)::

    embeddings: {cls_token (1, 1, D), conv_projection: {weight (D, 3, P, P)}, position_embeddings (1, 1 + N, D)}
    ln_pre, ln_post: {weight, bias}
    transformer: {layers: [torch.nn.TransformerEncoderLayer names] * L}
    proj: (D, E)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from ...core import random as pr
from ...core.layers.norm import LayerNorm
from ...core.layers.patch import PatchEmbedding
from ...core.layers.pooling import cls_pool
from ...core.layers.transformer import TransformerEncoder, TransformerEncoderLayer
from ...core.pytree import Params
from ...core.spec import Spec, check_floating
from .config import VisionTransformerConfig

__all__ = ["VisionTransformer", "check_images"]


def check_images(owner: str, images: Tensor, size: int) -> None:
    """``images`` must be a float ``(B, 3, size, size)``; the error names expected and got."""
    check_floating(images, f"{owner}: images")
    if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
        raise ValueError(f"{owner}: images: expected shape (B, 3, {size}, {size}), got {tuple(images.shape)}")


def clip_blocks(c, is_causal: bool = False) -> TransformerEncoder:
    """CLIP's pre-norm block stack for a tower config (width, heads, mlp_width, activation,
    layer_norm_eps, layers); the text tower's is causal."""
    layer = TransformerEncoderLayer(c.width, c.heads, dim_feedforward=c.mlp_width, activation=c.activation,
                                    norm_first=True, layer_norm_eps=c.layer_norm_eps, is_causal=is_causal)
    return TransformerEncoder(layer, c.layers)


@dataclass(frozen=True)
class VisionTransformer(Spec):
    """CLIP ViT: ``images (B, 3, S, S) -> (B, embed_dim)`` (unnormalised features).

    Initialisation is OpenAI's: class token, positions and projection ``N(0, D**-0.5)``; the
    patch conv and the blocks keep torch's defaults (as OpenAI's ``VisionTransformer``).

    >>> import torch
    >>> from polymodal.core import random as pr
    >>> vit = VisionTransformer(VisionTransformerConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4), 32)
    >>> vit(vit.init(key=pr.key(0)), torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 32])
    """

    config: VisionTransformerConfig = field(default_factory=VisionTransformerConfig)  # the architecture
    embed_dim: int = 512  # output size (the joint embedding)

    def embeddings(self) -> PatchEmbedding:
        c = self.config
        return PatchEmbedding(
            image_size=c.image_size, patch_size=c.patch_size, num_channels=3, hidden_size=c.width, conv_bias=False,
            include_cls_token=True, position="learned", patch_drop_rate=c.patch_dropout or None,
        )

    def norm(self) -> LayerNorm:
        return LayerNorm(self.config.width, eps=self.config.layer_norm_eps)

    def transformer(self) -> TransformerEncoder:
        return clip_blocks(self.config)

    def block_stacks(self) -> list[str]:
        return [f"transformer.{s}" for s in self.transformer().block_stacks()]

    def init(self, *, key: Tensor) -> Params:
        c = self.config
        k_conv, k_cls, k_pos, k_tr, k_proj = pr.split(key, 5)
        scale = c.width**-0.5
        n = c.grid * c.grid
        conv = self.embeddings().conv().init(key=k_conv)  # torch's default conv init, as OpenAI
        return {
            "embeddings": {
                "cls_token": pr.normal(k_cls, (1, 1, c.width)) * scale,
                "conv_projection": {"weight": conv["weight"]},
                "position_embeddings": pr.normal(k_pos, (1, n + 1, c.width)) * scale,
            },
            "ln_pre": self.norm().init(key=key),
            "transformer": self.transformer().init(key=k_tr),
            "ln_post": self.norm().init(key=key),
            "proj": pr.normal(k_proj, (c.width, self.embed_dim)) * scale,
        }

    def features(self, params: Params, images: Tensor, *, key: Tensor | None = None,
                 select: int | None = None) -> Tensor:
        """The final hidden states before ``ln_post``: ``(B, 1 + N_kept, D)`` (``key``: patch dropout);
        with ``select`` the last block computes that position only: ``(B, 1, D)``."""
        check_images(type(self).__name__, images, self.config.image_size)
        x = self.embeddings()(params["embeddings"], images, key=key).embeddings
        x = self.norm()(params["ln_pre"], x)
        return self.transformer()(params["transformer"], x, select=select).last_hidden_state

    def __call__(self, params: Params, images: Tensor, *, key: Tensor | None = None) -> Tensor:
        """``images (B, 3, S, S)`` -> ``(B, embed_dim)``; ``key`` enables patch dropout (if configured)."""
        x = self.features(params, images, key=key, select=0)  # only the class token: what ln_post reads
        return self.norm()(params["ln_post"], cls_pool(x)) @ params["proj"]
