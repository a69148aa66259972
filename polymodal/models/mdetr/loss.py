"""MDETR's losses (Kamath et al. 2021, Section 2.2): soft-token prediction, contrastive alignment,
box L1 + generalised IoU (torchvision.ops), GQA question-type cross-entropies; all normalised by the
number of target boxes (at least 1), as the reference.

Targets per sample ``i``: ``boxes (N_i, 4)`` normalised (cx, cy, w, h); ``positive_map (N_i, C)``: each
box's phrase tokens as a distribution over the ``C = num_classes + 1`` logit slots (the last slot is
"no object"); ``token_map (N_i, T)`` bool: the same phrase tokens over the text's ``T`` tokens (the
contrastive loss's positives). ``indices`` come from :func:`~.matcher.hungarian_match`.

>>> import torch
>>> logits = torch.zeros(1, 2, 4)
>>> pm = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
>>> idx = [(torch.tensor([0]), torch.tensor([0]))]
>>> round(float(soft_token_loss(logits, pm, [1], idx, 1.0)), 4)  # (log 4 + 0.1 log 4) / 1
1.5249
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops.boxes import box_convert, generalized_box_iou

__all__ = ["soft_token_loss", "box_losses", "contrastive_alignment_loss", "masked_cross_entropy",
           "masked_accuracy", "vqa_accuracy", "gqa_masks", "GQA_TYPES", "src_permutation"]

# GQA's answer type -> the head that answers it (MDETR's ``answer_type`` values 0..4).
GQA_TYPES = ("answer_obj", "answer_attr", "answer_rel", "answer_global", "answer_cat")


def src_permutation(indices: Sequence[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """``(batch index, query index)`` of every matched query, concatenated over the batch."""
    batch = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    return batch, torch.cat([src for src, _ in indices])


def soft_token_loss(pred_logits: Tensor, positive_map: Tensor, n_boxes: Sequence[int],
                    indices: Sequence[tuple[Tensor, Tensor]], num_boxes: float, no_object_weight: float = 0.1) -> Tensor:
    """Cross-entropy of every query's ``log_softmax(logits) (B, Q, C)`` against its matched box's
    ``positive_map`` row, or the no-object slot (weighted ``no_object_weight``) for unmatched queries."""
    logp = pred_logits.log_softmax(-1)
    src = src_permutation(indices)
    offsets = torch.tensor([0, *n_boxes[:-1]], dtype=torch.int64).cumsum(0).tolist()
    tgt = torch.cat([t + o for (_, t), o in zip(indices, offsets)])
    target = torch.zeros_like(logp)
    target[:, :, -1] = 1
    target[src] = positive_map[tgt].to(logp.dtype)
    weight = torch.full(logp.shape[:2], no_object_weight, dtype=logp.dtype, device=logp.device)
    weight[src] = 1
    return (-(logp * target).sum(-1) * weight).sum() / num_boxes


def box_losses(pred_boxes: Tensor, target_boxes: Sequence[Tensor], indices: Sequence[tuple[Tensor, Tensor]],
               num_boxes: float) -> tuple[Tensor, Tensor]:
    """``(L1, 1 - GIoU)`` summed over the matched pairs, divided by ``num_boxes``."""
    src = pred_boxes[src_permutation(indices)]
    tgt = torch.cat([t[j] for t, (_, j) in zip(target_boxes, indices)]).to(src.dtype)
    l1 = F.l1_loss(src, tgt, reduction="sum") / num_boxes
    giou = torch.diag(generalized_box_iou(box_convert(src, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy")))
    return l1, (1 - giou).sum() / num_boxes


def contrastive_alignment_loss(query_emb: Tensor, token_emb: Tensor, token_maps: Sequence[Tensor],
                               indices: Sequence[tuple[Tensor, Tensor]], num_boxes: float,
                               temperature: float = 0.07) -> Tensor:
    """Symmetric InfoNCE between L2-normalised query ``(B, Q, d)`` and token ``(B, T, d)`` embeddings:
    a matched query's positives are its box's phrase tokens (``token_maps[i] (N_i, T)`` bool), a token's
    positives the queries matched to boxes it names; rows without positives add nothing."""
    logits = query_emb @ token_emb.transpose(-1, -2) / temperature  # (B, Q, T)
    pos = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    for i, ((src, tgt), tm) in enumerate(zip(indices, token_maps)):
        if len(src):
            pos[i, src] = tm[tgt].to(logits.device)
    pos_logits = -logits.masked_fill(~pos, 0)

    def one_side(dim: int) -> Tensor:
        has = pos.any(dim)
        term = pos_logits.sum(dim) / (pos.sum(dim) + 1e-6) + logits.logsumexp(dim)
        return term.masked_fill(~has, 0).sum()

    return (one_side(2) + one_side(1)) / 2 / num_boxes


def masked_cross_entropy(preds: Mapping[str, Tensor], labels: Mapping[str, Tensor],
                         masks: Mapping[str, Tensor | None], *, reference_mean: bool = False) -> dict[str, Tensor]:
    """``{head}_loss``: each head's cross-entropy over the samples its mask selects (GQA: the question
    type's head), divided by their number (1 if none).

    ``reference_mean=True`` reproduces TorchMultimodal's ``examples/mdetr/loss.py``, whose
    ``F.cross_entropy`` keeps the default mean reduction, so the mask never removes a sample: the loss is
    the mean over *every* sample (on labels that other question types leave meaningless). Off by default.
    """
    if set(preds) != set(labels):
        raise ValueError(f"masked_cross_entropy: expected the same heads in preds and labels, got {sorted(preds)} "
                         f"and {sorted(labels)}")
    out = {}
    for k, pred in preds.items():
        mask = masks.get(k)
        mask = torch.ones(pred.shape[0], dtype=torch.bool, device=pred.device) if mask is None else mask
        norm = mask.sum().clamp(min=1)
        ce = F.cross_entropy(pred, labels[k], reduction="mean" if reference_mean else "none")
        out[f"{k}_loss"] = (ce * mask if not reference_mean else ce.expand(mask.shape) * mask).sum() / norm
    return out


def masked_accuracy(preds: Mapping[str, Tensor], labels: Mapping[str, Tensor], masks: Mapping[str, Tensor],
                    type_key: str = "answer_type") -> dict[str, Tensor]:
    """``{head}_accuracy`` over each head's masked samples (1 where none) and ``answer_total_accuracy``:
    the type head's accuracy times the count-weighted accuracy of the answer heads (the reference's
    formula; :func:`vqa_accuracy` counts the questions whose type and answer are both right)."""
    acc = {}
    for k, pred in preds.items():
        mask = masks.get(k)
        mask = torch.ones(pred.shape[0], dtype=torch.bool, device=pred.device) if mask is None else mask
        right = (pred.argmax(-1) == labels[k]) & mask
        acc[f"{k}_accuracy"] = right.sum() / mask.sum() if bool(mask.any()) else pred.new_tensor(1.0)
    weighted = sum(acc[f"{k}_accuracy"] * masks[k].sum() for k in preds if k != type_key)
    acc["answer_total_accuracy"] = acc[f"{type_key}_accuracy"] * weighted / labels[type_key].numel()
    return acc


def gqa_masks(answer_type: Tensor) -> dict[str, Tensor | None]:
    """Which head answers each question: ``answer_type (B,)`` in 0..4 -> ``{head: (B,) bool}``
    (``answer_type`` itself: every sample)."""
    return {"answer_type": None} | {name: answer_type == i for i, name in enumerate(GQA_TYPES)}


def vqa_accuracy(preds: Mapping[str, Tensor], labels: Mapping[str, Tensor]) -> Tensor:
    """The share of questions whose predicted type is right and whose type's head answers right."""
    t = labels["answer_type"]
    right = preds["answer_type"].argmax(-1) == t
    answer = torch.zeros_like(right)
    for i, name in enumerate(GQA_TYPES):
        if name in preds:
            answer = answer | ((t == i) & (preds[name].argmax(-1) == labels[name]))
    return (right & answer).float().mean()
