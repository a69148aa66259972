"""Hungarian matching of MDETR's object queries to the target boxes (Carion et al. 2020, Section 3.1;
Kamath et al. 2021, Section 2.2), with ``scipy.optimize.linear_sum_assignment``.

The cost of pairing query ``q`` with box ``j`` is
``cost_bbox * L1(box_q, box_j) - cost_class * sum_t softmax(logits_q)_t * positive_map_jt
- cost_giou * GIoU(box_q, box_j)``: the soft-token "class" cost is the predicted probability mass on
the box's phrase tokens (``positive_map`` rows sum to 1). The costs are computed for the whole batch
at once (no gradient); only the assignment itself runs per sample on the CPU.

>>> import torch
>>> logits = torch.zeros(1, 3, 5)
>>> boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9]]])
>>> pm = torch.tensor([[0.0, 1.0, 0.0, 0.0, 0.0]])
>>> [(q.tolist(), t.tolist()) for q, t in hungarian_match(logits, boxes, [torch.tensor([[0.7, 0.7, 0.2, 0.2]])], pm)]
[([1], [0])]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops.boxes import box_convert, generalized_box_iou

__all__ = ["hungarian_match", "matching_cost"]


@torch.no_grad()
def matching_cost(pred_logits: Tensor, pred_boxes: Tensor, target_boxes: Tensor, positive_map: Tensor, *,
                  cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> Tensor:
    """``(B, Q, C)``, ``(B, Q, 4)``, all targets ``(N, 4)`` (cx, cy, w, h) and ``positive_map (N, C)`` ->
    the cost of every query against every target of the batch, ``(B, Q, N)``."""
    b, q = pred_logits.shape[:2]
    if target_boxes.shape[0] != positive_map.shape[0]:
        raise ValueError(f"matching_cost: expected one positive_map row per target box ({target_boxes.shape[0]}), "
                         f"got {positive_map.shape[0]}")
    if positive_map.shape[-1] != pred_logits.shape[-1]:
        raise ValueError(f"matching_cost: positive_map: expected (N, {pred_logits.shape[-1]}) (the logits' width), "
                         f"got {tuple(positive_map.shape)}")
    prob = F.softmax(pred_logits.flatten(0, 1).float(), dim=-1)
    boxes = pred_boxes.flatten(0, 1).float()
    tgt = target_boxes.float()
    c_class = -(prob @ positive_map.float().T)
    c_bbox = torch.cdist(boxes, tgt, p=1)
    c_giou = -generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(tgt, "cxcywh", "xyxy"))
    return (cost_bbox * c_bbox + cost_class * c_class + cost_giou * c_giou).view(b, q, -1)


@torch.no_grad()
def hungarian_match(pred_logits: Tensor, pred_boxes: Tensor, target_boxes: Sequence[Tensor], positive_map: Tensor, *,
                    cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0
                    ) -> list[tuple[Tensor, Tensor]]:
    """Per sample ``(query indices, target indices)`` int64, each of length ``min(Q, N_i)``, sorted by query.

    ``target_boxes``: one ``(N_i, 4)`` tensor per sample (an empty sample matches nothing);
    ``positive_map``: the rows of every sample's boxes stacked, ``(sum N_i, C)``. Defaults are MDETR's
    (cost_class 1, cost_bbox 5, cost_giou 2).
    """
    if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
        raise ValueError("hungarian_match: at least one cost must be nonzero")
    if len(target_boxes) != pred_logits.shape[0]:
        raise ValueError(f"hungarian_match: expected one target tensor per sample ({pred_logits.shape[0]}), "
                         f"got {len(target_boxes)}")
    sizes = [int(t.shape[0]) for t in target_boxes]
    empty = torch.zeros(0, dtype=torch.int64)
    if sum(sizes) == 0:
        return [(empty, empty) for _ in sizes]
    cost = matching_cost(pred_logits, pred_boxes, torch.cat(list(target_boxes)), positive_map,
                         cost_class=cost_class, cost_bbox=cost_bbox, cost_giou=cost_giou).cpu()
    out = []
    for i, c in enumerate(cost.split(sizes, -1)):
        rows, cols = linear_sum_assignment(c[i].numpy())
        out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return out
