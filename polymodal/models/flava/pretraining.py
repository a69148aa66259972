"""FLAVA's task models: :class:`FLAVAForPreTraining` (model + dVAE tokenizer + the six losses) and
:class:`FLAVAForClassification` (model + MLP head on a pooled class token). Params keep TorchMultimodal's
names: ``model.*``, ``image_codebook.encoder.blocks.*`` (pretraining; ``image_codebook.blocks.*`` here,
see ``convert.py``), ``loss.*``; ``model.*``, ``classifier.*`` (classification).

>>> import torch
>>> from polymodal.core import random as pr
>>> from polymodal.models.flava.builders import flava_tiny_for_pretraining
>>> spec = flava_tiny_for_pretraining()
>>> p = spec.init(key=pr.key(0))
>>> text = torch.tensor([[2, 9, 7, 3], [2, 5, 6, 3]])
>>> out = spec(p, image=torch.rand(2, 3, 32, 32), text=text, image_for_codebook=torch.rand(2, 3, 64, 64),
...            image_patches_mask=torch.zeros(2, 64, dtype=torch.bool).index_fill(1, torch.tensor([1, 5]), True),
...            text_masked=text, mlm_labels=torch.tensor([[-1, 9, -1, -1], [-1, -1, 6, -1]]),
...            itm_labels=torch.tensor([1, 1]))
>>> sorted(out.losses.terms())
['global_contrastive_loss', 'itm_loss', 'mmm_image_loss', 'mmm_text_loss']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor

from ...core import random as pr
from ...core.layers.mlp import MLP
from ...core.pytree import Params
from ...core.spec import Spec
from .dvae import DalleEncoder
from .heads import FLAVALosses, FLAVAPretrainingLoss
from .model import FLAVAModel, FLAVAOutput

__all__ = ["FLAVAForPreTraining", "FLAVAPreTrainingOutput", "FLAVAForClassification"]


class FLAVAPreTrainingOutput(NamedTuple):
    """``losses`` (:class:`~.heads.FLAVALosses`: total and parts), the model's :class:`FLAVAOutput` and the
    MIM targets ``(B, N)`` (dVAE codes, ``-1`` at unmasked patches) when an image for the codebook was given."""

    losses: FLAVALosses
    model: FLAVAOutput
    mim_labels: Tensor | None = None


@dataclass(frozen=True)
class FLAVAForPreTraining(Spec):
    """FLAVA pretraining: ``__call__(params, image=None, text=None, image_for_codebook=None,
    image_patches_mask=None, text_masked=None, required_embedding=None, skip_unmasked_mm_encoder=True,
    itm_labels=None, mlm_labels=None, *, text_attention_mask=None, image_codes=None, key=None,
    backprop_type="global") -> FLAVAPreTrainingOutput``. ``text_attention_mask (B, T)`` (1 = real; both texts')
    overrides the pad-id mask; ``image_codes (B, N)``: the dVAE's codes when already known (see
    :meth:`image_codes`), used instead of tokenising ``image_for_codebook``.

    ``image_for_codebook (B, 3, 112, 112)`` is tokenised by the dVAE (no gradient) into MIM targets at the
    masked patches (``image_patches_mask (B, N)``, as many patches as the image encoder's).
    """

    model: FLAVAModel  # the three encoders and projections
    image_codebook: DalleEncoder  # the DALL-E dVAE encoder (frozen tokenizer: it gets no gradient)
    loss: FLAVAPretrainingLoss  # the heads and the six objectives

    def __post_init__(self) -> None:
        n, g = self.model.image_encoder.num_patches, self.image_codebook.grid ** 2
        if n != g:
            raise ValueError(f"FLAVAForPreTraining: the dVAE gives {g} codes per image, the image encoder has {n} "
                             "patches: expected them equal (codebook image_size = 8 x patches per side)")

    def init(self, *, key: Tensor) -> Params:
        km, kc, kl = pr.split(key, 3)
        return {"model": self.model.init(key=km), "image_codebook": self.image_codebook.init(key=kc),
                "loss": self.loss.init(key=kl)}

    def image_codes(self, params: Params, image_for_codebook: Tensor) -> Tensor:
        """``(B, N)`` the dVAE's codes of ``image_for_codebook`` (no gradient): the MIM targets before masking."""
        return self.image_codebook.codebook_indices(params["image_codebook"], image_for_codebook).flatten(1)

    def mim_labels(self, params: Params, image_for_codebook: Tensor | None, image_patches_mask: Tensor, *,
                   codes: Tensor | None = None) -> Tensor:
        """``(B, N)`` dVAE codes at the masked patches, ``ignore_index`` elsewhere. ``codes (B, N)``: the codes
        already computed by :meth:`image_codes` (a cache; the dVAE is frozen), instead of ``image_for_codebook``."""
        if codes is None:
            codes = self.image_codes(params, image_for_codebook)
        elif codes.dim() != 2 or codes.dtype.is_floating_point or codes.shape[1] != self.model.image_encoder.num_patches:
            raise ValueError(f"FLAVAForPreTraining: image_codes: expected integer codes of shape (B, "
                             f"{self.model.image_encoder.num_patches}), got {codes.dtype} {tuple(codes.shape)}")
        mask = image_patches_mask.flatten(1).bool()
        if mask.shape != codes.shape:
            raise ValueError(f"FLAVAForPreTraining: image_patches_mask: expected {codes.shape[1]} patches per image "
                             f"(shape {tuple(codes.shape)}), got shape {tuple(image_patches_mask.shape)}")
        return codes.masked_fill(~mask, self.loss.ignore_index)

    def encode_image(self, params: Params, image: Tensor) -> Tensor:
        """``(B, P)`` projected (unnormalised) image class token, as the reference's ``encode_image``."""
        m = self.model
        return m.project_image(params["model"], m.encode_image(params["model"], image))

    def encode_text(self, params: Params, text: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``(B, P)`` projected (unnormalised) text class token."""
        m = self.model
        return m.project_text(params["model"], m.encode_text(params["model"], text, attention_mask))

    def __call__(self, params: Params, image: Tensor | None = None, text: Tensor | None = None,
                 image_for_codebook: Tensor | None = None, image_patches_mask: Tensor | None = None,
                 text_masked: Tensor | None = None, required_embedding: str | None = None,
                 skip_unmasked_mm_encoder: bool = True, itm_labels: Tensor | None = None,
                 mlm_labels: Tensor | None = None, *, text_attention_mask: Tensor | None = None,
                 image_codes: Tensor | None = None, key: Tensor | None = None,
                 backprop_type: str = "global") -> FLAVAPreTrainingOutput:
        mim = None
        if image_for_codebook is not None or image_codes is not None:
            if image_patches_mask is None:
                raise ValueError("FLAVAForPreTraining: image_for_codebook / image_codes need image_patches_mask (B, N)")
            mim = self.mim_labels(params, image_for_codebook, image_patches_mask, codes=image_codes)
            image_patches_mask = image_patches_mask.flatten(1).bool()
        out = self.model(params["model"], image, text, image_patches_mask, text_masked, required_embedding,
                         skip_unmasked_mm_encoder, text_attention_mask=text_attention_mask, key=key)
        seq = lambda t: None if t is None else t.last_hidden_state  # noqa: E731
        losses = self.loss(params["loss"], image_masked_sequence=seq(out.image_masked),
                           text_masked_sequence=seq(out.text_masked),
                           multimodal_masked_sequence=seq(out.multimodal_masked), itm_labels=itm_labels,
                           mim_labels=mim, mlm_labels=mlm_labels,
                           projected_image_embeddings=out.projected_image_embeddings,
                           projected_text_embeddings=out.projected_text_embeddings, backprop_type=backprop_type)
        return FLAVAPreTrainingOutput(losses, out, mim)


@dataclass(frozen=True)
class FLAVAForClassification(Spec):
    """``(image?, text?) -> logits (B, num_classes)``: the MLP ``classifier`` on the class token of the image,
    text or (default, with both) multimodal encoder's final states (TorchMultimodal's ``FLAVAForClassification``).

    ``__call__(params, image=None, text=None, required_embedding=None, *, key=None)``; ``loss(params, labels,
    ...)`` is the mean cross-entropy.
    """

    model: FLAVAModel  # the encoders
    classifier: MLP  # in_dim = the pooled width; hidden 768, ReLU, dropout 0.5 (the reference's defaults)

    def init(self, *, key: Tensor) -> Params:
        km, kc = pr.split(key, 2)
        return {"model": self.model.init(key=km), "classifier": self.classifier.init(key=kc)}

    def __call__(self, params: Params, image: Tensor | None = None, text: Tensor | None = None,
                 required_embedding: str | None = None, *, key: Tensor | None = None) -> Tensor:
        km, kc = pr.maybe_split(key, 2)
        out = self.model(params["model"], image, text, required_embedding=required_embedding,
                         skip_unmasked_mm_encoder=False, key=km)
        which = required_embedding or ("mm" if image is not None and text is not None else
                                        "image" if image is not None else "text")
        tower = {"image": out.image, "text": out.text}.get(which, out.multimodal)
        return self.classifier(params["classifier"], tower.last_hidden_state[..., 0, :], key=kc)

    def loss(self, params: Params, labels: Tensor, image: Tensor | None = None, text: Tensor | None = None,
             required_embedding: str | None = None, *, key: Tensor | None = None) -> Tensor:
        """Mean cross-entropy of the logits against ``labels (B,)``."""
        return F.cross_entropy(self(params, image, text, required_embedding, key=key), labels)
