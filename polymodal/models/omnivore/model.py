"""Omnivore (Girdhar et al. 2022, arXiv:2201.08377): one Swin3D encoder for images, videos and RGB-D.

``Omnivore(encoder, heads)``: ``x`` -> :class:`~polymodal.core.encoders.swin3d.Swin3D` (head-less,
with an :class:`~.patch_embed.RGBDPatchEmbed3d`) -> pooled features ``(B, C)`` -> the head that
``input_type`` names. Images enter as one-frame videos (``T = 1``, padded to the temporal patch
inside the patch embedding, as in TorchMultimodal); RGB-D inputs carry depth as a fourth
channel. Params: ``encoder {patch_embed {patch_embed, depth_patch_embed}, stages, merges, norm}``
and ``heads {<input_type>: {weight, bias}}``.

Accepted inputs (``B`` may be absent; ``vmap`` maps over it):

=============  ===============================================================
input type     shape
=============  ===============================================================
``image``      ``(B, 3, H, W)``, or a one-frame video ``(B, 3, 1, H, W)``
``video``      ``(B, 3, T, H, W)``
``rgbd``       ``(B, 4, H, W)`` or ``(B, 4, T, H, W)`` (RGB + depth)
=============  ===============================================================

>>> import torch
>>> from polymodal.core import random as pr
>>> from polymodal.models.omnivore.builders import omnivore_tiny
>>> spec = omnivore_tiny()
>>> params = spec.init(key=pr.key(0))
>>> spec(params, torch.rand(2, 3, 32, 32), "image").logits.shape
torch.Size([2, 30])
>>> spec(params, torch.rand(2, 3, 4, 32, 32), "video").logits.shape
torch.Size([2, 4])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

from ...core import random as pr
from ...core.encoders.swin3d import Swin3D
from ...core.layers.dropout import dropout as _dropout
from ...core.layers.linear import Linear
from ...core.pytree import Params
from ...core.spec import Spec, check_floating
from .patch_embed import RGBDPatchEmbed3d

__all__ = ["Omnivore", "OmnivoreHead", "OmnivoreOutput", "MODALITIES"]

MODALITIES = ("image", "video", "rgbd")  # what an input type's tensor looks like (see the module docstring)


class OmnivoreOutput(NamedTuple):
    """``logits (B, num_classes)`` of the chosen head and the encoder's ``pooled (B, C)`` features."""

    logits: Tensor
    pooled: Tensor


@dataclass(frozen=True)
class OmnivoreHead(Spec):
    """One input type's classifier: dropout (a key turns it on) then a Linear; params ``{weight, bias}``."""

    name: str  # the input_type that picks this head
    modality: str  # "image", "video" or "rgbd": the input layout (module docstring)
    linear: Linear  # pooled features -> logits
    dropout: float = 0.0  # before the Linear (the reference's Kinetics head: 0.5)

    def __post_init__(self) -> None:
        if self.modality not in MODALITIES:
            raise ValueError(f"OmnivoreHead {self.name!r}: modality: expected one of {MODALITIES}, got {self.modality!r}")

    def init(self, *, key: Tensor) -> Params:
        return self.linear.init(key=key)

    def __call__(self, params: Params, x: Tensor, *, key: Tensor | None = None) -> Tensor:
        return self.linear(params, _dropout(x, self.dropout, key=key))


@dataclass(frozen=True)
class Omnivore(Spec):
    """``(params, x, input_type, *, key=None)`` -> :class:`OmnivoreOutput`.

    ``key`` drives stochastic depth, dropout and the heads' dropout (``None``: inference).
    """

    encoder: Swin3D  # head-less Swin3D with an RGBDPatchEmbed3d
    heads: tuple[OmnivoreHead, ...]  # one per input type

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", tuple(self.heads))
        if not isinstance(self.encoder, Swin3D) or not isinstance(self.encoder.patch_embed, RGBDPatchEmbed3d):
            raise TypeError(f"Omnivore: encoder: expected a Swin3D with an RGBDPatchEmbed3d, got {self.encoder!r:.120}")
        if self.encoder.head is not None:
            raise ValueError("Omnivore: encoder: expected a head-less Swin3D (the heads are Omnivore's)")
        names = [h.name for h in self.heads]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"Omnivore: heads: expected distinct input types, got {names}")
        for h in self.heads:
            if h.linear.in_features != self.encoder.num_features:
                raise ValueError(f"Omnivore: heads[{h.name!r}]: expected in_features {self.encoder.num_features}, "
                                 f"got {h.linear.in_features}")

    @property
    def input_types(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.heads)

    def head(self, input_type: str) -> OmnivoreHead:
        for h in self.heads:
            if h.name == input_type:
                return h
        raise ValueError(f"Omnivore: input_type: expected one of {self.input_types}, got {input_type!r}")

    def num_classes(self, input_type: str) -> int:
        return self.head(input_type).linear.out_features

    def init(self, *, key: Tensor) -> Params:
        k_enc, *k_heads = pr.split(key, 1 + len(self.heads))
        return {"encoder": self.encoder.init(key=k_enc),
                "heads": {h.name: h.init(key=k) for h, k in zip(self.heads, k_heads)}}

    def as_video(self, x: Tensor, input_type: str) -> Tensor:
        """``x`` in ``input_type``'s layout -> ``(B, C, T, H, W)`` (or unbatched ``(C, T, H, W)``)."""
        head = self.head(input_type)
        check_floating(x, "x", self)
        rgb = self.encoder.patch_embed.in_channels
        if head.modality == "video":
            if x.dim() not in (4, 5) or x.shape[-4] != rgb:
                raise ValueError(f"Omnivore: {input_type} x: expected a video of shape (B, {rgb}, T, H, W) or "
                                 f"({rgb}, T, H, W), got {x.dim()}-d {tuple(x.shape)}")
            return x
        c = rgb if head.modality == "image" else rgb + self.encoder.patch_embed.depth_channels
        what = "an image" if head.modality == "image" else f"an RGB-D image ({rgb} colour + depth channels)"
        if x.dim() == 3 and x.shape[0] == c:  # (C, H, W)
            return x.unsqueeze(-3)
        if x.dim() == 4 and x.shape[1] == c:  # (B, C, H, W)
            return x.unsqueeze(-3)
        if x.dim() == 4 and x.shape[0] == c and x.shape[1] == 1:  # one frame (C, 1, H, W)
            return x
        if x.dim() == 5 and x.shape[1] == c and (head.modality == "rgbd" or x.shape[2] == 1):  # (B, C, T, H, W)
            return x
        frames = "T" if head.modality == "rgbd" else "1"
        raise ValueError(f"Omnivore: {input_type} x: expected {what} of shape (B, {c}, H, W) or (B, {c}, {frames}, H, W), "
                         f"got {tuple(x.shape)}")

    def __call__(self, params: Params, x: Tensor, input_type: str, *, key: Tensor | None = None) -> OmnivoreOutput:
        """``x`` (see the module docstring) -> ``OmnivoreOutput(logits (B, K), pooled (B, C))``."""
        head = self.head(input_type)
        x = self.as_video(x, input_type)
        k_enc, k_head = pr.maybe_split(key, 2)
        pooled = self.encoder(params["encoder"], x, key=k_enc).pooled
        return OmnivoreOutput(head(params["heads"][head.name], pooled, key=k_head), pooled)
