"""Built-in VQA data for ALBEF: questions about rendered shapes (colour, shape, size, count) with a fixed
candidate answer list. Images come from :func:`polymodal.data.synthetic.render`; a counting scene holds
1-3 small shapes at distinct positions, composed from renders that share one key (so one background):
the background is the per-pixel median of at least three renders (no two shapes overlap a pixel's
majority), and each shape adds its difference from it.

>>> ds = SyntheticVQA("train", size=8, image_size=32)
>>> item = ds[0]
>>> item["image"].shape, item["answer"] in ANSWERS, item["kind"] in KINDS
(torch.Size([3, 32, 32]), True, True)
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ...core import random as pr
from ...data.synthetic import CLIP_MEAN, CLIP_STD, COLORS, POSITIONS, SHAPES, SIZES, render
from .text import COUNTS

__all__ = ["ANSWERS", "KINDS", "QUESTIONS", "SyntheticVQA", "count_scene"]

KINDS = ("color", "shape", "size", "count")
QUESTIONS = {"color": "what color is the shape?", "shape": "what kind of shape is in the picture?",
             "size": "what size is the shape?", "count": "how many shapes are there?"}
ANSWERS: tuple[str, ...] = (*COLORS, *SHAPES, *SIZES, *COUNTS)
_SPLITS = {"train": 0, "eval": 1}


def count_scene(key: Tensor, shapes: list[str], colors: list[str], positions: list[str], image_size: int) -> Tensor:
    """``len(shapes)`` small shapes at distinct ``positions`` on one background: ``(3, S, S)`` in [0, 1]."""
    n = len(shapes)
    spare = [p for p in POSITIONS if p not in positions][:max(0, 3 - n)]
    attrs = {"shape": list(shapes) + [shapes[0]] * len(spare), "color": list(colors) + [colors[0]] * len(spare),
             "size": ["small"] * (n + len(spare)), "position": list(positions) + spare}
    imgs = render(key[None].expand(n + len(spare), 2).contiguous(), attrs, image_size)
    bg = imgs.median(dim=0).values
    return (bg + (imgs[:n] - bg).sum(0)).clamp(0, 1)


class SyntheticVQA(Dataset):
    """``{"image" (3, S, S) normalised, "question", "answer", "kind"}``, a pure function of (seed, split, index)."""

    def __init__(self, split: str = "train", size: int = 4096, image_size: int = 32, seed: int = 0) -> None:
        if split not in _SPLITS:
            raise ValueError(f"SyntheticVQA: split: expected one of {tuple(_SPLITS)}, got {split!r}")
        self.split, self.size, self.image_size = split, size, image_size
        self.key = pr.fold_in(pr.key(seed + 7919), _SPLITS[split])

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.size:
            raise IndexError(f"SyntheticVQA: index {i} outside [0, {self.size})")
        k_attr, k_img = pr.split(pr.fold_in(self.key, i), 2)
        d = pr.randint(k_attr, (12,), 0, 1 << 30).tolist()
        kind = KINDS[d[0] % len(KINDS)]
        pick = lambda seq, j: seq[d[j] % len(seq)]  # noqa: E731
        if kind == "count":
            n = 1 + d[1] % 3
            order = pr.permutation(pr.fold_in(k_attr, 1), len(POSITIONS)).tolist()[:n]
            image = count_scene(k_img, [pick(SHAPES, 2 + j) for j in range(n)],
                                [pick(tuple(COLORS), 5 + j) for j in range(n)], [tuple(POSITIONS)[j] for j in order],
                                self.image_size)
            answer = COUNTS[n - 1]
        else:
            attrs = {"shape": pick(SHAPES, 2), "color": pick(tuple(COLORS), 3), "size": pick(tuple(SIZES), 4),
                     "position": pick(tuple(POSITIONS), 8)}
            image = render(k_img, {a: [v] for a, v in attrs.items()}, self.image_size)[0]
            answer = attrs[kind]
        image = (image - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
        return {"image": image, "question": QUESTIONS[kind], "answer": answer, "kind": kind}
