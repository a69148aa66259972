"""Omnivore configurations (parameter counts equal TorchMultimodal's builders) and a tiny preset.

>>> from polymodal.core.convert import meta_init
>>> from polymodal.core.pytree import flatten
>>> sum(v.numel() for v in flatten(meta_init(omnivore_swin_t())).values())
28945041
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from ...core.encoders.swin3d import Swin3D, swin3d
from ...core.layers.linear import Linear
from .model import Omnivore, OmnivoreHead
from .patch_embed import RGBDPatchEmbed3d

__all__ = ["omnivore_encoder", "omnivore", "omnivore_swin_t", "omnivore_swin_s", "omnivore_swin_b", "omnivore_tiny",
           "BUILDERS", "build", "REFERENCE_HEADS"]

# The reference's heads: ImageNet-1k, Kinetics-400 (dropout 0.5 before its Linear), SUN RGB-D (19 classes).
REFERENCE_HEADS: tuple[tuple[str, str, int, float], ...] = (
    ("image", "image", 1000, 0.0), ("rgbd", "rgbd", 19, 0.0), ("video", "video", 400, 0.5))


def omnivore_encoder(*, patch_size=(2, 4, 4), embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                     num_heads: Sequence[int] = (3, 6, 12, 24), window_size=(8, 7, 7),
                     stochastic_depth_prob: float = 0.2, depth_channels: int = 1, **kw) -> Swin3D:
    """A head-less :func:`~polymodal.core.encoders.swin3d.swin3d` whose patch embedding takes RGB or RGB-D."""
    enc = swin3d(patch_size=patch_size, embed_dim=embed_dim, depths=depths, num_heads=num_heads,
                 window_size=window_size, stochastic_depth_prob=stochastic_depth_prob, num_classes=None, **kw)
    pe = enc.patch_embed
    return dataclasses.replace(enc, patch_embed=RGBDPatchEmbed3d(pe.patch_size, pe.in_channels, pe.embed_dim,
                                                                 pe.norm, pe.norm_eps, depth_channels))


def omnivore(encoder: Swin3D, heads: Sequence[tuple[str, str, int, float]] = REFERENCE_HEADS) -> Omnivore:
    """``Omnivore(encoder, heads)`` from ``(input_type, modality, num_classes, dropout)`` tuples; the
    heads' Linears init as ``torch.nn.Linear`` (the reference builds them so)."""
    return Omnivore(encoder, tuple(OmnivoreHead(name, modality, Linear(encoder.num_features, n), p)
                                   for name, modality, n, p in heads))


def omnivore_swin_t(**kw: Any) -> Omnivore:
    """Omnivore Swin-T (Girdhar et al. 2022, Section 4 / Table 2; Swin-T of Liu et al. 2022: C = 96,
    depths (2, 2, 6, 2), heads (3, 6, 12, 24), window 8 x 7 x 7, stochastic depth 0.2, as TorchMultimodal's
    ``omnivore_swin_t``): 28,945,041 params."""
    return omnivore(omnivore_encoder(**kw))


def omnivore_swin_s(**kw: Any) -> Omnivore:
    """Omnivore Swin-S (depths (2, 2, 18, 2), stochastic depth 0.3; otherwise Swin-T): 50,603,649 params."""
    return omnivore(omnivore_encoder(**({"depths": (2, 2, 18, 2), "stochastic_depth_prob": 0.3} | kw)))


def omnivore_swin_b(**kw: Any) -> Omnivore:
    """Omnivore Swin-B (C = 128, depths (2, 2, 18, 2), heads (4, 8, 16, 32), window 16 x 7 x 7,
    stochastic depth 0.3): 90,114,643 params."""
    return omnivore(omnivore_encoder(**({"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32),
                                         "window_size": (16, 7, 7), "stochastic_depth_prob": 0.3} | kw)))


def omnivore_tiny(**kw: Any) -> Omnivore:
    """A two-stage, width-32 Omnivore for the synthetic data (32 px, 4 frames) that trains on 2 CPU cores:
    heads ``image`` (30 shape-colour classes), ``video`` (4 directions) and ``rgbd`` (6: the nearer shape's colour)."""
    enc = omnivore_encoder(**({"patch_size": (2, 4, 4), "embed_dim": 32, "depths": (2, 2), "num_heads": (2, 4),
                               "window_size": (2, 4, 4), "stochastic_depth_prob": 0.0} | kw))
    return omnivore(enc, (("image", "image", 30, 0.0), ("video", "video", 4, 0.0), ("rgbd", "rgbd", 6, 0.0)))


BUILDERS: dict[str, Callable[..., Omnivore]] = {f.__name__: f for f in (
    omnivore_swin_t, omnivore_swin_s, omnivore_swin_b, omnivore_tiny)}


def build(name: str, **kw: Any) -> Omnivore:
    """A builder by name (``"omnivore_swin_t"``; dashes allowed)."""
    key = name.replace("-", "_")
    if key not in BUILDERS:
        raise ValueError(f"unknown Omnivore builder {name!r}; expected one of {sorted(BUILDERS)}")
    return BUILDERS[key](**kw)
