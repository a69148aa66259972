"""Contrastive loss with a learned temperature (CLIP, FLAVA), with cross-rank gathering.

``contrastive_loss_with_temperature(a, b, logit_scale)`` is TorchMultimodal's function of the
same name: symmetric cross-entropy over ``exp(logit_scale) * a @ b_all.T``, where ``b_all``
(and ``a_all``) are the embeddings of every data-parallel rank when ``torch.distributed`` is
initialised and the local ones otherwise. :class:`ContrastiveLoss` is the spec holding the
learnable ``logit_scale`` (TorchMultimodal's ``ContrastiveLossWithTemperature``).

How gradients cross the gather (``backprop_type``, TorchMultimodal's ``BackpropType``):

* ``"global"``: autograd all-gather; the backward sums every rank's gradient for a rank's
  embeddings into that rank. With ``W`` equal local batches, each rank's loss is the mean over
  its own rows, so ``mean_r(loss_r)`` is the full-batch loss ``L`` and the gradient a rank
  receives for its embeddings is ``d(sum_r loss_r)/d emb_r = W * dL/d emb_r``. DDP's gradient
  averaging divides by ``W`` again, so the parameter gradients equal full-batch training.
* ``"local"``: other ranks' embeddings are constants; a rank's own block still takes part in
  both terms (``emb_a @ b_all.T`` and ``emb_b @ a_all.T``), so ``emb_r`` gets ``d loss_r / d emb_r``.
* ``"none"``: every gathered embedding is a constant, including the own block: only the
  query side (``emb_a`` in ``logits_a``, ``emb_b`` in ``logits_b``) carries gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..pytree import Params
from ..spec import Spec, check_dtype, check_floating, check_ndim

__all__ = ["ContrastiveLossOutput", "contrastive_loss_with_temperature", "gather_embeddings", "ContrastiveLoss"]

BACKPROP_TYPES = ("global", "local", "none")


class ContrastiveLossOutput(NamedTuple):
    """Fields of TorchMultimodal's ``ContrastiveLossOutput``."""

    loss: Tensor  # () (or per row with reduction="none"): (loss_a + loss_b) / 2
    logits_a: Tensor  # (B, B_global): scaled similarity of each local a to every b
    logits_b: Tensor  # (B, B_global): scaled similarity of each local b to every a
    loss_a: Tensor  # cross-entropy of logits_a against the matching column
    loss_b: Tensor  # cross-entropy of logits_b against the matching column


def _backprop_type(bt: Any) -> str:
    name = str(getattr(bt, "name", bt)).lower()  # also takes TorchMultimodal's BackpropType enum
    if name not in BACKPROP_TYPES:
        raise ValueError(f"contrastive loss: expected backprop_type in {BACKPROP_TYPES}, got {bt!r}")
    return name


def gather_embeddings(x: Tensor, backprop_type: str = "global", group: Any = None) -> tuple[Tensor, int]:
    """All ranks' ``x (B, D)`` concatenated in rank order ``(W * B, D)``, and this rank's index.

    Without an initialised process group: ``(x, 0)``. Gradients cross the gather as
    ``backprop_type`` says (see the module docstring). All ranks must pass the same shape.
    """
    bt = _backprop_type(backprop_type)
    if not (dist.is_available() and dist.is_initialized()):
        return x, 0
    import torch.distributed._functional_collectives as fc

    group = dist.group.WORLD if group is None else group
    rank = dist.get_rank(group)
    if bt == "global":
        gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd
        return gather(x.contiguous(), 0, group), rank
    gather = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor
    everyone = gather(x.detach().contiguous(), 0, group)
    if bt == "none":
        return everyone, rank
    b = x.shape[0]  # "local": this rank's block is the live tensor, the others are constants
    return torch.cat([everyone[: rank * b], x, everyone[(rank + 1) * b :]]), rank


def _reduce(per_row: Tensor, weights: Tensor, mask: Tensor, reduction: str) -> Tensor:
    per_row = per_row * mask.to(per_row.dtype)
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / (weights * mask.to(weights.dtype)).sum()


def contrastive_loss_with_temperature(
    emb_a: Tensor,
    emb_b: Tensor,
    logit_scale: Tensor | float,
    *,
    mask: Tensor | None = None,
    cross_entropy_kwargs: dict[str, Any] | None = None,
    backprop_type: str = "global",
    group: Any = None,
) -> ContrastiveLossOutput:
    """Symmetric InfoNCE over a batch of paired embeddings (CLIP Fig. 3).

    ``logits_a = emb_a @ all(emb_b).T * exp(logit_scale)``, ``logits_b`` likewise with the roles
    swapped; the target of local row ``i`` on rank ``r`` is column ``r * B + i``;
    ``loss = (CE(logits_a) + CE(logits_b)) / 2``. Embeddings are used as given (normalise them
    first for cosine similarity).

    Args:
        emb_a, emb_b: ``(B, D)`` local embeddings of the two modalities (pairs share a row).
        logit_scale: ``()`` the *log* of the inverse temperature.
        mask: ``(B,)`` bool, rows that count in the loss. As in TorchMultimodal, masked-out rows
            still serve as negatives for the others; unlike it (which drops them, a
            data-dependent shape), they stay in ``logits_*`` and get zero weight in the loss,
            so the function stays vmap/compile-safe. ``logits_a[mask]`` is its layout.
        cross_entropy_kwargs: extra ``F.cross_entropy`` arguments (``label_smoothing``,
            ``weight``, ``reduction``...). With ``mask`` and ``reduction="none"`` the per-row
            losses come back ``(B,)`` with zeros at masked rows.
        backprop_type: ``"global"``, ``"local"`` or ``"none"`` (module docstring).
        group: the process group to gather over (default: the world).

    >>> import torch
    >>> a = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    >>> out = contrastive_loss_with_temperature(a, a, torch.tensor(math.log(100.0)))
    >>> out.logits_a.shape, bool(out.loss < 0.1)
    (torch.Size([4, 4]), True)
    """
    check_floating(emb_a, "contrastive loss: emb_a")
    check_floating(emb_b, "contrastive loss: emb_b")
    check_ndim(emb_a, "contrastive loss: emb_a", 2, "(B, D)")
    if emb_a.shape[0] == 0:  # the mean over no pairs would be nan
        raise ValueError(f"contrastive loss: emb_a: expected at least one pair, shape (B >= 1, D), "
                         f"got {tuple(emb_a.shape)}")
    if emb_b.shape != emb_a.shape:
        raise ValueError(
            f"contrastive loss: emb_b: expected shape {tuple(emb_a.shape)} (as emb_a), got {tuple(emb_b.shape)}"
        )
    if not isinstance(logit_scale, Tensor):
        logit_scale = torch.tensor(float(logit_scale), dtype=emb_a.dtype, device=emb_a.device)
    if logit_scale.numel() != 1:
        raise ValueError(f"contrastive loss: logit_scale: expected a scalar, got shape {tuple(logit_scale.shape)}")
    if mask is not None:
        check_dtype(mask, "contrastive loss: mask", (torch.bool,))
        if tuple(mask.shape) != (emb_a.shape[0],):
            raise ValueError(f"contrastive loss: mask: expected shape ({emb_a.shape[0]},), got {tuple(mask.shape)}")

    temperature = torch.exp(logit_scale)
    a_all, rank = gather_embeddings(emb_a, backprop_type, group)
    b_all, _ = gather_embeddings(emb_b, backprop_type, group)
    b = emb_a.shape[0]
    labels = b * rank + torch.arange(b, device=emb_a.device)
    # Same op order as TorchMultimodal, so single-process outputs match it bit for bit.
    logits_a = torch.matmul(emb_a, b_all.transpose(0, 1)) * temperature
    logits_b = torch.matmul(emb_b, a_all.transpose(0, 1)) * temperature

    ce = dict(cross_entropy_kwargs or {})
    if mask is None:
        loss_a = F.cross_entropy(logits_a, labels, **ce)
        loss_b = F.cross_entropy(logits_b, labels, **ce)
    else:
        reduction = ce.pop("reduction", "mean")
        # Denominator of F.cross_entropy's mean: class weight of each counted, non-ignored row.
        weights = ce["weight"][labels] if ce.get("weight") is not None else torch.ones_like(logits_a[:, 0])
        weights = weights * (labels != ce.get("ignore_index", -100)).to(weights.dtype)
        loss_a = _reduce(F.cross_entropy(logits_a, labels, reduction="none", **ce), weights, mask, reduction)
        loss_b = _reduce(F.cross_entropy(logits_b, labels, reduction="none", **ce), weights, mask, reduction)
    return ContrastiveLossOutput((loss_a + loss_b) / 2, logits_a, logits_b, loss_a, loss_b)


@dataclass(frozen=True)
class ContrastiveLoss(Spec):
    """:func:`contrastive_loss_with_temperature` with a learnable ``logit_scale`` (param ``()``).

    The scale is clamped to ``[logit_scale_min, logit_scale_max]`` in the forward with a
    straight-through gradient: the same value and gradient as TorchMultimodal's
    ``ContrastiveLossWithTemperature``, which clamps the parameter in place. The stored value is
    not changed (the core never mutates params): clamp it after the optimiser step if you want
    it kept in range (``p["logit_scale"].data.clamp_(lo, hi)``), as open_clip does.

    >>> import torch
    >>> from polymodal.core import random as pr
    >>> spec = ContrastiveLoss()
    >>> p = spec.init(key=pr.key(0))
    >>> a, b = torch.randn(4, 8), torch.randn(4, 8)
    >>> spec(p, a, b).loss.shape
    torch.Size([])
    """

    logit_scale_init: float = math.log(1 / 0.07)  # initial log inverse temperature (CLIP)
    logit_scale_min: float | None = math.log(1)  # lower clamp of logit_scale (None: none)
    logit_scale_max: float | None = math.log(100)  # upper clamp of logit_scale (None: none)

    def __post_init__(self) -> None:
        lo, hi = self.logit_scale_min, self.logit_scale_max
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"ContrastiveLoss: expected logit_scale_min <= logit_scale_max, got {lo} > {hi}")

    def init(self, *, key: Tensor | None = None) -> Params:
        return {"logit_scale": torch.tensor(float(self.logit_scale_init))}

    def __call__(
        self,
        params: Params,
        emb_a: Tensor,
        emb_b: Tensor,
        *,
        mask: Tensor | None = None,
        cross_entropy_kwargs: dict[str, Any] | None = None,
        backprop_type: str = "global",
        group: Any = None,
    ) -> ContrastiveLossOutput:
        """``emb_a, emb_b (B, D)`` -> :class:`ContrastiveLossOutput` (``.loss`` is the scalar)."""
        s = params["logit_scale"]
        if self.logit_scale_min is not None or self.logit_scale_max is not None:
            # Value exactly the clamped one, gradient 1 everywhere (as an in-place clamp of .data).
            s = s.clamp(self.logit_scale_min, self.logit_scale_max).detach() + (s - s.detach())
        return contrastive_loss_with_temperature(
            emb_a, emb_b, s, mask=mask, cross_entropy_kwargs=cross_entropy_kwargs,
            backprop_type=backprop_type, group=group,
        )
