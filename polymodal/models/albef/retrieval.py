"""``ALBEFForRetrieval``: ALBEF's image-text pretraining / retrieval model with explicit momentum state.

Training (``__call__``) computes ITC with momentum distillation against feature queues, ITM on hard
negatives sampled from the similarity distribution with an explicit key, and (when masked ids are
given and the spec has an MLM head) masked-LM with momentum distillation. The momentum copies and the
queues are state: ``out, new_state = spec(params, ..., state)``. The order of one step is
TorchMultimodal's (``ALBEFModel`` / ``ALBEFModelWithSimilarity``): momentum update first, then the
momentum features, similarities against the *old* queue, then the enqueue.

Inference: :meth:`image_features`, :meth:`text_features` (unit 256-d features for contrastive
scores), :meth:`itm_scores` (the ITM head's positive logit) and :meth:`rank` (contrastive scores,
then ITM re-ranking of the top-k candidates, ``retrieval_scores`` in ``rerank.py``).

Params::

    model: ALBEFModel's   vision_proj, text_proj, itm_head: {weight, bias}   temp: ()   [mlm_head: MaskedLMHead's]

>>> import torch
>>> from polymodal.core import random as pr
>>> from polymodal.models.albef.builders import albef_tiny
>>> spec = albef_tiny(queue_size=8)
>>> p = spec.init(key=pr.key(0))
>>> s = spec.initial_state(p, key=pr.key(1))
>>> ids = torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0]])
>>> out, s = spec(p, torch.randn(2, 3, 32, 32), ids, None, torch.tensor([0, 1]), s, key=pr.key(2))
>>> out.itm_logits.shape, s["queue_ptr"].tolist()
(torch.Size([6, 2]), [2])
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core import random as pr
from ...core.encoders.bert_heads import MaskedLMHead
from ...core.layers.linear import Linear
from ...core.pytree import Params
from ...core.spec import Spec
from .losses import itc_loss, mlm_distill_loss, negative_weights, sample_negatives, similarity_targets
from .model import ALBEFModel, check_pair
from .momentum import check_queue, copy_momentum, enqueue, gather_features, init_queues, momentum_update

__all__ = ["ALBEFForRetrieval", "ALBEFOutput"]

_MOMENTUM = ("model", "vision_proj", "text_proj", "mlm_head")  # the subtrees with EMA copies


class ALBEFOutput(NamedTuple):
    """One training step's losses and what they were computed from.

    ``loss = itc + itm (+ mlm)``; ``sim_i2t``, ``sim_t2i`` ``(B, B + Q)`` and their momentum versions;
    ``itm_logits (3B, 2)``: positives, then (text, sampled image), then (sampled text, image);
    ``neg_images``, ``neg_texts`` ``(B,)``: the sampled negatives' batch indices."""

    loss: Tensor
    itc_loss: Tensor
    itm_loss: Tensor
    mlm_loss: Tensor | None
    sim_i2t: Tensor
    sim_t2i: Tensor
    sim_i2t_m: Tensor
    sim_t2i_m: Tensor
    itm_logits: Tensor
    neg_images: Tensor
    neg_texts: Tensor


@dataclass(frozen=True)
class ALBEFForRetrieval(Spec):
    """See the module docstring; ``__call__(params, images, input_ids, attention_mask, idx, state, *, key,
    alpha=0.4, neg_indices=None, mlm_input_ids=None, mlm_labels=None) -> (ALBEFOutput, new_state)``."""

    model: ALBEFModel  # vision, text and multimodal encoders
    vision_proj: Linear  # image class token -> embed_size
    text_proj: Linear  # text [CLS] -> embed_size
    itm_head: Linear  # multimodal [CLS] -> 2 (no match, match)
    mlm_head: MaskedLMHead | None = None  # masked-LM head tied to the word embeddings (pretraining); None: ITC + ITM
    queue_size: int = 65536  # Q: momentum features kept for the contrastive loss
    momentum: float = 0.995  # EMA rate of the momentum copies
    temp: float = 0.07  # initial temperature (a learned scalar, as TorchMultimodal's)
    negatives_by_idx: bool = True  # negatives never share the row's idx (ALBEF repo); False: diagonal only (TMM)

    def __post_init__(self) -> None:
        if self.vision_proj.out_features != self.text_proj.out_features:
            raise ValueError(f"ALBEFForRetrieval: vision_proj and text_proj must project to one size, got "
                             f"{self.vision_proj.out_features} and {self.text_proj.out_features}")
        if self.queue_size <= 0:
            raise ValueError(f"ALBEFForRetrieval: queue_size: expected > 0, got {self.queue_size}")

    @property
    def embed_size(self) -> int:
        return self.vision_proj.out_features

    def init(self, *, key: Tensor) -> Params:
        km, kv, kt, ki, kl = pr.split(key, 5)
        p = {"model": self.model.init(key=km), "vision_proj": self.vision_proj.init(key=kv),
             "text_proj": self.text_proj.init(key=kt), "itm_head": self.itm_head.init(key=ki),
             "temp": torch.full((), self.temp)}
        if self.mlm_head is not None:
            p["mlm_head"] = self.mlm_head.init(key=kl)
        return p

    def momentum_params(self, params: Params) -> Params:
        """The subtree of ``params`` that has momentum copies (encoders, projections, MLM head)."""
        return {k: params[k] for k in _MOMENTUM if k in params}

    def initial_state(self, params: Params, *, key: Tensor) -> Params:
        """Momentum copies of ``params`` and random unit queues (:mod:`.momentum`).

        Not ``init_state()``: the momentum copies start as copies of the params, so the state is made
        from them (the core's shells and converters, which call ``init_state()``, see the spec's params
        only; the training task and :func:`~.convert.from_torchmultimodal` carry the state)."""
        dev = params["temp"].device
        return {"momentum": copy_momentum(self.momentum_params(params)),
                **init_queues(embed_size=self.embed_size, queue_size=self.queue_size, key=key, device=dev)}

    # --- inference ------------------------------------------------------------------------------------

    def image_features(self, params: Params, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, C, H, W) -> (tokens (B, 1 + N, D_v), unit features (B, E))``."""
        h = self.model.encode_image(params["model"], images)
        return h, F.normalize(self.vision_proj(params["vision_proj"], h[:, 0]), dim=-1)

    def text_features(self, params: Params, input_ids: Tensor, attention_mask: Tensor | None = None
                      ) -> tuple[Tensor, Tensor]:
        """``(B, T) -> (tokens (B, T, D), unit features (B, E))``."""
        h = self.model.encode_text(params["model"], input_ids, attention_mask)
        return h, F.normalize(self.text_proj(params["text_proj"], h[:, 0]), dim=-1)

    def itm_logits(self, params: Params, image_embeddings: Tensor, text_embeddings: Tensor,
                   attention_mask: Tensor | None) -> Tensor:
        """``(B, S, D_v), (B, T, D), (B, T) -> (B, 2)``: the ITM head on the fused [CLS]."""
        fused = self.model.fuse(params["model"], text_embeddings, attention_mask, image_embeddings)
        return self.itm_head(params["itm_head"], fused[:, 0])

    def itm_scores(self, params: Params, image_embeddings: Tensor, text_embeddings: Tensor,
                   attention_mask: Tensor | None) -> Tensor:
        """``(B,)`` matching scores: the ITM head's "match" logit (TorchMultimodal's retrieval score)."""
        return self.itm_logits(params, image_embeddings, text_embeddings, attention_mask)[:, 1]

    # --- training -------------------------------------------------------------------------------------

    def _features(self, params: Params, img: Tensor, txt: Tensor) -> tuple[Tensor, Tensor]:
        return (F.normalize(self.vision_proj(params["vision_proj"], img[:, 0]), dim=-1),
                F.normalize(self.text_proj(params["text_proj"], txt[:, 0]), dim=-1))

    def _mlm_logits(self, params: Params, ids: Tensor, mask: Tensor, img: Tensor, key: Tensor | None,
                    rows: Tensor | None = None) -> Tensor:
        """``(B, T, V)`` vocabulary logits, or ``(N, V)`` at the flat positions ``rows`` only."""
        m = self.model
        k1, k2 = pr.maybe_split(key, 2)
        h = m.fuse(params["model"], m.encode_text(params["model"], ids, mask, key=k1), mask, img, key=k2)
        if rows is not None:
            h = h.reshape(-1, h.shape[-1])[rows]
        word = params["model"]["text"]["embeddings"]["word_embeddings"]["weight"]
        return self.mlm_head(params["mlm_head"], h, word)

    def __call__(self, params: Params, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None,
                 idx: Tensor, state: Params, *, key: Tensor | None = None, alpha: float = 0.4,
                 neg_indices: tuple[Tensor, Tensor] | None = None, mlm_input_ids: Tensor | None = None,
                 mlm_labels: Tensor | None = None) -> tuple[ALBEFOutput, Params]:
        """One training forward.

        Args:
            images: ``(B, C, H, W)``. input_ids, attention_mask: ``(B, T)`` (mask None: ids != pad).
            idx: ``(B,)`` sample ids (equal ids are positives of each other in ITC).
            state: from :meth:`initial_state` (or a previous call).
            key: dropout and hard-negative sampling (required unless ``neg_indices`` is given).
            alpha: momentum distillation weight of ITC and MLM.
            neg_indices: ``(images for each text (B,), texts for each image (B,))``: fixed negatives
                instead of sampled ones (parity tests).
            mlm_input_ids, mlm_labels: ``(B, T)`` masked ids and labels (-100 elsewhere) for MLM.
        Returns:
            ``(ALBEFOutput, new_state)``.
        """
        check_pair("ALBEFForRetrieval", images, input_ids, attention_mask)
        b = images.shape[0]
        if idx.reshape(-1).shape[0] != b:
            raise ValueError(f"ALBEFForRetrieval: idx: expected {b} ids (one per image), got shape {tuple(idx.shape)}")
        if state is None:
            raise ValueError("ALBEFForRetrieval: state is None; pass spec.initial_state(params, key=...)")
        world = torch.distributed.get_world_size() if torch.distributed.is_available() and \
            torch.distributed.is_initialized() else 1
        check_queue(self.queue_size, b * world, "ALBEFForRetrieval")
        if neg_indices is None and key is None:
            raise ValueError("ALBEFForRetrieval: hard negatives are sampled: pass key=... (or neg_indices=...)")
        if attention_mask is None:
            attention_mask = input_ids != self.model.text.embeddings.pad_token_id
        idx = idx.reshape(-1)
        kd, kn, km = pr.maybe_split(key, 3)
        kv, kt, kf = pr.maybe_split(kd, 3)
        mp = momentum_update(state["momentum"], self.momentum_params(params), self.momentum)
        m = self.model
        img = m.encode_image(params["model"], images, key=kv)
        txt = m.encode_text(params["model"], input_ids, attention_mask, key=kt)
        img_feat, txt_feat = self._features(params, img, txt)
        with torch.no_grad():
            img_m = m.encode_image(mp["model"], images)
            txt_m = m.encode_text(mp["model"], input_ids, attention_mask)
            img_feat_m, txt_feat_m = self._features(mp, img_m, txt_m)
            img_all = torch.cat([img_feat_m.T, state["image_queue"]], dim=1)
            txt_all = torch.cat([txt_feat_m.T, state["text_queue"]], dim=1)
            temp = params["temp"].detach()
            sim_i2t_m, sim_t2i_m = img_feat_m @ txt_all / temp, txt_feat_m @ img_all / temp
        temp = params["temp"]
        sim_i2t, sim_t2i = img_feat @ txt_all / temp, txt_feat @ img_all / temp
        targets = similarity_targets(idx, torch.cat([idx[None], state["idx_queue"]], dim=1))
        itc = itc_loss(sim_i2t, sim_t2i, sim_i2t_m, sim_t2i_m, targets=targets, alpha=alpha)

        if neg_indices is None:
            by = idx if self.negatives_by_idx else None
            ki, kt2 = pr.split(kn, 2)
            neg_img = sample_negatives(negative_weights(sim_t2i, by), ki)
            neg_txt = sample_negatives(negative_weights(sim_i2t, by), kt2)
        else:
            neg_img, neg_txt = (t.reshape(-1).to(images.device).long() for t in neg_indices)
            if neg_img.shape[0] != b or neg_txt.shape[0] != b:
                raise ValueError(f"ALBEFForRetrieval: neg_indices: expected two ({b},) index tensors, got "
                                 f"{tuple(neg_img.shape)} and {tuple(neg_txt.shape)}")
        text3 = torch.cat([txt, txt, txt[neg_txt]])
        mask3 = torch.cat([attention_mask, attention_mask, attention_mask[neg_txt]])
        img3 = torch.cat([img, img[neg_img], img])
        fused = m.fuse(params["model"], text3, mask3, img3, key=kf)
        itm_logits = self.itm_head(params["itm_head"], fused[:, 0])
        itm_labels = torch.cat([torch.ones(b, dtype=torch.long, device=images.device),
                                torch.zeros(2 * b, dtype=torch.long, device=images.device)])
        itm = F.cross_entropy(itm_logits, itm_labels)

        loss, mlm = itc + itm, None
        if mlm_input_ids is not None:
            if self.mlm_head is None or mlm_labels is None:
                raise ValueError("ALBEFForRetrieval: mlm_input_ids needs an MLM head (mlm_head) and mlm_labels")
            if mlm_input_ids.shape != input_ids.shape or mlm_labels.shape != input_ids.shape:
                raise ValueError(f"ALBEFForRetrieval: mlm_input_ids and mlm_labels: expected shape "
                                 f"{tuple(input_ids.shape)}, got {tuple(mlm_input_ids.shape)} and "
                                 f"{tuple(mlm_labels.shape)}")
            # The loss reads the masked positions only, so eager mode runs the MLM head (its 768 x vocab
            # projection, softmaxes and their backward) on those rows alone: the same loss and gradients.
            # Compiled steps keep the full (B, T, V) head (static shapes, one graph).
            rows, labels = None, mlm_labels
            if not torch.compiler.is_compiling():
                rows = (mlm_labels.reshape(-1) != -100).nonzero().squeeze(1)
                labels = mlm_labels.reshape(-1)[rows]
            logits = self._mlm_logits(params, mlm_input_ids, attention_mask, img, km, rows)
            with torch.no_grad():
                logits_m = self._mlm_logits(mp, mlm_input_ids, attention_mask, img_m, None, rows) if alpha else None
            mlm = mlm_distill_loss(logits, labels, logits_m, alpha)
            loss = loss + mlm

        gi, gt, gx = gather_features(img_feat_m, txt_feat_m, idx)
        new_state = enqueue({**state, "momentum": mp}, gi, gt, gx)
        out = ALBEFOutput(loss, itc, itm, mlm, sim_i2t, sim_t2i, sim_i2t_m, sim_t2i_m, itm_logits, neg_img, neg_txt)
        return out, new_state
