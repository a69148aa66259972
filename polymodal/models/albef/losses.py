"""ALBEF's objectives as plain functions: ITC with momentum distillation, hard-negative sampling for
ITM, masked-LM with momentum distillation, and the answer decoder's causal LM loss (VQA).

Formulas follow TorchMultimodal's ``modules/losses/albef.py`` (``ImageTextContrastiveLoss``,
``CausalLanguageModelingLoss``) and the ALBEF paper (Li et al. 2021, Eq. 2-6).

>>> import torch
>>> sim = torch.eye(3) * 5
>>> float(itc_loss(sim, sim, targets=torch.eye(3))) < 0.02
True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core import random as pr

__all__ = ["itc_loss", "similarity_targets", "negative_weights", "sample_negatives", "mlm_distill_loss", "clm_loss"]


def similarity_targets(idx: Tensor, idx_all: Tensor) -> Tensor:
    """``(B, B + Q)`` targets: uniform over the columns whose id equals the row's (TorchMultimodal's
    ``sim_targets``; the row's own column always matches)."""
    pos = (idx.reshape(-1, 1) == idx_all.reshape(1, -1)).to(torch.float32)
    return pos / pos.sum(1, keepdim=True)


def itc_loss(sim_i2t: Tensor, sim_t2i: Tensor, sim_i2t_m: Tensor | None = None, sim_t2i_m: Tensor | None = None,
             *, targets: Tensor, alpha: float = 0.0) -> Tensor:
    """Image-text contrastive loss with momentum distillation: cross-entropy of each row against
    ``alpha * softmax(sim_m) + (1 - alpha) * targets``; the mean of both directions.

    Args:
        sim_i2t, sim_t2i: ``(B, B + Q)`` logits (already divided by the temperature).
        sim_i2t_m, sim_t2i_m: the momentum model's logits (needed when ``alpha != 0``).
        targets: ``(B, B + Q)`` rows summing to 1 (:func:`similarity_targets`).
    """
    if alpha != 0:
        if sim_i2t_m is None or sim_t2i_m is None:
            raise ValueError(f"itc_loss: alpha={alpha} needs the momentum similarities sim_i2t_m and sim_t2i_m")
        t_i2t = (alpha * F.softmax(sim_i2t_m.detach(), dim=1) + (1 - alpha) * targets).detach()
        t_t2i = (alpha * F.softmax(sim_t2i_m.detach(), dim=1) + (1 - alpha) * targets).detach()
    else:
        t_i2t = t_t2i = targets
    loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * t_i2t, dim=1).mean()
    loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * t_t2i, dim=1).mean()
    return (loss_i2t + loss_t2i) / 2


def negative_weights(sim: Tensor, idx: Tensor | None = None) -> Tensor:
    """``(B, B)`` sampling weights for hard negatives: ``softmax(sim[:, :B])`` (no gradient) with the
    positives zeroed. With ``idx`` every in-batch sample sharing the row's id is a positive (the
    ALBEF repository's retrieval rule: two captions of one image are no negatives of each other);
    without it only the diagonal (TorchMultimodal's ``fill_diagonal_(0)``). A row with no candidate
    left (every sample shares its id) falls back to uniform weights off the diagonal."""
    b = sim.shape[0]
    w = F.softmax(sim.detach()[:, :b].float(), dim=1)
    eye = torch.eye(b, dtype=torch.bool, device=sim.device)
    pos = eye if idx is None else (idx.reshape(-1, 1) == idx.reshape(1, -1)) | eye
    w = w.masked_fill(pos, 0.0)
    empty = (w.sum(1, keepdim=True) <= 0).to(w.dtype)
    return w + empty * (~eye).to(w.dtype)


def sample_negatives(weights: Tensor, key: Tensor) -> Tensor:
    """One index per row drawn from the (unnormalised) row weights ``(B, B)`` with an explicit key
    (inverse-CDF on a uniform draw): ``(B,)`` int64. Rows need a positive sum."""
    cdf = weights.cumsum(1)
    u = pr.uniform(key, (weights.shape[0], 1)).to(cdf) * cdf[:, -1:]
    return (cdf <= u).sum(1).clamp(max=weights.shape[1] - 1)


def mlm_distill_loss(logits: Tensor, labels: Tensor, logits_m: Tensor | None = None, alpha: float = 0.0,
                     ignore_index: int = -100) -> Tensor:
    """Masked-LM loss with momentum distillation (ALBEF, ``xbert.BertForMaskedLM``): the mean over masked
    positions of ``(1 - alpha) * CE(logits, labels) + alpha * CE(logits, softmax(logits_m))``.

    Args:
        logits: ``(B, T, V)``. labels: ``(B, T)``, ``ignore_index`` where nothing is predicted.
        logits_m: the momentum model's ``(B, T, V)`` (needed when ``alpha != 0``).
    """
    v = logits.shape[-1]
    valid = labels != ignore_index
    n = valid.sum().clamp(min=1).to(logits.dtype)
    ce = F.cross_entropy(logits.reshape(-1, v), labels.reshape(-1), ignore_index=ignore_index, reduction="sum") / n
    if alpha == 0:
        return ce
    if logits_m is None:
        raise ValueError(f"mlm_distill_loss: alpha={alpha} needs the momentum logits logits_m")
    soft = -(F.log_softmax(logits, dim=-1) * F.softmax(logits_m.detach(), dim=-1)).sum(-1)
    distill = (soft * valid).sum() / n
    return (1 - alpha) * ce + alpha * distill


def clm_loss(labels: Tensor, scores: Tensor, scores_m: Tensor | None = None, alpha: float = 0.0,
             ignore_index: int = -100) -> Tensor:
    """Per-sequence next-token loss of the answer decoder (TorchMultimodal's ``CausalLanguageModelingLoss``):
    ``(N,)`` sums over positions of the shifted cross-entropy, mixed with the momentum decoder's soft
    targets by ``alpha``.

    Args:
        labels: ``(N, M)`` answer ids, ``ignore_index`` at padding. scores: ``(N, M, V)``.
    """
    n = labels.shape[0]
    s = scores[:, :-1, :]
    y = labels[:, 1:]
    loss = F.cross_entropy(s.reshape(-1, s.shape[-1]), y.reshape(-1), ignore_index=ignore_index,
                           reduction="none").view(n, -1).sum(1)
    if alpha == 0:
        return loss
    if scores_m is None:
        raise ValueError(f"clm_loss: alpha={alpha} needs the momentum scores scores_m")
    soft = -(F.log_softmax(s, dim=-1) * F.softmax(scores_m.detach()[:, :-1, :], dim=-1)).sum(-1)
    distill = (soft * (y != ignore_index)).sum(1)
    return (1 - alpha) * loss + alpha * distill
