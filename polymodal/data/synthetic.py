"""The built-in synthetic image-caption dataset: coloured shapes on noisy backgrounds.

Every image is a pure function of a random key and its attributes (shape, colour,
size, position): coordinate grids, signed distances and soft masks, rendered in
batches with plain tensor ops and ``polymodal.core.random`` (torch's global RNG is
never touched). Captions come from templates, and some (shape, colour) pairs are
held out of training so that compositional zero-shot transfer can be measured.

>>> ds = SyntheticCaptions("train", size=100, image_size=32, seed=0)
>>> item = ds[3]
>>> item["image"].shape, item["image"].dtype
(torch.Size([3, 32, 32]), torch.float32)
>>> ds.class_names()[item["label"]] in item["caption"]
True
>>> all(p not in ds.heldout for p in ds.pairs)
True
"""

from __future__ import annotations

import functools
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from polymodal.core import random as pr
from polymodal.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

__all__ = [
    "SHAPES",
    "COLORS",
    "SIZES",
    "POSITIONS",
    "TEMPLATES",
    "CLIP_MEAN",
    "CLIP_STD",
    "SyntheticCaptions",
    "default_heldout",
    "render",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")
# RGB in [0, 1], far from each other and from the grey backgrounds.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.10, 0.25, 0.95),
    "yellow": (0.95, 0.90, 0.10),
    "purple": (0.60, 0.10, 0.80),
    "orange": (1.00, 0.50, 0.00),
}
# Radius of the shape as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.11, "large": 0.20}
# Centre (x, y) as fractions of the image side (y grows downwards), and its phrase.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.28, 0.5),
    "right": (0.72, 0.5),
    "top": (0.5, 0.28),
    "bottom": (0.5, 0.72),
    "center": (0.5, 0.5),
}
_WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom", "center": "in the center"}
TEMPLATES: tuple[str, ...] = (
    "a photo of a {size} {color} {shape}",
    "a {color} {shape} {where}",
    "a {size} {color} {shape} {where}",
    "a {color} {shape}",
    "a picture of a {color} {shape} {where}",
    "there is a {size} {color} {shape} {where}",
    "a drawing of a {color} {shape} on a noisy background",
)
CLIP_MEAN, CLIP_STD = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # OpenAI CLIP normalisation

_ATTRS = ("shape", "color", "size", "position")
_VOCAB = {"shape": SHAPES, "color": tuple(COLORS), "size": tuple(SIZES), "position": tuple(POSITIONS)}
_SPLITS = {"train": 0, "eval": 1, "heldout": 2}
_JITTER = 0.04  # position jitter (fraction of the side)
_MAX_TURN = math.pi / 6  # rotation of square / triangle / cross
_NOISE = 0.06  # amplitude of the per-pixel uniform noise
_CHUNK_PIXELS = 1 << 16  # images rendered together: keeps temporaries in cache
_POSITION_XY = torch.tensor(list(POSITIONS.values()))
_RADIUS = torch.tensor(list(SIZES.values()))
_RGB = torch.tensor(list(COLORS.values()))
_AN = re.compile(r"\b([Aa]) (?=[aeiou])")


def _english(text: str) -> str:
    """``a orange`` -> ``an orange``."""
    return _AN.sub(r"\1n ", text)


def _as_index(attrs: Mapping[str, object], name: str) -> Tensor:
    if name not in attrs:
        raise ValueError(f"render: attrs: expected keys {_ATTRS}, got {tuple(attrs)}")
    v, vocab = attrs[name], _VOCAB[name]
    if isinstance(v, Tensor):
        if v.dtype != torch.int64 or v.dim() != 1:
            raise TypeError(f"render: attrs[{name!r}]: expected int64 indices of shape (N,), got {v.dtype} {tuple(v.shape)}")
        return v
    if isinstance(v, str) or not isinstance(v, Sequence):
        raise TypeError(f"render: attrs[{name!r}]: expected a sequence of names or an int64 tensor, got {type(v).__name__}")
    bad = [s for s in v if s not in vocab]
    if bad:
        raise ValueError(f"render: attrs[{name!r}]: expected names from {vocab}, got {bad[:3]}")
    return torch.tensor([vocab.index(s) for s in v], dtype=torch.int64)


@functools.lru_cache(maxsize=8)
def _noise_field(s: int) -> Tensor:
    """A fixed field of uniform noise in [-1, 1), ``(3, 2s, 2s)``, a pure function of ``s``.

    Each image adds the ``(s, s)`` window of it at an offset drawn from its own key: fresh
    hashed noise for every pixel would cost more than all the rest of the rendering."""
    words = pr.bits(pr.fold_in(pr.key(0x5EED), s), (3 * s * s,))  # four 8-bit values per word
    b = torch.cat([(words >> k) & 255 for k in (0, 8, 16, 24)])
    return ((b.to(torch.float32) - 127.5) * (1.0 / 128.0)).view(3, 2 * s, 2 * s)


def _sdf(shape: int, u: Tensor, v: Tensor, r: Tensor) -> Tensor:
    """Signed distance (negative inside) of shape number ``shape``; ``u, v, r`` broadcast to (B, H, W)."""
    name = SHAPES[shape]
    if name == "circle":
        return torch.sqrt(u * u + v * v) - r
    if name == "ring":
        return (torch.sqrt(u * u + v * v) - 0.775 * r).abs() - 0.225 * r
    if name == "square":
        return torch.maximum(u.abs(), v.abs()) - 0.85 * r
    if name == "triangle":  # pointing up (y grows downwards), inradius 0.65 r
        return torch.maximum(v, torch.maximum(0.866 * u - 0.5 * v, -0.866 * u - 0.5 * v)) - 0.65 * r
    au, av = u.abs(), v.abs()  # cross: union of two bars
    return torch.minimum(torch.maximum(au - r, av - 0.35 * r), torch.maximum(au - 0.35 * r, av - r))


def _paint(image: Tensor, geo: Tensor, colours: Tensor, shape: Tensor, offsets: Tensor) -> None:
    """Draw into ``image`` ``(B, 3, s, s)`` from per-image geometry ``(B, 7)``, colours ``(B, 2, 3)``,
    shape indices ``(B,)`` sorted so that each shape kind is one contiguous run, and noise offsets ``(B, 2)``."""
    b, s = geo.shape[0], image.shape[-1]
    grid = (torch.arange(s, dtype=torch.float32) + 0.5) / s
    xs, ys = grid.view(1, 1, s), grid.view(1, s, 1)
    cx, cy, cos, sin, radius, gx, gy = (t.view(b, 1, 1) for t in geo.unbind(1))
    torch.add(colours[:, 1, :, None, None], (gx * (xs - 0.5) + gy * (ys - 0.5)).unsqueeze(1), out=image)  # background
    # Shapes reach at most 1.3 r from their centre (the triangle's tips): draw only inside the
    # pixel window that holds every shape of the chunk, where the anti-aliased mask can be > 0.
    reach = 1.3 * radius + 1.0 / s
    x0, y0 = ((torch.cat([cx - reach, cy - reach], 1).amin(0) * s).floor().clamp(0, s)).long().flatten().tolist()
    x1, y1 = ((torch.cat([cx + reach, cy + reach], 1).amax(0) * s).ceil().clamp(0, s)).long().flatten().tolist()
    dx, dy = xs[..., x0:x1] - cx, ys[:, y0:y1] - cy
    u, v = cos * dx + sin * dy, cos * dy - sin * dx  # rotated frame of the shape
    kinds, counts = torch.unique_consecutive(shape, return_counts=True)
    sdf, start = [], 0
    for kind, count in zip(kinds.tolist(), counts.tolist()):  # one pass per run of one shape kind
        run = slice(start, start + count)
        sdf.append(_sdf(kind, u[run], v[run], radius[run]))
        start += count
    mask = (0.5 - torch.cat(sdf) * s).clamp(0.0, 1.0).unsqueeze(1)  # one-pixel anti-aliased edge
    image[:, :, y0:y1, x0:x1].lerp_(colours[:, 0, :, None, None], mask)
    field = _noise_field(s)
    for one, (y, x) in zip(image, offsets.tolist()):
        one.add_(field[:, y : y + s, x : x + s], alpha=_NOISE)
    image[:, :, y0:y1, x0:x1].clamp_(0.0, 1.0)  # see _scene for the background's range


def _scene(keys: Tensor, shape: Tensor, color: Tensor, size: Tensor, pos: Tensor, s: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image geometry ``(B, 7)`` (centre x, y, cos, sin of the turn, radius, background
    gradient x, y), colours ``(B, 2, 3)`` (shape, background) and noise window offsets ``(B, 2)``."""
    k_geom, k_bg, k_noise = pr.split(keys, 3).unbind(-2)
    g = pr.uniform(k_geom, (6,))  # jitter x, jitter y, turn, colour jitter x3
    h = pr.uniform(k_bg, (6,))  # grey, tint x3, gradient angle, gradient strength
    centre = _POSITION_XY[pos] + _JITTER * (2 * g[:, :2] - 1)
    turn = _MAX_TURN * (2 * g[:, 2] - 1)
    angle, slope = 2 * math.pi * h[:, 4], 0.25 * h[:, 5]
    geo = torch.stack([*centre.unbind(1), turn.cos(), turn.sin(), _RADIUS[size], angle.cos() * slope, angle.sin() * slope], 1)
    rgb = _RGB[color] + 0.08 * (g[:, 3:] - 0.5)
    # Background + ramp + noise stays inside [0.3 - 0.04 - 0.25 / sqrt(2) - 0.06, 0.6 + 0.04 + 0.18 + 0.06]
    # = [0.02, 0.88], so only the shapes' window needs clamping.
    grey = 0.3 + 0.3 * h[:, :1] + 0.08 * (h[:, 1:4] - 0.5)
    return geo, torch.stack([rgb, grey], 1), (pr.bits(k_noise, (2,)) * s) >> 32


def render(key: Tensor, attrs: Mapping[str, object], image_size: int = 64, *, normalize: bool = False) -> Tensor:
    """Render a batch of images, one per row of ``attrs``.

    Args:
        key: one key ``(2,)`` (split into one key per image) or a stack of per-image keys
            ``(N, 2)``; image ``i`` depends only on its own key and attributes.
        attrs: ``{"shape", "color", "size", "position"}`` each a sequence of ``N`` names or an
            int64 tensor ``(N,)`` of indices into ``SHAPES``, ``COLORS``, ``SIZES``, ``POSITIONS``.
        image_size: side ``S`` of the square images (>= 8).
        normalize: subtract / divide by the CLIP mean and std.

    Returns:
        float32 images ``(N, 3, S, S)``, in ``[0, 1]`` unless normalised.

    >>> imgs = render(pr.key(0), {"shape": ["circle", "cross"], "color": ["red", "blue"],
    ...                          "size": ["large", "small"], "position": ["left", "center"]}, 32)
    >>> imgs.shape, bool(imgs.min() >= 0) and bool(imgs.max() <= 1)
    (torch.Size([2, 3, 32, 32]), True)
    """
    idx = [_as_index(attrs, name) for name in _ATTRS]
    n = idx[0].shape[0]
    if any(t.shape[0] != n for t in idx):
        raise ValueError(f"render: attrs: expected equal lengths, got {dict(zip(_ATTRS, (t.shape[0] for t in idx)))}")
    for name, t in zip(_ATTRS, idx):
        if n and (int(t.min()) < 0 or int(t.max()) >= len(_VOCAB[name])):
            raise ValueError(f"render: attrs[{name!r}]: expected indices in [0, {len(_VOCAB[name])}), got {t.tolist()[:8]}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"render: image_size: expected an int >= 8, got {image_size!r}")
    if not isinstance(key, Tensor) or key.dtype != torch.int64 or key.dim() not in (1, 2) or key.shape[-1] != 2:
        raise TypeError(f"render: key: expected a key (2,) or a stack of keys (N, 2), got {key!r:.80}")
    keys = pr.split(key, n) if key.dim() == 1 else key
    if keys.shape[0] != n:
        raise ValueError(f"render: key: expected (N, 2) = ({n}, 2) keys for {n} images, got {tuple(keys.shape)}")
    if n == 0:
        return torch.empty(0, 3, image_size, image_size)
    geo, colours, offsets = _scene(keys, *idx, image_size)
    images, step = torch.empty(n, 3, image_size, image_size), max(1, _CHUNK_PIXELS // (image_size * image_size))
    for i in range(0, n, step):  # chunks small enough to stay in cache
        chunk = slice(i, i + step)
        order = torch.argsort(idx[0][chunk], stable=True)  # group shape kinds: one op sequence each
        if bool((order[1:] > order[:-1]).all()):  # already grouped: draw in place
            _paint(images[chunk], geo[chunk], colours[chunk], idx[0][chunk], offsets[chunk])
        else:
            drawn = images.new_empty((len(order), 3, image_size, image_size))
            _paint(drawn, geo[chunk][order], colours[chunk][order], idx[0][chunk][order], offsets[chunk][order])
            images[chunk].index_copy_(0, order, drawn)
    if normalize:  # in place: images is our own
        images.sub_(torch.tensor(CLIP_MEAN).view(3, 1, 1)).div_(torch.tensor(CLIP_STD).view(3, 1, 1))
    return images


def default_heldout(shapes: Sequence[str], colors: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """One held-out colour per shape, on a shifted diagonal: shape ``i`` with colour ``i + 1``.

    Each shape and each colour still appears in training (given at least two colours).

    >>> default_heldout(["circle", "square"], ["red", "green", "blue"])
    (('circle', 'green'), ('square', 'blue'))
    """
    if len(colors) < 2:
        return ()
    return tuple((s, colors[(i + 1) % len(colors)]) for i, s in enumerate(shapes))


def _check_names(name: str, got: Sequence[str], vocab: Sequence[str]) -> tuple[str, ...]:
    if isinstance(got, str) or not isinstance(got, Sequence):
        raise TypeError(f"SyntheticCaptions: {name}: expected a sequence of names, got {type(got).__name__}")
    got = tuple(got)
    bad = [g for g in got if g not in vocab]
    if bad or not got or len(set(got)) != len(got):
        raise ValueError(f"SyntheticCaptions: {name}: expected distinct names from {tuple(vocab)}, got {got}")
    return got


class SyntheticCaptions(Dataset):
    """Procedural image-caption pairs, deterministic per ``(seed, split, index)``.

    Args:
        split: ``"train"`` and ``"eval"`` (different images, same distribution) draw the
            (shape, colour) pairs not held out; ``"heldout"`` draws only the held-out pairs.
        size: number of samples ``N``.
        image_size: side ``S`` of the images.
        seed: integer seed; every image and caption is a pure function of (seed, split, index).
        shapes, colors, sizes, positions: the attribute values used (subsets of the
            module-level ``SHAPES``, ``COLORS``, ``SIZES``, ``POSITIONS``).
        heldout: (shape, colour) pairs never drawn for train / eval; default
            ``default_heldout(shapes, colors)``; ``()`` holds nothing out.
        templates: caption templates with ``{color}`` and ``{shape}`` (and optionally
            ``{size}``, ``{where}``).
        normalize: normalise images with the CLIP mean / std.
        transform: optional callable applied to each image tensor ``(3, S, S)``.

    Items are ``{"image": (3, S, S) float32, "caption": str, "label": int, "attributes":
    {"shape", "color", "size", "position": str}}``; ``label`` indexes ``class_names()``
    (``shape_index * len(colors) + color_index``). ``__getitems__`` renders a whole batch at
    once, so a ``DataLoader`` over this dataset renders batch by batch.

    >>> ds = SyntheticCaptions("heldout", size=8, image_size=32)
    >>> batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    >>> batch["image"].shape, len(batch["caption"])
    (torch.Size([4, 3, 32, 32]), 4)
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 10_000,
        image_size: int = 64,
        seed: int = 0,
        *,
        shapes: Sequence[str] = SHAPES,
        colors: Sequence[str] = tuple(COLORS),
        sizes: Sequence[str] = tuple(SIZES),
        positions: Sequence[str] = tuple(POSITIONS),
        heldout: Sequence[tuple[str, str]] | None = None,
        templates: Sequence[str] = TEMPLATES,
        normalize: bool = False,
        transform: Callable[[Tensor], object] | None = None,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"SyntheticCaptions: split: expected one of {tuple(_SPLITS)}, got {split!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"SyntheticCaptions: size: expected an int >= 0, got {size!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
            raise ValueError(f"SyntheticCaptions: image_size: expected an int >= 8, got {image_size!r}")
        self.split, self.size, self.image_size, self.seed = split, size, image_size, seed
        self.shapes = _check_names("shapes", shapes, SHAPES)
        self.colors = _check_names("colors", colors, tuple(COLORS))
        self.sizes = _check_names("sizes", sizes, tuple(SIZES))
        self.positions = _check_names("positions", positions, tuple(POSITIONS))
        held = default_heldout(self.shapes, self.colors) if heldout is None else tuple(tuple(p) for p in heldout)
        everything = [(s, c) for s in self.shapes for c in self.colors]
        bad = [p for p in held if p not in everything]
        if bad:
            raise ValueError(f"SyntheticCaptions: heldout: expected (shape, color) pairs of {self.shapes} x {self.colors}, got {bad}")
        self.heldout = frozenset(held)
        self.pairs = tuple(p for p in everything if (p in self.heldout) == (split == "heldout"))
        if not self.pairs:
            want = "at least one held-out pair" if split == "heldout" else "at least one pair not held out"
            raise ValueError(f"SyntheticCaptions: split {split!r}: expected {want}, got heldout={sorted(self.heldout)}")
        templates = tuple(templates)
        missing = [t for t in templates if "{color}" not in t or "{shape}" not in t]
        if not templates or missing:
            raise ValueError(f"SyntheticCaptions: templates: expected templates containing {{color}} and {{shape}}, got {missing or templates}")
        self.templates, self.normalize, self.transform = templates, normalize, transform
        self._key = pr.fold_in(pr.key(seed), _SPLITS[split])

    def __len__(self) -> int:
        return self.size

    def class_names(self) -> list[str]:
        """``"{color} {shape}"`` for every shape x colour (held-out pairs included), in label order."""
        return [f"{c} {s}" for s in self.shapes for c in self.colors]

    def prompts(self, template: str = "a photo of a {color} {shape}") -> list[str]:
        """One zero-shot prompt per class, in label order (``template`` takes ``{color}``, ``{shape}``)."""
        return [_english(template.format(color=c, shape=s)) for s in self.shapes for c in self.colors]

    def label(self, shape: str, color: str) -> int:
        """The class index of a (shape, colour) pair."""
        return self.shapes.index(shape) * len(self.colors) + self.colors.index(color)

    def _draw(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        """Per-index render keys ``(B, 2)`` and attribute draws ``(B, 4)`` (pair, size, position, template)."""
        idx = torch.tensor(indices, dtype=torch.int64)
        keys = torch.func.vmap(pr.fold_in, in_dims=(None, 0))(self._key, idx)
        k_attr, k_render = pr.split(keys, 2).unbind(-2)
        counts = torch.tensor([len(self.pairs), len(self.sizes), len(self.positions), len(self.templates)])
        draws = (pr.bits(k_attr, (4,)) * counts) >> 32  # multiply-shift: uniform on [0, count)
        return k_render, draws

    def _index(self, i: object) -> int:
        i = operator.index(i)
        if not -self.size <= i < self.size:
            raise IndexError(f"SyntheticCaptions: index {i} out of range for {self.size} samples")
        return i % self.size if self.size else i

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        """Render several items in one batched call (used by ``DataLoader``)."""
        indices = [self._index(i) for i in indices]
        if not indices:
            return []
        keys, draws = self._draw(indices)
        attrs = [
            dict(zip(_ATTRS, (*self.pairs[pair], self.sizes[si], self.positions[pi])))
            for pair, si, pi, _ in draws.tolist()
        ]
        images = render(keys, {a: [x[a] for x in attrs] for a in _ATTRS}, self.image_size, normalize=self.normalize)
        return [
            {
                "image": image if self.transform is None else self.transform(image),
                "caption": _english(self.templates[ti].format(where=_WHERE[x["position"]], **x)),
                "label": self.label(x["shape"], x["color"]),
                "attributes": x,
            }
            for image, x, ti in zip(images, attrs, draws[:, 3].tolist())
        ]

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __repr__(self) -> str:
        return (
            f"SyntheticCaptions(split={self.split!r}, size={self.size}, image_size={self.image_size}, seed={self.seed}, "
            f"classes={len(self.shapes) * len(self.colors)}, heldout={len(self.heldout)})"
        )
