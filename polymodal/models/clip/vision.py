"""CLIP's vision transformer image tower: a thin wrapper over the shared ViT.

The shared :class:`~polymodal.core.encoders.vit.VisionTransformer` gives the bias-free
patchifying conv, the class token, the learned positions and the pre-norm QuickGELU blocks
(through the block seam); CLIP adds ``ln_pre`` before the blocks, ``ln_post`` on the class token,
a linear projection into the joint embedding space and OpenAI's initialisation (Radford et al.
2021, section 2.4). Params (the shared encoder's ``embeddings`` / ``transformer`` at the top
level; ``convert.py`` maps OpenAI's ``conv1`` / ``class_embedding`` / ``positional_embedding``)::

    embeddings: {cls_token (1, 1, D), conv_projection: {weight (D, 3, P, P)}, position_embeddings (1, 1 + N, D)}
    ln_pre, ln_post: {weight, bias}
    transformer: {layers: [torch.nn.TransformerEncoderLayer names] * L}
    proj: (D, E)
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ...core import random as pr
from ...core.encoders.vit import VisionTransformer, vision_transformer
from ...core.layers.norm import LayerNorm
from ...core.layers.pooling import cls_pool
from ...core.pytree import Params
from ...core.spec import Spec, check_floating

__all__ = ["CLIPVisionTransformer", "clip_vision_transformer", "check_images", "check_positive", "ACTIVATIONS"]

ACTIVATIONS = ("quick_gelu", "gelu")


def check_images(owner: str, images: Tensor, size: int) -> None:
    """``images`` must be a float ``(B, 3, size, size)``; the error names expected and got."""
    check_floating(images, f"{owner}: images")
    if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
        raise ValueError(f"{owner}: images: expected shape (B, 3, {size}, {size}), got {tuple(images.shape)}")


def check_positive(owner: str, **values: float) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or v <= 0:
            raise ValueError(f"{owner}: {name}: expected a positive number, got {v!r}")


def clip_vision_transformer(*, image_size: int = 224, patch_size: int = 32, width: int = 768, layers: int = 12,
                            heads: int = 12, mlp_ratio: float = 4.0, activation: str = "quick_gelu",
                            layer_norm_eps: float = 1e-5, patch_dropout: float = 0.0,
                            embed_dim: int = 512) -> CLIPVisionTransformer:
    """CLIP's ViT tower (CLIP paper, Table 20; the defaults are ViT-B/32's): the shared ViT with a
    bias-free conv, a class token, learned positions, pre-norm blocks without a final norm.

    ``activation``: ``"quick_gelu"`` (OpenAI's weights) or ``"gelu"`` (open_clip's non-quickgelu
    models); ``patch_dropout``: fraction of patches dropped when a key is given (FLIP).
    """
    name = "clip_vision_transformer"
    check_positive(name, image_size=image_size, patch_size=patch_size, width=width, layers=layers, heads=heads,
                   mlp_ratio=mlp_ratio, embed_dim=embed_dim)
    if image_size % patch_size:
        raise ValueError(f"{name}: image_size ({image_size}) must be divisible by patch_size ({patch_size})")
    if width % heads:
        raise ValueError(f"{name}: width ({width}) must be divisible by heads ({heads})")
    if not 0.0 <= patch_dropout < 1.0:
        raise ValueError(f"{name}: patch_dropout: expected a rate in [0, 1), got {patch_dropout}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name}: activation: expected one of {ACTIVATIONS}, got {activation!r}")
    encoder = vision_transformer(image_size=image_size, patch_size=patch_size, width=width, layers=layers,
                                 heads=heads, mlp_dim=int(width * mlp_ratio), activation=activation, final_norm=False,
                                 layer_norm_eps=layer_norm_eps, conv_bias=False, mask_ratio=patch_dropout or None)
    return CLIPVisionTransformer(encoder, embed_dim)


@dataclass(frozen=True)
class CLIPVisionTransformer(Spec):
    """CLIP ViT: ``images (B, 3, S, S) -> (B, embed_dim)`` (unnormalised features).

    Initialisation is OpenAI's: class token, positions and projection ``N(0, D**-0.5)``; the
    patch conv and the blocks keep torch's defaults (as OpenAI's ``VisionTransformer``).

    >>> import torch
    >>> from polymodal.core import random as pr
    >>> vit = clip_vision_transformer(image_size=32, patch_size=8, width=64, layers=2, heads=4, embed_dim=32)
    >>> vit(vit.init(key=pr.key(0)), torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 32])
    """

    encoder: VisionTransformer  # patch embedding + blocks (class token, learned positions, no final norm)
    embed_dim: int  # output size (the joint embedding)

    def __post_init__(self) -> None:
        name = type(self).__name__
        e = self.encoder
        if not e.embeddings.include_cls_token or e.transformer.final_norm or e.pool != "cls":
            raise ValueError(f"{name}: encoder: expected a class token, cls pooling and no final norm (ln_post is "
                             f"CLIP's), got include_cls_token={e.embeddings.include_cls_token}, pool={e.pool!r}, "
                             f"final_norm={e.transformer.final_norm}")
        check_positive(name, embed_dim=self.embed_dim)

    @property
    def image_size(self) -> int:
        return self.encoder.embeddings.image_size[0]

    @property
    def width(self) -> int:
        return self.encoder.width

    def norm(self) -> LayerNorm:
        return LayerNorm(self.width, eps=self.encoder.transformer.layer.layer_norm_eps)

    def block_stacks(self) -> list[str]:
        return self.encoder.block_stacks()  # the encoder's subtrees sit at this tower's top level

    def init(self, *, key: Tensor) -> Params:
        k_conv, k_cls, k_pos, k_tr, k_proj = pr.split(key, 5)
        d = self.width
        scale = d**-0.5
        conv = self.encoder.embeddings.conv().init(key=k_conv)  # torch's default conv init, as OpenAI
        return {
            "embeddings": {
                "cls_token": pr.normal(k_cls, (1, 1, d)) * scale,
                "conv_projection": {"weight": conv["weight"]},
                "position_embeddings": pr.normal(k_pos, (1, self.encoder.embeddings.num_patches + 1, d)) * scale,
            },
            "ln_pre": self.norm().init(key=key),
            "transformer": self.encoder.transformer.init(key=k_tr),
            "ln_post": self.norm().init(key=key),
            "proj": pr.normal(k_proj, (d, self.embed_dim)) * scale,
        }

    def features(self, params: Params, images: Tensor, *, key: Tensor | None = None,
                 select: int | None = None) -> Tensor:
        """The final hidden states before ``ln_post``: ``(B, 1 + N_kept, D)`` (``key``: patch dropout);
        with ``select`` the last block computes that position only: ``(B, 1, D)``."""
        check_images(type(self).__name__, images, self.image_size)
        x = self.encoder.embeddings(params["embeddings"], images, key=key).embeddings
        x = self.norm()(params["ln_pre"], x)
        return self.encoder.transformer(params["transformer"], x, select=select).last_hidden_state

    def __call__(self, params: Params, images: Tensor, *, key: Tensor | None = None) -> Tensor:
        """``images (B, 3, S, S)`` -> ``(B, embed_dim)``; ``key`` enables patch dropout (if configured)."""
        x = self.features(params, images, key=key, select=0)  # only the class token: what ln_post reads
        return self.norm()(params["ln_post"], cls_pool(x)) @ params["proj"]
