"""Omnivore's preprocessing for images, video clips and RGB-D on ``torchvision.transforms.v2``.

As TorchMultimodal's ``examples/omnivore/data/presets.py`` (evaluation presets; training
presets add the random crop and flip): images and RGB-D images come out as one-frame videos
``(C, 1, H, W)``; videos ``(T, C, H, W)`` (``torchvision.io`` layout) come out ``(C, T, H, W)``;
RGB-D depth is normalised by :class:`DepthNorm` (clamped to ``[min_depth, max_depth]``, divided
by ``max_depth``) before the 4-channel normalisation. :func:`sample_clip` picks a clip's frame
indices: the centre clip, or (with a key) a uniformly random one.

>>> import torch
>>> image_transform(crop_size=32, resize_size=36)(torch.rand(3, 40, 48)).shape
torch.Size([3, 1, 32, 32])
>>> video_transform(crop_size=32, resize_size=36)(torch.randint(0, 256, (8, 3, 40, 48), dtype=torch.uint8)).shape
torch.Size([3, 8, 32, 32])
>>> sample_clip(10, 4, step=2).tolist()
[1, 3, 5, 7]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode

from ...core import random as pr

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "KINETICS_MEAN", "KINETICS_STD", "RGBD_MEAN", "RGBD_STD", "DepthNorm",
           "Unsqueeze", "ToCTHW", "image_transform", "video_transform", "depth_transform", "sample_clip"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
KINETICS_MEAN, KINETICS_STD = (0.43216, 0.394666, 0.37645), (0.22803, 0.22145, 0.216989)
RGBD_MEAN, RGBD_STD = (0.485, 0.456, 0.406, 0.0418), (0.229, 0.224, 0.225, 0.0295)  # SUN RGB-D, depth / 75


class DepthNorm(v2.Transform):
    """Normalise the depth channel of an RGB-D image ``(4, H, W)`` (or ``(T, 4, H, W)``): clamp it to
    ``min_depth`` (and to ``max_depth`` when ``clamp_max_before_scale``), divide by ``max_depth``.
    The colour channels pass unchanged (TorchMultimodal's ``DepthNorm``; a new tensor is returned)."""

    def __init__(self, max_depth: float, clamp_max_before_scale: bool = False, min_depth: float = 0.01) -> None:
        super().__init__()
        if not max_depth > 0:
            raise ValueError(f"DepthNorm: max_depth: expected > 0, got {max_depth!r}")
        self.max_depth, self.clamp_max_before_scale, self.min_depth = max_depth, clamp_max_before_scale, min_depth

    def forward(self, x: Any) -> Tensor:  # a plain tensor in, a plain tensor out
        if not isinstance(x, Tensor) or x.dim() not in (3, 4) or x.shape[-3] != 4:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"DepthNorm: expected an RGB-D image (4, H, W) or clip (T, 4, H, W) (RGB + depth), got {got}")
        depth = x[..., 3:, :, :].clamp(min=self.min_depth)
        if self.clamp_max_before_scale:
            depth = depth.clamp(max=self.max_depth)
        return torch.cat([x[..., :3, :, :], depth / self.max_depth], -3)


class Unsqueeze(v2.Transform):
    """``(C, H, W)`` -> ``(C, 1, H, W)``: an image as a one-frame video."""

    def forward(self, x: Any) -> Tensor:
        return torch.as_tensor(x).unsqueeze(-3)


class ToCTHW(v2.Transform):
    """A clip ``(T, C, H, W)`` -> ``(C, T, H, W)``."""

    def forward(self, x: Any) -> Tensor:
        x = torch.as_tensor(x)
        if x.dim() != 4:
            raise ValueError(f"ToCTHW: expected a clip of shape (T, C, H, W), got {tuple(x.shape)}")
        return x.transpose(0, 1)


def _geometry(train: bool, crop_size: int, resize_size: int, mode: InterpolationMode) -> list:
    if train:
        return [v2.RandomResizedCrop(crop_size, interpolation=mode, antialias=True), v2.RandomHorizontalFlip()]
    return [v2.Resize(resize_size, interpolation=mode, antialias=True), v2.CenterCrop(crop_size)]


def image_transform(*, train: bool = False, crop_size: int = 224, resize_size: int = 256,
                    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """An image (PIL, uint8 or float ``(3, H, W)``) -> a normalised one-frame video ``(3, 1, crop, crop)``
    (bicubic; ImageNet statistics). ``train``: random resized crop + horizontal flip (torch's global RNG,
    as torchvision's) instead of resize + centre crop."""
    return v2.Compose([v2.ToImage(), v2.RGB(), *_geometry(train, crop_size, resize_size, InterpolationMode.BICUBIC),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)),
                       v2.ToPureTensor(), Unsqueeze()])


def video_transform(*, train: bool = False, crop_size: int = 224, resize_size: int = 224,
                    mean: Sequence[float] = KINETICS_MEAN, std: Sequence[float] = KINETICS_STD) -> v2.Compose:
    """A clip ``(T, 3, H, W)`` (uint8 or float in [0, 1]) -> ``(3, T, crop, crop)``: resize the short side,
    normalise (Kinetics statistics), centre crop (``train``: random crop + horizontal flip)."""
    crop = v2.RandomCrop(crop_size) if train else v2.CenterCrop(crop_size)
    return v2.Compose([_CheckClip(), v2.ToDtype(torch.float32, scale=True),
                       v2.Resize(resize_size, antialias=True), *([v2.RandomHorizontalFlip()] if train else []),
                       v2.Normalize(list(mean), list(std)), crop, v2.ToPureTensor(), ToCTHW()])


def depth_transform(*, train: bool = False, crop_size: int = 224, resize_size: int = 256, max_depth: float = 75.0,
                    mean: Sequence[float] = RGBD_MEAN, std: Sequence[float] = RGBD_STD) -> v2.Compose:
    """An RGB-D image ``(4, H, W)`` (RGB in [0, 1], depth in metres) -> ``(4, 1, crop, crop)``: depth
    normalised by :class:`DepthNorm` (clamped at ``max_depth``), bilinear resize + centre crop
    (``train``: random resized crop + flip), 4-channel normalisation (SUN RGB-D statistics)."""
    return v2.Compose([DepthNorm(max_depth, clamp_max_before_scale=True),
                       *_geometry(train, crop_size, resize_size, InterpolationMode.BILINEAR),
                       v2.Normalize(list(mean), list(std)), v2.ToPureTensor(), Unsqueeze()])


class _CheckClip(v2.Transform):
    def forward(self, x: Any) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != 3:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"video_transform: expected a clip of shape (T, 3, H, W) (torchvision.io's layout), got {got}")
        return x


def sample_clip(num_frames: int, frames_per_clip: int, step: int = 1, *, key: Tensor | None = None) -> Tensor:
    """Frame indices ``(frames_per_clip,)`` of one clip of a ``num_frames`` video, ``step`` apart.

    ``key=None``: the centre clip (evaluation); with a key: a uniformly random start (training).
    A video shorter than the clip repeats its last frame.
    """
    if num_frames < 1 or frames_per_clip < 1 or step < 1:
        raise ValueError(f"sample_clip: expected num_frames, frames_per_clip, step >= 1, got "
                         f"{num_frames}, {frames_per_clip}, {step}")
    span = (frames_per_clip - 1) * step + 1
    room = max(num_frames - span, 0)
    start = room // 2 if key is None else int(pr.randint(key, (), 0, room + 1))
    return (start + step * torch.arange(frames_per_clip)).clamp(max=num_frames - 1)
