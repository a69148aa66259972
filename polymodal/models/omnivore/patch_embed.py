"""Omnivore's RGB-D patch embedding: RGB through one Conv3d projection, depth through its own, summed.

TorchMultimodal's ``PatchEmbedOmnivore``: ``x (B, 3, T, H, W)`` -> the RGB projection (Conv3d
with stride = kernel = patch, LayerNorm); ``x (B, 4, T, H, W)`` (RGB + depth) -> RGB projection of
the first three channels + depth projection (its own Conv3d and LayerNorm) of the fourth.
Params: ``patch_embed {proj, norm}`` (RGB) and ``depth_patch_embed {proj, norm}``, the
reference's names.

>>> import torch
>>> from polymodal.core import random as pr
>>> pe = RGBDPatchEmbed3d((2, 4, 4), embed_dim=8)
>>> p = pe.init(key=pr.key(0))
>>> sorted(p), pe(p, torch.ones(1, 3, 2, 8, 8)).shape, pe(p, torch.ones(1, 4, 2, 8, 8)).shape
(['depth_patch_embed', 'patch_embed'], torch.Size([1, 1, 2, 2, 8]), torch.Size([1, 1, 2, 2, 8]))
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ...core import random as pr
from ...core.encoders.swin3d import PatchEmbed3d
from ...core.pytree import Params
from ...core.spec import Spec, check_floating

__all__ = ["RGBDPatchEmbed3d"]


@dataclass(frozen=True)
class RGBDPatchEmbed3d(PatchEmbed3d):
    """``(*, C, T, H, W)`` with ``C = in_channels`` (RGB) or ``in_channels + depth_channels`` (RGB-D)
    -> tokens ``(*, ceil(T/pt), ceil(H/ph), ceil(W/pw), embed_dim)``.

    A :class:`~polymodal.core.encoders.swin3d.PatchEmbed3d` (so it slots into ``Swin3D``) whose
    inherited fields configure both projections; ``depth_channels`` is the depth input's width.
    """

    depth_channels: int = 1  # channels of the depth map (after the RGB ones)

    def rgb(self) -> PatchEmbed3d:
        return PatchEmbed3d(self.patch_size, self.in_channels, self.embed_dim, self.norm, self.norm_eps)

    def depth(self) -> PatchEmbed3d:
        return PatchEmbed3d(self.patch_size, self.depth_channels, self.embed_dim, self.norm, self.norm_eps)

    def init(self, *, key: Tensor) -> Params:
        k_rgb, k_depth = pr.split(key)
        return {"patch_embed": self.rgb().init(key=k_rgb), "depth_patch_embed": self.depth().init(key=k_depth)}

    def check_input(self, x: Tensor, owner: Spec | None = None) -> Tensor:
        owner = owner if owner is not None else self
        check_floating(x, "x", owner)
        c, cd = self.in_channels, self.in_channels + self.depth_channels
        if x.dim() not in (4, 5) or x.shape[-4] not in (c, cd):
            raise ValueError(f"{type(owner).__name__}: x: expected shape (B, C, T, H, W) or (C, T, H, W) with C = {c} "
                             f"(RGB) or {cd} (RGB + depth), got {tuple(x.shape)}")
        return x

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        self.check_input(x)
        if x.shape[-4] == self.in_channels:
            return self.rgb()(params["patch_embed"], x)
        rgb, depth = x[..., : self.in_channels, :, :, :], x[..., self.in_channels :, :, :, :]
        return self.rgb()(params["patch_embed"], rgb) + self.depth()(params["depth_patch_embed"], depth)
