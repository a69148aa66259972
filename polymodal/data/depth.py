"""Built-in synthetic RGB-D images: two coloured shapes at different depths; the depth order is the label.

Every image is a pure function of a random key and its attributes: two shapes (drawn as in
``polymodal.data.synthetic``) of two different colours, one in the left half and one in the
right half, over a noisy background; a depth map (metres, ``[0, MAX_DEPTH]``) puts the background
at ``MAX_DEPTH`` and each shape at its own depth. The label is the colour of the nearer shape,
so the RGB channels alone cannot do better than guessing between the two colours present
(50 %); the depth channel settles it.

>>> ds = DepthShapes("train", size=10, image_size=16)
>>> item = ds[3]
>>> item["rgbd"].shape, float(item["rgbd"][3].max()) <= MAX_DEPTH
(torch.Size([4, 16, 16]), True)
>>> ds.class_names()[item["label"]] == item["near"]
True
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from polymodal.core import random as pr
from polymodal.data.synthetic import COLORS, SHAPES, _noise_field, _sdf

__all__ = ["MAX_DEPTH", "SHAPES", "COLORS", "DepthShapes", "render_rgbd"]

MAX_DEPTH = 10.0  # background depth (metres); depth maps lie in (0, MAX_DEPTH]
_NEAR = (1.0, 6.0)  # depth of the nearer shape
_GAP = (1.5, 3.5)  # how much farther the other shape is
_RADIUS = (0.10, 0.16)
_NOISE, _DEPTH_NOISE = 0.06, 0.05
_RGB = torch.tensor(list(COLORS.values()))
_SPLITS = {"train": 0, "eval": 1, "test": 2}
_ATTRS = ("shape", "color", "near_first")


def render_rgbd(key: Tensor, attrs: Mapping[str, Tensor], image_size: int = 32) -> Tensor:
    """Render RGB-D images of two shapes each.

    Args:
        key: one key ``(2,)`` (split per image) or per-image keys ``(N, 2)``.
        attrs: ``"shape"`` and ``"color"`` int64 ``(N, 2)`` (indices into ``SHAPES`` / ``COLORS``,
            the left and the right shape), ``"near_first"`` bool ``(N,)`` (the left shape is nearer).
        image_size: side ``S`` (>= 8).

    Returns:
        ``(N, 4, S, S)`` float32: RGB in ``[0, 1]``, then depth in ``(0, MAX_DEPTH]``.
    """
    missing = [a for a in _ATTRS if a not in attrs]
    if missing:
        raise ValueError(f"render_rgbd: attrs: expected keys {_ATTRS}, got {tuple(attrs)}")
    shape, color, near_first = attrs["shape"], attrs["color"], attrs["near_first"]
    n = shape.shape[0]
    if shape.shape != (n, 2) or color.shape != (n, 2) or near_first.shape != (n,):
        raise ValueError(f"render_rgbd: attrs: expected shape, color (N, 2) and near_first (N,), got "
                         f"{tuple(shape.shape)}, {tuple(color.shape)}, {tuple(near_first.shape)}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"render_rgbd: image_size: expected an int >= 8, got {image_size!r}")
    keys = pr.split(key, n) if key.dim() == 1 else key
    s = image_size
    if n == 0:
        return torch.empty(0, 4, s, s)
    k_geo, k_bg, k_noise = pr.split(keys, 3).unbind(-2)
    g = pr.uniform(k_geo, (10,))  # x x2, y x2, radius x2, turn x2, near depth, gap
    cx = torch.stack([0.27 + 0.06 * (2 * g[:, 0] - 1), 0.73 + 0.06 * (2 * g[:, 1] - 1)], 1)  # (N, 2)
    cy = 0.5 + 0.22 * (2 * g[:, 2:4] - 1)
    radius = _RADIUS[0] + (_RADIUS[1] - _RADIUS[0]) * g[:, 4:6]
    turn = (math.pi / 6) * (2 * g[:, 6:8] - 1)
    near = _NEAR[0] + (_NEAR[1] - _NEAR[0]) * g[:, 8]
    far = near + _GAP[0] + (_GAP[1] - _GAP[0]) * g[:, 9]
    depth = torch.where(near_first[:, None], torch.stack([near, far], 1), torch.stack([far, near], 1))  # (N, 2)
    h = pr.uniform(k_bg, (4,))
    grey = 0.3 + 0.3 * h[:, :1] + 0.08 * (h[:, 1:4] - 0.5)  # (N, 3)
    grid = (torch.arange(s, dtype=torch.float32) + 0.5) / s
    xs, ys = grid.view(1, 1, s), grid.view(1, s, 1)
    rgb = grey.view(n, 3, 1, 1).expand(n, 3, s, s).clone()
    dmap = torch.full((n, s, s), MAX_DEPTH)
    for j in range(2):  # the left shape, then the right one (they never overlap)
        dx, dy = xs - cx[:, j].view(n, 1, 1), ys - cy[:, j].view(n, 1, 1)
        cos, sin = turn[:, j].cos().view(n, 1, 1), turn[:, j].sin().view(n, 1, 1)
        u, v = cos * dx + sin * dy, cos * dy - sin * dx
        sdf = torch.empty(n, s, s)
        for kind in torch.unique(shape[:, j]).tolist():
            rows = (shape[:, j] == kind).nonzero().flatten()
            sdf[rows] = _sdf(kind, u[rows], v[rows], radius[rows, j].view(-1, 1, 1))
        mask = (0.5 - sdf * s).clamp(0.0, 1.0)  # (N, S, S)
        rgb = torch.lerp(rgb, _RGB[color[:, j]].view(n, 3, 1, 1), mask.unsqueeze(1))
        dmap = torch.where(mask > 0.5, depth[:, j].view(n, 1, 1), dmap)
    field = _noise_field(s)
    off = ((pr.bits(k_noise, (3,)) * s) >> 32).tolist()  # y, x of the colour noise window; the depth one
    noise = torch.stack([field[:, y : y + s, x : x + s] for y, x, _ in off])
    dnoise = torch.stack([field[0, z : z + s, z : z + s] for _, _, z in off])
    rgb = (rgb + _NOISE * noise).clamp_(0.0, 1.0)
    dmap = (dmap * (1 + _DEPTH_NOISE * dnoise)).clamp_(0.01, MAX_DEPTH)
    return torch.cat([rgb, dmap.unsqueeze(1)], 1)


class DepthShapes(Dataset):
    """Procedural RGB-D images labelled by the colour of the nearer of two shapes.

    Args:
        split: ``"train"``, ``"eval"`` or ``"test"``. size: number of images.
        image_size: side ``S``. seed: integer seed (items are pure functions of (seed, split, index)).
        transform: optional callable applied to each ``(4, S, S)`` image (e.g. depth normalisation).

    Items: ``{"rgbd": (4, S, S) float32 (RGB in [0, 1], depth in metres), "label": int (index of
    the nearer shape's colour in COLORS), "near", "far": colour names, "shapes": (left, right)
    shape names, "caption": str}``.

    >>> batch = next(iter(torch.utils.data.DataLoader(DepthShapes("eval", 4, 16), batch_size=2)))
    >>> batch["rgbd"].shape, batch["label"].shape
    (torch.Size([2, 4, 16, 16]), torch.Size([2]))
    """

    def __init__(self, split: str, size: int, image_size: int = 32, seed: int = 0, *,
                 transform: Callable[[Tensor], object] | None = None) -> None:
        if split not in _SPLITS:
            raise ValueError(f"DepthShapes: split: expected one of {tuple(_SPLITS)}, got {split!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"DepthShapes: size: expected an int >= 0, got {size!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"DepthShapes: image_size: expected an int >= 8, got {image_size!r}")
        self.split, self.size, self.image_size, self.seed, self.transform = split, size, image_size, seed, transform
        self._key = pr.fold_in(pr.key(seed), 0xDE9 + _SPLITS[split])

    def __len__(self) -> int:
        return self.size

    def class_names(self) -> list[str]:
        """The colour names: label ``k`` means "the ``COLORS[k]`` shape is nearer"."""
        return list(COLORS)

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        indices = [self._index(i) for i in indices]
        if not indices:
            return []
        keys = torch.func.vmap(pr.fold_in, in_dims=(None, 0))(self._key, torch.tensor(indices, dtype=torch.int64))
        k_attr, k_render = pr.split(keys, 2).unbind(-2)
        d = pr.bits(k_attr, (5,))
        shape = (d[:, :2] * len(SHAPES)) >> 32
        c0 = (d[:, 2] * len(COLORS)) >> 32
        c1 = (c0 + 1 + ((d[:, 3] * (len(COLORS) - 1)) >> 32)) % len(COLORS)  # a different colour
        color, near_first = torch.stack([c0, c1], 1), (d[:, 4] >> 31) == 1
        images = render_rgbd(k_render, {"shape": shape, "color": color, "near_first": near_first}, self.image_size)
        names = list(COLORS)
        out = []
        for img, (s0, s1), (a, b), nf in zip(images, shape.tolist(), color.tolist(), near_first.tolist()):
            near, far = (names[a], names[b]) if nf else (names[b], names[a])
            out.append({"rgbd": img if self.transform is None else self.transform(img), "label": names.index(near),
                        "near": near, "far": far, "shapes": (SHAPES[s0], SHAPES[s1]),
                        "caption": f"the {near} shape is in front of the {far} one"})
        return out

    def _index(self, i: object) -> int:
        i = operator.index(i)
        if not -self.size <= i < self.size:
            raise IndexError(f"DepthShapes: index {i} out of range for {self.size} samples")
        return i % self.size

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __repr__(self) -> str:
        return f"DepthShapes(split={self.split!r}, size={self.size}, image_size={self.image_size}, seed={self.seed})"
