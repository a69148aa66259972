"""From MDETR's outputs to boxes in image coordinates, phrase -> box rankings and recall@k.

A phrase's score for a query is the largest probability the query gives to one of the phrase's
tokens (the reference's ``PostProcessFlickr``); its boxes are the queries sorted by that score.
Recall@k at IoU >= 0.5 is Flickr30k Entities' metric (Plummer et al. 2015): a phrase counts when
one of its top-k boxes overlaps one of its ground-truth boxes with IoU >= 0.5.

>>> import torch
>>> to_image_boxes(torch.tensor([[[0.5, 0.5, 0.25, 0.5]]]), torch.tensor([[100, 200]])).tolist()
[[[75.0, 25.0, 125.0, 75.0]]]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops.boxes import box_convert, box_iou

__all__ = ["to_image_boxes", "phrase_scores", "alignment_scores", "rank_phrase_boxes", "recall_at_k"]


def to_image_boxes(pred_boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """Normalised ``(B, Q, 4)`` (cx, cy, w, h) -> pixel (x1, y1, x2, y2) for ``image_sizes (B, 2)`` = (H, W)."""
    if image_sizes.dim() != 2 or image_sizes.shape != (pred_boxes.shape[0], 2):
        raise ValueError(f"to_image_boxes: image_sizes: expected ({pred_boxes.shape[0]}, 2) (height, width), got "
                         f"{tuple(image_sizes.shape)}")
    h, w = image_sizes.to(pred_boxes.dtype).unbind(1)
    scale = torch.stack([w, h, w, h], 1)[:, None, :]
    return box_convert(pred_boxes, "cxcywh", "xyxy") * scale


def phrase_scores(pred_logits: Tensor, phrase_maps: Tensor) -> Tensor:
    """``(B, Q, C)`` logits and ``phrase_maps (B, P, C)`` (a phrase's token slots, nonzero = in it) ->
    ``(B, P, Q)``: each query's largest probability on one of the phrase's tokens."""
    prob = F.softmax(pred_logits, -1)
    pos = (phrase_maps > 1e-6).to(prob.dtype)
    return (pos[:, :, None, :] * prob[:, None, :, :]).amax(-1)


def alignment_scores(query_embeddings: Tensor, token_embeddings: Tensor, token_maps: Tensor) -> Tensor:
    """The contrastive head's view: ``(B, Q, d)`` and ``(B, T, d)`` normalised embeddings and the phrases'
    tokens ``token_maps (B, P, T)`` -> ``(B, P, Q)``, each query's mean similarity to the phrase's tokens."""
    sim = query_embeddings @ token_embeddings.transpose(-1, -2)  # (B, Q, T)
    w = token_maps.to(sim.dtype)
    return (w @ sim.transpose(-1, -2)) / w.sum(-1, keepdim=True).clamp(min=1)


def rank_phrase_boxes(pred_logits: Tensor, pred_boxes: Tensor, phrase_maps: Tensor, image_sizes: Tensor,
                      k: int | None = None, scores: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Boxes of each phrase, best first: ``(B, P, k, 4)`` pixel xyxy and their scores ``(B, P, k)``.
    ``scores (B, P, Q)`` replaces :func:`phrase_scores` (e.g. :func:`alignment_scores`)."""
    scores = phrase_scores(pred_logits, phrase_maps) if scores is None else scores
    k = scores.shape[-1] if k is None else min(k, scores.shape[-1])
    top, idx = scores.topk(k, dim=-1)
    boxes = to_image_boxes(pred_boxes, image_sizes)  # (B, Q, 4)
    picked = torch.gather(boxes[:, None].expand(-1, idx.shape[1], -1, -1), 2, idx[..., None].expand(-1, -1, -1, 4))
    return picked, top


def recall_at_k(ranked: Sequence[Tensor], truth: Sequence[Tensor], ks: Sequence[int] = (1, 5),
                iou: float = 0.5) -> dict[int, float]:
    """``ranked[p] (K, 4)`` predicted and ``truth[p] (G, 4)`` ground-truth xyxy boxes of each phrase ->
    ``{k: share of phrases with one of the top-k boxes at IoU >= iou with a ground-truth box}``."""
    if len(ranked) != len(truth):
        raise ValueError(f"recall_at_k: expected as many rankings as phrases ({len(truth)}), got {len(ranked)}")
    hits = {k: 0 for k in ks}
    for r, t in zip(ranked, truth):
        if len(t) == 0 or len(r) == 0:
            continue
        ok = (box_iou(r, t) >= iou).any(1)  # (K,)
        for k in ks:
            hits[k] += int(ok[:k].any())
    n = max(len(truth), 1)
    return {k: hits[k] / n for k in ks}
