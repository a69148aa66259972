"""Built-in synthetic videos: a coloured shape moving in one direction over a noisy background.

Every video is a pure function of a random key and its attributes (shape, colour,
direction): the shape (drawn as in ``polymodal.data.synthetic``) starts on one side of the
frame and travels in a straight line to the other, over a static grey background with a
colour tint and gradient plus per-frame noise. The direction is the label, so a model
that only looks at one frame is at chance; the shape and colour are in the caption.

>>> ds = MovingShapes("train", size=10, frames=4, image_size=16)
>>> item = ds[3]
>>> item["video"].shape, item["video"].dtype
(torch.Size([3, 4, 16, 16]), torch.float32)
>>> DIRECTIONS[item["label"]] == item["direction"] and item["caption"].endswith(item["direction"])
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
from polymodal.data.synthetic import COLORS, SHAPES, _english, _noise_field, _sdf

__all__ = ["DIRECTIONS", "SHAPES", "COLORS", "MovingShapes", "render_video"]

DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
# Unit motion (x, y) per direction; y grows downwards.
_VELOCITY = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])
_ATTRS = ("shape", "color", "direction")
_VOCAB = {"shape": SHAPES, "color": tuple(COLORS), "direction": DIRECTIONS}
_SPLITS = {"train": 0, "eval": 1, "test": 2}
_RGB = torch.tensor(list(COLORS.values()))
_TRAVEL = (0.36, 0.50)  # distance travelled over the clip (fraction of the side)
_RADIUS = (0.10, 0.15)  # shape radius (fraction of the side)
_ACROSS = 0.18  # jitter of the path across the direction of motion
_MAX_TURN = math.pi / 6
_NOISE = 0.06
_BACKGROUNDS = ("grey", "dark")


def _indices(attrs: Mapping[str, object]) -> tuple[list[Tensor], bool]:
    """Attribute indices ``(N,)`` each, and whether ``attrs`` described one video (plain names)."""
    missing = [a for a in _ATTRS if a not in attrs]
    if missing:
        raise ValueError(f"render_video: attrs: expected keys {_ATTRS}, got {tuple(attrs)}")
    single = all(isinstance(attrs[a], str) for a in _ATTRS)
    out = []
    for name in _ATTRS:
        v, vocab = attrs[name], _VOCAB[name]
        if single:
            v = [v]
        if isinstance(v, Tensor):
            if v.dtype != torch.int64 or v.dim() != 1:
                raise TypeError(f"render_video: attrs[{name!r}]: expected int64 indices (N,), got {v.dtype} {tuple(v.shape)}")
            if v.numel() and (int(v.min()) < 0 or int(v.max()) >= len(vocab)):
                raise ValueError(f"render_video: attrs[{name!r}]: expected indices in [0, {len(vocab)}), got {v.tolist()[:8]}")
            out.append(v)
            continue
        if isinstance(v, str) or not isinstance(v, Sequence):
            raise TypeError(f"render_video: attrs[{name!r}]: expected a name, a sequence of names or an int64 tensor, got {type(v).__name__}")
        bad = [s for s in v if s not in vocab]
        if bad:
            raise ValueError(f"render_video: attrs[{name!r}]: expected names from {vocab}, got {bad[:3]}")
        out.append(torch.tensor([vocab.index(s) for s in v], dtype=torch.int64))
    n = out[0].shape[0]
    if any(t.shape[0] != n for t in out):
        raise ValueError(f"render_video: attrs: expected equal lengths, got {dict(zip(_ATTRS, (t.shape[0] for t in out)))}")
    return out, single


def _paths(keys: Tensor, direction: Tensor, frames: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Centres ``(N, T, 2)``, radius ``(N,)``, turn ``(N,)`` and colour jitter ``(N, 3)``."""
    g = pr.uniform(keys, (8,))  # travel, across, along, radius, turn, colour jitter x3
    vel = _VELOCITY[direction]  # (N, 2)
    across = torch.stack([vel[:, 1], vel[:, 0]], 1).abs()  # the perpendicular axis
    travel = _TRAVEL[0] + (_TRAVEL[1] - _TRAVEL[0]) * g[:, 0]
    start = 0.5 - 0.5 * travel[:, None] * vel + across * _ACROSS * (2 * g[:, 1:2] - 1) + vel * 0.04 * (2 * g[:, 2:3] - 1)
    t = torch.arange(frames, dtype=torch.float32) / max(frames - 1, 1)
    centres = start[:, None, :] + (travel[:, None] * t)[..., None] * vel[:, None, :]
    radius = _RADIUS[0] + (_RADIUS[1] - _RADIUS[0]) * g[:, 3]
    return centres, radius, _MAX_TURN * (2 * g[:, 4] - 1), 0.08 * (g[:, 5:] - 0.5)


def render_video(key: Tensor, attrs: Mapping[str, object], frames: int = 8, image_size: int = 32, *,
                 background: str = "grey") -> Tensor:
    """Render moving-shape videos, one per row of ``attrs``.

    Args:
        key: one key ``(2,)`` (split into one key per video) or per-video keys ``(N, 2)``;
            video ``i`` depends only on its own key and attributes.
        attrs: ``{"shape", "color", "direction"}``: each a name (one video), a sequence of
            ``N`` names, or an int64 tensor ``(N,)`` of indices into ``SHAPES``, ``COLORS``,
            ``DIRECTIONS``.
        frames: number of frames ``T`` (>= 2).
        image_size: side ``S`` of the square frames (>= 8).
        background: ``"grey"`` (a random grey with a tint and a gradient, as the still shapes) or
            ``"dark"`` (near black: every shape is brighter than its background).

    Returns:
        float32 videos in ``[0, 1]``: ``(3, T, S, S)`` for plain names, else ``(N, 3, T, S, S)``.

    >>> v = render_video(pr.key(0), {"shape": "circle", "color": "red", "direction": "left"}, 4, 16)
    >>> v.shape, bool(v.min() >= 0) and bool(v.max() <= 1)
    (torch.Size([3, 4, 16, 16]), True)
    """
    (shape, color, direction), single = _indices(attrs)
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
        raise ValueError(f"render_video: frames: expected an int >= 2, got {frames!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"render_video: image_size: expected an int >= 8, got {image_size!r}")
    if background not in _BACKGROUNDS:
        raise ValueError(f"render_video: background: expected one of {_BACKGROUNDS}, got {background!r}")
    n, s = shape.shape[0], image_size
    if not isinstance(key, Tensor) or key.dtype != torch.int64 or key.dim() not in (1, 2) or key.shape[-1] != 2:
        raise TypeError(f"render_video: key: expected a key (2,) or a stack of keys (N, 2), got {key!r:.80}")
    keys = pr.split(key, n) if key.dim() == 1 else key
    if keys.shape[0] != n:
        raise ValueError(f"render_video: key: expected ({n}, 2) keys for {n} videos, got {tuple(keys.shape)}")
    if n == 0:
        return torch.empty(0, 3, frames, s, s)
    k_path, k_bg, k_noise = pr.split(keys, 3).unbind(-2)
    centres, radius, turn, jitter = _paths(k_path, direction, frames)
    h = pr.uniform(k_bg, (6,))  # grey, tint x3, gradient angle, gradient strength
    grey = 0.3 + 0.3 * h[:, :1] + 0.08 * (h[:, 1:4] - 0.5)  # (N, 3)
    angle, slope = 2 * math.pi * h[:, 4], 0.25 * h[:, 5]
    if background == "dark":
        grey, slope = 0.02 + 0.06 * h[:, :1].expand(n, 3), 0.05 * h[:, 5]
    grid = (torch.arange(s, dtype=torch.float32) + 0.5) / s
    xs, ys = grid.view(1, 1, 1, s), grid.view(1, 1, s, 1)
    ramp = (angle.cos() * slope).view(n, 1, 1, 1) * (xs - 0.5) + (angle.sin() * slope).view(n, 1, 1, 1) * (ys - 0.5)
    bg = grey.view(n, 3, 1, 1, 1) + ramp.unsqueeze(1)  # (N, 3, 1, S, S)
    cx, cy = centres[..., 0].view(n, frames, 1, 1), centres[..., 1].view(n, frames, 1, 1)
    cos, sin = turn.cos().view(n, 1, 1, 1), turn.sin().view(n, 1, 1, 1)
    dx, dy = xs - cx, ys - cy
    u, v = cos * dx + sin * dy, cos * dy - sin * dx  # (N, T, S, S) in the shape's frame
    sdf = torch.empty(n, frames, s, s)
    for kind in torch.unique(shape).tolist():
        rows = (shape == kind).nonzero().flatten()
        sdf[rows] = _sdf(kind, u[rows], v[rows], radius[rows].view(-1, 1, 1, 1))
    mask = (0.5 - sdf * s).clamp(0.0, 1.0).unsqueeze(1)  # (N, 1, T, S, S), anti-aliased edge
    rgb = (_RGB[color] + jitter).view(n, 3, 1, 1, 1)
    video = torch.lerp(bg.expand(n, 3, frames, s, s), rgb.expand(n, 3, frames, s, s), mask)
    field = _noise_field(s)  # (3, 2S, 2S); each frame adds its own window of it
    offsets = ((pr.bits(k_noise, (frames, 2)) * s) >> 32).tolist()
    noise = torch.stack([torch.stack([field[:, y : y + s, x : x + s] for y, x in per]) for per in offsets])  # (N, T, 3, S, S)
    video = (video + _NOISE * noise.transpose(1, 2)).clamp_(0.0, 1.0)
    return video[0] if single else video


class MovingShapes(Dataset):
    """Procedural moving-shape videos labelled by direction, deterministic per ``(seed, split, index)``.

    Args:
        split: ``"train"``, ``"eval"`` or ``"test"`` (different videos, same distribution).
        size: number of videos ``N``.
        frames: frames per video ``T`` (>= 2).
        image_size: side ``S`` of the frames (>= 8).
        seed: integer seed.
        background: ``"grey"`` or ``"dark"`` (see :func:`render_video`).
        transform: optional callable applied to each video ``(3, T, S, S)``.

    Items are ``{"video": (3, T, S, S) float32 in [0, 1], "label": int (index into
    DIRECTIONS), "direction", "shape", "color": str, "caption": str}``, e.g. the caption
    ``"a red circle moves left"``. ``__getitems__`` renders a whole batch at once.

    >>> batch = next(iter(torch.utils.data.DataLoader(MovingShapes("eval", 6, 4, 16), batch_size=3)))
    >>> batch["video"].shape, batch["label"].shape
    (torch.Size([3, 3, 4, 16, 16]), torch.Size([3]))
    """

    def __init__(
        self,
        split: str,
        size: int,
        frames: int = 8,
        image_size: int = 32,
        seed: int = 0,
        *,
        background: str = "grey",
        transform: Callable[[Tensor], object] | None = None,
    ) -> None:
        if background not in _BACKGROUNDS:
            raise ValueError(f"MovingShapes: background: expected one of {_BACKGROUNDS}, got {background!r}")
        if split not in _SPLITS:
            raise ValueError(f"MovingShapes: split: expected one of {tuple(_SPLITS)}, got {split!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"MovingShapes: size: expected an int >= 0, got {size!r}")
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 2:
            raise ValueError(f"MovingShapes: frames: expected an int >= 2, got {frames!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"MovingShapes: image_size: expected an int >= 8, got {image_size!r}")
        self.split, self.size, self.frames, self.image_size, self.seed = split, size, frames, image_size, seed
        self.transform, self.background = transform, background
        self._key = pr.fold_in(pr.key(seed), 0x40710 + _SPLITS[split])

    def __len__(self) -> int:
        return self.size

    def class_names(self) -> list[str]:
        """The label names, ``DIRECTIONS``."""
        return list(DIRECTIONS)

    def _index(self, i: object) -> int:
        i = operator.index(i)
        if not -self.size <= i < self.size:
            raise IndexError(f"MovingShapes: index {i} out of range for {self.size} samples")
        return i % self.size

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """Render several items in one batched call (used by ``DataLoader``)."""
        indices = [self._index(i) for i in indices]
        if not indices:
            return []
        idx = torch.tensor(indices, dtype=torch.int64)
        keys = torch.func.vmap(pr.fold_in, in_dims=(None, 0))(self._key, idx)
        k_attr, k_render = pr.split(keys, 2).unbind(-2)
        counts = torch.tensor([len(SHAPES), len(COLORS), len(DIRECTIONS)])
        draws = (pr.bits(k_attr, (3,)) * counts) >> 32  # (B, 3): shape, colour, direction
        videos = render_video(k_render, dict(zip(_ATTRS, draws.unbind(1))), self.frames, self.image_size,
                              background=self.background)
        items = []
        for video, (si, ci, di) in zip(videos, draws.tolist()):
            shape, color, direction = SHAPES[si], _VOCAB["color"][ci], DIRECTIONS[di]
            items.append(
                {
                    "video": video if self.transform is None else self.transform(video),
                    "label": di,
                    "direction": direction,
                    "shape": shape,
                    "color": color,
                    "caption": _english(f"a {color} {shape} moves {direction}"),
                }
            )
        return items

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __repr__(self) -> str:
        return f"MovingShapes(split={self.split!r}, size={self.size}, frames={self.frames}, image_size={self.image_size}, seed={self.seed})"
