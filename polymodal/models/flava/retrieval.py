"""Zero-shot image <-> text retrieval on the synthetic shapes with FLAVA's contrastive projections.

The retrieval set has one image per attribute combination (shape, colour, size, position) of a split's
(shape, colour) pairs -- the 250 combinations of the 25 seen pairs -- each paired with the caption that
names all four attributes, ``"a {size} {color} {shape} {where}"`` (a training template). Every caption is
therefore unique, and true of its own image only: every other image of the set differs in an attribute the
caption names. So the ground truth is one to one (no ties of identical captions to resolve), and recall@k
is :func:`polymodal.eval.recall_at_k` with caption ``i`` belonging to image ``i``: an image is a hit when
its caption ranks in the top k of all the set's captions, a caption when its image ranks in the top k of
all the images. Scores that tie the right answer count in the query's favour (rank = number of strictly
more similar candidates), as in :func:`~polymodal.eval.recall_at_k`.

The images are rendered from their own key (not the training or zero-shot evaluation images).

>>> pairs = retrieval_pairs([("circle", "red")], image_size=32)
>>> pairs.images.shape, pairs.captions[:2]
(torch.Size([10, 3, 32, 32]), ['a small red circle on the left', 'a small red circle on the right'])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ...core import random as pr
from ...data.synthetic import POSITIONS, SIZES, render
from ...eval.retrieval import recall_at_k

__all__ = ["RetrievalPairs", "retrieval_pairs", "retrieval_recall", "caption"]

# The phrases of ``polymodal.data.synthetic``'s ``{where}`` (tests/models/flava/test_flava_retrieval.py checks
# them against its captions).
WHERE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
         "center": "in the center"}


def caption(shape: str, color: str, size: str, position: str) -> str:
    """The caption naming all four attributes (the synthetic data's ``"a {size} {color} {shape} {where}"``)."""
    return f"a {size} {color} {shape} {WHERE[position]}"


class RetrievalPairs(NamedTuple):
    images: Tensor  # (N, 3, S, S) in [0, 1]
    captions: list[str]  # N unique captions; caption i describes image i
    attributes: list[tuple[str, str, str, str]]  # (shape, colour, size, position) of image i


def retrieval_pairs(pairs: Sequence[tuple[str, str]], image_size: int, seed: int = 0) -> RetrievalPairs:
    """One image and its caption per (shape, colour) of ``pairs`` x every size x every position.

    Args:
        pairs: ``(shape, colour)`` pairs (e.g. ``SyntheticCaptions("eval").pairs``: the 25 seen ones).
        image_size: side ``S`` of the images.
        seed: the images are drawn from a key of ``seed`` (positions jittered, rotations, backgrounds).
    """
    attrs = [(s, c, z, p) for s, c in pairs for z in SIZES for p in POSITIONS]
    if not attrs:
        raise ValueError("retrieval_pairs: pairs: expected at least one (shape, colour) pair, got none")
    key = pr.fold_in(pr.fold_in(pr.key(seed), 0x5E7), len(attrs))
    images = render(key, {name: [a[i] for a in attrs] for i, name in enumerate(("shape", "color", "size", "position"))},
                    image_size)
    return RetrievalPairs(images, [caption(*a) for a in attrs], attrs)


@torch.no_grad()
def retrieval_recall(encode_image: Callable[[Tensor], Tensor], encode_text: Callable[[list[str]], Tensor],
                     pairs: RetrievalPairs, ks: Sequence[int] = (1, 5, 10), batch_size: int = 256) -> dict[str, float]:
    """Recall@k both ways over ``pairs``: ``encode_image (B, 3, S, S) -> (B, E)`` and ``encode_text(list of B
    captions) -> (B, E)`` give unit embeddings; returns ``{"image_to_text_R@k", "text_to_image_R@k"}``."""
    n = len(pairs.captions)
    img = torch.cat([encode_image(pairs.images[i:i + batch_size]).float().cpu() for i in range(0, n, batch_size)])
    txt = torch.cat([encode_text(pairs.captions[i:i + batch_size]).float().cpu() for i in range(0, n, batch_size)])
    got = recall_at_k(img, txt, torch.arange(n), ks=ks)
    return {k: v for k, v in got.items() if "_R@" in k}
