"""MDETR's task models over :class:`~.model.MDETR`: phrase grounding (contrastive alignment between
object queries and text tokens) and GQA-style VQA (one answer head per question type, read off extra
queries), as TorchMultimodal's ``MDETRForPhraseGrounding`` / ``MDETRForVQA`` (same param names).

>>> import torch
>>> from polymodal.core import random as pr
>>> from polymodal.models.mdetr.builders import mdetr_tiny
>>> g = mdetr_tiny()
>>> out = g(g.init(key=pr.key(0)), torch.rand(1, 3, 64, 64), torch.tensor([[0, 5, 6, 2]]))
>>> out.query_embeddings.shape, out.token_embeddings.shape, out.aux_query_embeddings.shape
(torch.Size([1, 8, 16]), torch.Size([1, 4, 16]), torch.Size([2, 1, 8, 16]))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor

from ...core import random as pr
from ...core.layers.linear import Linear
from ...core.pytree import Params
from ...core.spec import Spec
from .model import MDETR, MDETROutput

__all__ = ["MDETRForPhraseGrounding", "MDETRForVQA", "GroundingOutput", "VQAOutput", "GQA_HEADS"]

# TorchMultimodal's ``mdetr_gqa_heads`` (GQA's answer vocabularies per question type), in its order.
GQA_HEADS: tuple[tuple[str, int], ...] = (("answer_type", 5), ("answer_obj", 3), ("answer_rel", 1594),
                                          ("answer_attr", 403), ("answer_cat", 678), ("answer_global", 111))


class GroundingOutput(NamedTuple):
    """The model's output and the L2-normalised ``query_embeddings (B, Q, d)`` (last decoder layer) /
    ``token_embeddings (B, T, d)``; ``aux_query_embeddings (L, B, Q, d)``: every decoder layer's projected
    queries (the last equals ``query_embeddings``; MDETR's ``proj_queries``, whose first ``L - 1`` feed the
    auxiliary contrastive-alignment losses; TorchMultimodal returns only the last)."""

    model_output: MDETROutput
    query_embeddings: Tensor
    token_embeddings: Tensor
    aux_query_embeddings: Tensor


class VQAOutput(NamedTuple):
    """:class:`GroundingOutput`'s fields and ``vqa_preds``: ``{head: (B, answers)}`` logits."""

    model_output: MDETROutput
    query_embeddings: Tensor
    token_embeddings: Tensor
    vqa_preds: dict
    aux_query_embeddings: Tensor


def _contrastive(model: MDETR, dim: int, params: Params, out: MDETROutput) -> tuple[Tensor, Tensor, Tensor]:
    """``(last layer's queries (B, Q, d), tokens (B, T, d), every layer's queries (L, B, Q, d))``, L2-normalised."""
    proj = Linear(model.hidden_dim, dim)
    q = F.normalize(proj(params["contrastive_alignment_image_projection"], out.decoder_hidden_states), p=2, dim=-1)
    t = F.normalize(proj(params["contrastive_alignment_text_projection"], out.text_memory), p=2, dim=-1)
    return q[-1], t, q


def _init_contrastive(model: MDETR, dim: int, key: Tensor) -> Params:
    ki, kt = pr.split(key)
    proj = Linear(model.hidden_dim, dim)
    return {"contrastive_alignment_image_projection": proj.init(key=ki),
            "contrastive_alignment_text_projection": proj.init(key=kt)}


@dataclass(frozen=True)
class MDETRForPhraseGrounding(Spec):
    """``(params, images, input_ids, image_mask=None, text_padding_mask=None, *, key) -> GroundingOutput``;
    params ``model``, ``contrastive_alignment_{image,text}_projection``."""

    model: MDETR  # the detector
    contrastive_dim: int = 64  # width of the alignment space

    def init(self, *, key: Tensor) -> Params:
        km, kc = pr.split(key)
        return {"model": self.model.init(key=km)} | _init_contrastive(self.model, self.contrastive_dim, kc)

    def __call__(self, params: Params, images: Tensor, input_ids: Tensor, image_mask: Tensor | None = None,
                 text_padding_mask: Tensor | None = None, *, key: Tensor | None = None) -> GroundingOutput:
        out = self.model(params["model"], images, input_ids, image_mask, text_padding_mask, key=key)
        q, t, aux = _contrastive(self.model, self.contrastive_dim, params, out)
        return GroundingOutput(out, q, t, aux)


@dataclass(frozen=True)
class MDETRForVQA(Spec):
    """:class:`MDETRForPhraseGrounding` plus one linear answer head per question type, each reading its own
    extra query (``model.num_extra_queries == len(heads)``); params add ``vqa_heads.{name}``."""

    model: MDETR  # the detector with one extra query per head
    heads: tuple[tuple[str, int], ...] = GQA_HEADS  # (name, number of answers), in query order
    contrastive_dim: int = 64  # width of the alignment space

    def __post_init__(self) -> None:
        object.__setattr__(self, "heads", tuple((str(n), int(c)) for n, c in self.heads))
        if self.model.num_extra_queries != len(self.heads):
            raise ValueError(f"MDETRForVQA: expected model.num_extra_queries == number of heads ({len(self.heads)}), "
                             f"got {self.model.num_extra_queries}")

    def init(self, *, key: Tensor) -> Params:
        km, kc, kh = pr.split(key, 3)
        hk = pr.split(kh, len(self.heads))
        heads = {n: Linear(self.model.hidden_dim, c).init(key=k) for (n, c), k in zip(self.heads, hk)}
        return {"model": self.model.init(key=km)} | _init_contrastive(self.model, self.contrastive_dim, kc) | {
            "vqa_heads": heads}

    def __call__(self, params: Params, images: Tensor, input_ids: Tensor, image_mask: Tensor | None = None,
                 text_padding_mask: Tensor | None = None, *, key: Tensor | None = None) -> VQAOutput:
        out = self.model(params["model"], images, input_ids, image_mask, text_padding_mask, key=key)
        q, t, aux = _contrastive(self.model, self.contrastive_dim, params, out)
        preds = {n: Linear(self.model.hidden_dim, c)(params["vqa_heads"][n], out.extra_embeddings[:, i])
                 for i, (n, c) in enumerate(self.heads)}
        return VQAOutput(out, q, t, preds, aux)
