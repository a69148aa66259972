"""FLAVA's pretraining heads and losses (TorchMultimodal's ``modules/losses/flava.py``) as specs.

:class:`FLAVAPretrainingLoss` holds every head and computes, from the model's sequences, the unimodal MLM
(masked text) and MIM (masked image, dVAE codes) losses, the multimodal MMM-text / MMM-image losses, ITM
(image-text matching) and the global contrastive loss (the core's, gathered across ranks). Params keep
TorchMultimodal's names::

    contrastive_loss.logit_scale; {mlm_loss, mim_loss, mmm_loss.mlm, mmm_loss.mim}.cls.{dense, layer_norm,
    decoder.weight, bias}; itm_loss.{pooler.dense, cls.seq_relationship}

Transform-safe formulation (vmap, grad, compile): the masked-prediction losses are a cross-entropy with
``ignore_index`` over every position (outside transforms only the labelled rows go through the head, the
reference's boolean selection: the same value, less work); ITM's negative pairs are left out of the
multimodal masked losses by relabelling them ``ignore_index`` and of the contrastive loss by its row mask,
instead of the reference's data-dependent row selection. The values equal the reference's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core import random as pr
from ...core.layers.linear import Linear
from ...core.layers.norm import LayerNorm
from ...core.losses.contrastive import ContrastiveLoss
from ...core.pytree import Params
from ...core.spec import Spec, reading_values_ok
from .encoders import tanh_pooler

__all__ = ["MaskedPredictionHead", "FLAVAPretrainingLoss", "FLAVALosses", "masked_prediction_loss", "LOSS_NAMES"]

LOSS_NAMES = ("mlm_loss", "mim_loss", "mmm_text_loss", "mmm_image_loss", "itm_loss", "global_contrastive_loss")


@dataclass(frozen=True)
class MaskedPredictionHead(Spec):
    """``(*, D) -> (*, V)``: dense, GELU, LayerNorm (fp32, eps 1e-5), decoder + bias (not tied)."""

    hidden_size: int  # D
    vocab_size: int  # V (30522 text tokens or 8192 image codes)
    layer_norm_eps: float = 1e-5  # TorchMultimodal's default here (not the encoders' 1e-12)
    init_std: float = 0.02  # N(0, std) of the dense and decoder weights

    def norm(self) -> LayerNorm:
        return LayerNorm(self.hidden_size, eps=self.layer_norm_eps, fp32=True)

    def init(self, *, key: Tensor) -> Params:
        kd, ko = pr.split(key, 2)
        return {"dense": Linear(self.hidden_size, self.hidden_size, weight_init="normal",
                                init_std=self.init_std).init(key=kd),
                "layer_norm": self.norm().init(key=key),
                "decoder": {"weight": pr.normal(ko, (self.vocab_size, self.hidden_size)) * self.init_std},
                "bias": torch.zeros(self.vocab_size)}

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        h = F.gelu(F.linear(x, params["dense"]["weight"], params["dense"]["bias"]))
        h = self.norm()(params["layer_norm"], h)
        return F.linear(h, params["decoder"]["weight"], params["bias"])


def masked_prediction_loss(head: MaskedPredictionHead, params: Params, hidden: Tensor, labels: Tensor,
                           ignore_index: int = -1) -> Tensor:
    """Mean cross-entropy of ``head(hidden (B, L, D))`` against ``labels (B, L)`` over the positions whose
    label is not ``ignore_index``; 0 (with a gradient path) when there is none, where the reference's mean
    over no position is NaN: a small batch whose MLM masking drew no token would otherwise end training."""
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"masked prediction loss: labels: expected shape {tuple(hidden.shape[:-1])} (the "
                         f"sequence's), got {tuple(labels.shape)}")
    sel = labels != ignore_index
    count = sel.sum().clamp(min=1)
    if reading_values_ok(labels):  # eager: only the labelled rows go through the head
        logits, target = head(params, hidden[sel]), labels[sel]
    else:
        logits, target = head(params, hidden).flatten(0, -2), labels.flatten()
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum") / count


class FLAVALosses(NamedTuple):
    """The total (the weighted sum of the terms present), each term (``None`` when it did not apply), the
    ITM logits ``(B, 2)`` and the contrastive output (logits ``(B, B_global)``, per-direction losses)."""

    total: Tensor
    mlm_loss: Tensor | None = None
    mim_loss: Tensor | None = None
    mmm_text_loss: Tensor | None = None
    mmm_image_loss: Tensor | None = None
    itm_loss: Tensor | None = None
    global_contrastive_loss: Tensor | None = None
    itm_logits: Tensor | None = None
    contrastive: NamedTuple | None = None

    def terms(self) -> dict[str, Tensor]:
        """The loss terms that applied, by name (the metrics a task logs)."""
        return {n: getattr(self, n) for n in LOSS_NAMES if getattr(self, n) is not None}


@dataclass(frozen=True)
class FLAVAPretrainingLoss(Spec):
    """FLAVA's six pretraining objectives over the model's sequences (TorchMultimodal's ``FLAVAPretrainingLoss``).

    ``__call__(params, *, image_masked_sequence, text_masked_sequence, multimodal_masked_sequence,
    itm_labels, mim_labels, mlm_labels, projected_image_embeddings, projected_text_embeddings,
    backprop_type="global")``: MLM / MIM run on unimodal batches (no multimodal sequence), ITM, MMM and the
    contrastive loss on paired ones. ``itm_labels (B,)``: 1 = matched pair; ``mim_labels (B, N)`` /
    ``mlm_labels (B, T)``: targets, ``ignore_index`` where not masked.
    """

    hidden_size: int = 768  # D of the sequences (the multimodal width)
    text_vocab_size: int = 30522  # MLM targets
    image_vocab_size: int = 8192  # MIM targets (dVAE codes)
    layer_norm_eps: float = 1e-5  # the prediction heads' LayerNorm
    ignore_index: int = -1  # unmasked positions / unused ITM rows
    logit_scale_init: float = math.log(1 / 0.07)  # contrastive log inverse temperature
    logit_scale_max: float = 4.6052  # clamp of logit_scale (the reference clamps to [0, 4.6052])
    mlm_weight: float = 1.0
    mim_weight: float = 1.0
    contrastive_loss_weight: float = 1.0
    mmm_image_loss_weight: float = 1.0
    mmm_text_loss_weight: float = 1.0
    itm_loss_weight: float = 1.0

    def head(self, vocab: int) -> MaskedPredictionHead:
        return MaskedPredictionHead(self.hidden_size, vocab, self.layer_norm_eps)

    def contrastive(self) -> ContrastiveLoss:
        return ContrastiveLoss(self.logit_scale_init, 0.0, self.logit_scale_max)

    def init(self, *, key: Tensor) -> Params:
        k = pr.split(key, 7)
        t, i = self.head(self.text_vocab_size), self.head(self.image_vocab_size)
        d = self.hidden_size
        return {"contrastive_loss": self.contrastive().init(),
                "mlm_loss": {"cls": t.init(key=k[0])}, "mim_loss": {"cls": i.init(key=k[1])},
                "mmm_loss": {"mlm": {"cls": t.init(key=k[2])}, "mim": {"cls": i.init(key=k[3])}},
                "itm_loss": {"pooler": {"dense": Linear(d, d, weight_init="normal").init(key=k[4])},
                             "cls": {"seq_relationship": Linear(d, 2, weight_init="normal").init(key=k[5])}}}

    def __call__(self, params: Params, *, image_masked_sequence: Tensor | None = None,
                 text_masked_sequence: Tensor | None = None, multimodal_masked_sequence: Tensor | None = None,
                 itm_labels: Tensor | None = None, mim_labels: Tensor | None = None, mlm_labels: Tensor | None = None,
                 projected_image_embeddings: Tensor | None = None, projected_text_embeddings: Tensor | None = None,
                 backprop_type: str = "global") -> FLAVALosses:
        out: dict = {}
        ig = self.ignore_index
        mm = multimodal_masked_sequence
        t_head, i_head = self.head(self.text_vocab_size), self.head(self.image_vocab_size)

        def masked(head, p, seq, labels, weight):
            if labels is None:  # the reference's "no labels" value: zero, with a graph
                return head(p, seq[:, :1]).sum() * 0
            return masked_prediction_loss(head, p, seq, labels, ig) * weight

        if image_masked_sequence is not None and self.mim_weight > 0 and mm is None:
            n = mim_labels.shape[1] if mim_labels is not None else image_masked_sequence.shape[1] - 1
            out["mim_loss"] = masked(i_head, params["mim_loss"]["cls"], image_masked_sequence[:, -n:], mim_labels,
                                     self.mim_weight)
        if text_masked_sequence is not None and self.mlm_weight > 0 and mm is None:
            n = mlm_labels.shape[1] if mlm_labels is not None else text_masked_sequence.shape[1] - 1
            out["mlm_loss"] = masked(t_head, params["mlm_loss"]["cls"], text_masked_sequence[:, -n:], mlm_labels,
                                     self.mlm_weight)
        pos = None
        if mm is not None and self.itm_loss_weight > 0:
            pos = itm_labels.ne(0) if itm_labels is not None else mm.new_ones(mm.shape[0], dtype=torch.bool)
            pos = pos | ~pos.any()  # no matched pair at all: every row counts (the reference's rule)
            p = params["itm_loss"]
            logits = F.linear(tanh_pooler(p["pooler"], mm), p["cls"]["seq_relationship"]["weight"],
                              p["cls"]["seq_relationship"]["bias"])
            out["itm_logits"] = logits
            loss = logits.sum() * 0 if itm_labels is None else F.cross_entropy(logits, itm_labels, ignore_index=ig)
            out["itm_loss"] = loss * self.itm_loss_weight
            if mlm_labels is not None:
                mlm_labels = mlm_labels.masked_fill(~pos[:, None], ig)
            if mim_labels is not None:
                mim_labels = mim_labels.masked_fill(~pos[:, None], ig)
        if mm is not None and self.mmm_text_loss_weight > 0:
            n = mlm_labels.shape[1] if mlm_labels is not None else text_masked_sequence.shape[1] - 1
            out["mmm_text_loss"] = masked(t_head, params["mmm_loss"]["mlm"]["cls"], mm[:, -n:], mlm_labels,
                                          self.mmm_text_loss_weight)
        if mm is not None and self.mmm_image_loss_weight > 0:
            # after the multimodal and the image class tokens
            n = mim_labels.shape[1] if mim_labels is not None else image_masked_sequence.shape[1] - 1
            out["mmm_image_loss"] = masked(i_head, params["mmm_loss"]["mim"]["cls"], mm[:, 2:2 + n], mim_labels,
                                           self.mmm_image_loss_weight)
        if projected_image_embeddings is not None and projected_text_embeddings is not None \
                and self.contrastive_loss_weight > 0:
            c = self.contrastive()(params["contrastive_loss"], F.normalize(projected_image_embeddings, dim=-1),
                                   F.normalize(projected_text_embeddings, dim=-1), mask=pos,
                                   backprop_type=backprop_type)
            out["contrastive"] = c
            out["global_contrastive_loss"] = c.loss * self.contrastive_loss_weight
        terms = [out[n] for n in LOSS_NAMES if n in out]
        if not terms:
            raise ValueError("FLAVAPretrainingLoss: no loss applies: expected masked image / text sequences, a "
                             "multimodal sequence or both projected embeddings")
        return FLAVALosses(torch.stack(terms).sum(), **out)
