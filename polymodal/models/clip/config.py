"""CLIP architecture configurations: frozen dataclasses of static hyperparameters.

A :class:`CLIPConfig` is an embedding size, one image tower config (:class:`VisionTransformerConfig`
or :class:`ModifiedResNetConfig`) and a :class:`TextConfig`. The published values live in
``builders.py``; the defaults here are ViT-B/32's.

>>> cfg = CLIPConfig(embed_dim=128, vision=VisionTransformerConfig(image_size=64, patch_size=8, width=128,
...                  layers=2, heads=4), text=TextConfig(context_length=32, width=128, heads=4, layers=2))
>>> cfg.vision.grid, cfg.text.mlp_width
(8, 512)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["VisionTransformerConfig", "ModifiedResNetConfig", "TextConfig", "CLIPConfig"]

_ACTIVATIONS = ("quick_gelu", "gelu")


def _check_positive(owner: str, **values: float) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or v <= 0:
            raise ValueError(f"{owner}: {name}: expected a positive number, got {v!r}")


def _check_activation(owner: str, activation: str) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{owner}: activation: expected one of {_ACTIVATIONS}, got {activation!r}")


@dataclass(frozen=True)
class VisionTransformerConfig:
    """CLIP's ViT image tower (CLIP paper, Table 20)."""

    image_size: int = 224  # side of the square input image
    patch_size: int = 32  # side of a square patch (kernel and stride of the bias-free patchifying conv)
    width: int = 768  # transformer width D
    layers: int = 12  # transformer blocks
    heads: int = 12  # attention heads (OpenAI: width // 64)
    mlp_ratio: float = 4.0  # feed-forward hidden width / D
    activation: str = "quick_gelu"  # "quick_gelu" (OpenAI's weights) or "gelu" (open_clip's non-quickgelu models)
    layer_norm_eps: float = 1e-5  # eps of every LayerNorm
    patch_dropout: float = 0.0  # fraction of patches dropped when a key is given (FLIP); 0 = never

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check_positive(name, image_size=self.image_size, patch_size=self.patch_size, width=self.width,
                        layers=self.layers, heads=self.heads, mlp_ratio=self.mlp_ratio)
        if self.image_size % self.patch_size:
            raise ValueError(f"{name}: image_size ({self.image_size}) must be divisible by patch_size ({self.patch_size})")
        if self.width % self.heads:
            raise ValueError(f"{name}: width ({self.width}) must be divisible by heads ({self.heads})")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"{name}: patch_dropout: expected a rate in [0, 1), got {self.patch_dropout}")
        _check_activation(name, self.activation)

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclass(frozen=True)
class ModifiedResNetConfig:
    """CLIP's modified ResNet image tower (CLIP paper, Table 19; "width" there is ``32 * width`` here)."""

    image_size: int = 224  # side of the square input image (a multiple of 32)
    layers: tuple[int, int, int, int] = (3, 4, 6, 3)  # bottleneck blocks per stage
    width: int = 64  # stem width; stage s has width * 2**s planes, expanded x4
    heads: int = 32  # heads of the attention pooling (OpenAI: 32 * width // 64)
    bn_eps: float = 1e-5  # eps of every BatchNorm
    bn_momentum: float = 0.1  # running-statistics update factor in training mode
    frozen_bn: bool = False  # always normalise with the running statistics, even when training=True

    def __post_init__(self) -> None:
        name = type(self).__name__
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        if len(self.layers) != 4 or any(n < 1 for n in self.layers):
            raise ValueError(f"{name}: layers: expected 4 positive block counts, got {self.layers}")
        _check_positive(name, image_size=self.image_size, width=self.width, heads=self.heads)
        if self.image_size % 32:
            raise ValueError(f"{name}: image_size ({self.image_size}) must be a multiple of 32")
        if self.width % 2 or (32 * self.width) % self.heads:
            raise ValueError(f"{name}: width ({self.width}) must be even and 32 * width divisible by heads ({self.heads})")

    @property
    def grid(self) -> int:
        """Side of the final feature map (the attention pool's grid)."""
        return self.image_size // 32

    @property
    def feature_dim(self) -> int:
        """Channels of the last stage, pooled by attention (RN50: 2048)."""
        return self.width * 32


@dataclass(frozen=True)
class TextConfig:
    """CLIP's causal text transformer."""

    context_length: int = 77  # token positions (sequences are padded / truncated to it)
    vocab_size: int = 49408  # BPE vocabulary (CLIP's: 49152 merges + 256 bytes ... + sot/eot)
    width: int = 512  # transformer width D
    heads: int = 8  # attention heads (OpenAI: width // 64)
    layers: int = 12  # transformer blocks
    mlp_ratio: float = 4.0  # feed-forward hidden width / D
    activation: str = "quick_gelu"  # "quick_gelu" (OpenAI's weights) or "gelu"
    layer_norm_eps: float = 1e-5  # eps of every LayerNorm

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check_positive(name, context_length=self.context_length, vocab_size=self.vocab_size, width=self.width,
                        heads=self.heads, layers=self.layers, mlp_ratio=self.mlp_ratio)
        if self.width % self.heads:
            raise ValueError(f"{name}: width ({self.width}) must be divisible by heads ({self.heads})")
        _check_activation(name, self.activation)

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclass(frozen=True)
class CLIPConfig:
    """A whole CLIP: joint embedding size, image tower, text tower, initial temperature."""

    embed_dim: int = 512  # size of the joint image-text embedding
    vision: VisionTransformerConfig | ModifiedResNetConfig = field(default_factory=VisionTransformerConfig)  # image tower
    text: TextConfig = field(default_factory=TextConfig)  # text tower
    logit_scale_init: float = math.log(1 / 0.07)  # initial log inverse temperature (CLIP paper, section 2.5)

    def __post_init__(self) -> None:
        _check_positive(type(self).__name__, embed_dim=self.embed_dim)
        if not isinstance(self.vision, (VisionTransformerConfig, ModifiedResNetConfig)):
            raise TypeError(f"CLIPConfig: vision: expected VisionTransformerConfig or ModifiedResNetConfig, "
                            f"got {type(self.vision).__name__}")
        if not isinstance(self.text, TextConfig):
            raise TypeError(f"CLIPConfig: text: expected TextConfig, got {type(self.text).__name__}")

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.vision, ModifiedResNetConfig)
