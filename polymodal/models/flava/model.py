"""FLAVA (Singh et al. 2022): an image encoder, a text encoder and a multimodal encoder over both.

:class:`FLAVAModel`'s fields are its sub-specs: the image tower over the shared ViT
(:class:`~.encoders.FLAVAImageEncoder`, mask token for masked image modelling), the shared BERT text
encoder (pre-norm blocks, final LayerNorm, pooler: TorchMultimodal's ``flava_text_encoder``), the
multimodal encoder (:class:`~.encoders.FLAVAMultimodalEncoder`), the image / text -> multimodal
linears and the contrastive projections. Params keep TorchMultimodal's top-level names::

    image_encoder, text_encoder, mm_encoder, image_to_mm_projection, text_to_mm_projection,
    image_projection, text_projection

Differences from TorchMultimodal 2024.4.1 (both are its open bugs #530 / #533): by default the multimodal
encoder masks the text's padding (its keys are ignored, as inside the text encoder) and the class token it
prepends is always attended; ``mask_text_padding_in_mm=False`` reproduces the reference (every
position attended). Without ``image_patches_mask`` the masked image outputs are the unmasked ones (the
reference computes the same tower twice).

>>> import torch
>>> from polymodal.core import random as pr
>>> from polymodal.models.flava.builders import flava_tiny
>>> model = flava_tiny()
>>> p = model.init(key=pr.key(0))
>>> out = model(p, torch.rand(2, 3, 32, 32), torch.tensor([[2, 9, 7, 3, 0], [2, 5, 3, 0, 0]]), skip_unmasked_mm_encoder=False)
>>> out.projected_image_embeddings.shape, out.multimodal.last_hidden_state.shape
(torch.Size([2, 64]), torch.Size([2, 71, 64]))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ...core import random as pr
from ...core.encoders.bert import BERTTextEncoder
from ...core.layers.linear import Linear
from ...core.pytree import Params
from ...core.spec import Spec, check_dtype
from .encoders import FLAVAImageEncoder, FLAVAMultimodalEncoder, TowerOutput

__all__ = ["FLAVAModel", "FLAVAOutput", "EMBEDDING_OPTIONS"]

EMBEDDING_OPTIONS = ("image", "text", "mm")


class FLAVAOutput(NamedTuple):
    """TorchMultimodal's ``FLAVAOutput``: each tower's :class:`TowerOutput` (``None`` where not computed)
    and the contrastive projections ``(B, P)`` of the unmasked image / text class tokens (not normalised)."""

    image: TowerOutput | None = None
    image_masked: TowerOutput | None = None
    text: TowerOutput | None = None
    text_masked: TowerOutput | None = None
    multimodal: TowerOutput | None = None
    multimodal_masked: TowerOutput | None = None
    projected_image_embeddings: Tensor | None = None
    projected_text_embeddings: Tensor | None = None


@dataclass(frozen=True)
class FLAVAModel(Spec):
    """``(image (B, C, H, W)?, text (B, T)?, image_patches_mask (B, N)?, text_masked (B, T)?) -> FLAVAOutput``.

    ``__call__(params, image=None, text=None, image_patches_mask=None, text_masked=None,
    required_embedding=None, skip_unmasked_mm_encoder=True, *, text_attention_mask=None, key=None)``:
    ``required_embedding`` is ``"image"``, ``"text"`` or ``"mm"`` (default: ``"mm"`` with both inputs);
    ``"mm"`` runs the multimodal encoder over the masked towers (and over the unmasked ones unless
    ``skip_unmasked_mm_encoder``). ``text_attention_mask (B, T)`` (1 = real) overrides the padding mask
    ``text != pad_token_id``. ``key`` enables dropout.
    """

    image_encoder: FLAVAImageEncoder  # ViT-B/16 with a mask token, tanh pooler
    text_encoder: BERTTextEncoder  # pre-norm BERT, final LayerNorm, pooler
    mm_encoder: FLAVAMultimodalEncoder  # class token + 6 pre-norm blocks + LayerNorm + pooler
    text_and_image_proj_size: int = 768  # P, the contrastive projections' size
    mask_text_padding_in_mm: bool = True  # False: TorchMultimodal's behaviour (padding attended in the mm encoder)
    init_std: float = 0.02  # N(0, std) init of the four linears

    @property
    def image_width(self) -> int:
        return self.image_encoder.width

    @property
    def text_width(self) -> int:
        return self.text_encoder.hidden_size

    @property
    def mm_width(self) -> int:
        return self.mm_encoder.width

    def _lin(self, i: int, o: int) -> Linear:
        return Linear(i, o, weight_init="normal", init_std=self.init_std)

    def image_to_mm(self) -> Linear:
        return self._lin(self.image_width, self.mm_width)

    def text_to_mm(self) -> Linear:
        return self._lin(self.text_width, self.mm_width)

    def image_proj(self) -> Linear:
        return self._lin(self.image_width, self.text_and_image_proj_size)

    def text_proj(self) -> Linear:
        return self._lin(self.text_width, self.text_and_image_proj_size)

    def init(self, *, key: Tensor) -> Params:
        k = pr.split(key, 7)
        return {"image_encoder": self.image_encoder.init(key=k[0]), "text_encoder": self.text_encoder.init(key=k[1]),
                "mm_encoder": self.mm_encoder.init(key=k[2]), "image_to_mm_projection": self.image_to_mm().init(key=k[3]),
                "text_to_mm_projection": self.text_to_mm().init(key=k[4]),
                "image_projection": self.image_proj().init(key=k[5]), "text_projection": self.text_proj().init(key=k[6])}

    # --- towers --------------------------------------------------------------------------------------------

    def _check_text(self, text: Tensor, name: str) -> None:
        check_dtype(text, f"FLAVAModel: {name}", (torch.int64, torch.int32))
        n = self.text_encoder.embeddings.max_position_embeddings
        if text.dim() != 2 or text.shape[-1] > n:
            raise ValueError(f"FLAVAModel: {name}: expected shape (B, T) with T <= {n} (the position table's "
                             f"rows), got {tuple(text.shape)}")

    def text_valid(self, text: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``(B, T)`` bool, True at real tokens: ``attention_mask`` or ``text != pad_token_id``."""
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(text.shape):
                raise ValueError(f"FLAVAModel: text_attention_mask: expected shape {tuple(text.shape)} (the text's), "
                                 f"got {tuple(attention_mask.shape)}")
            return attention_mask.bool()
        return text != self.text_encoder.embeddings.pad_token_id

    def encode_image(self, params: Params, image: Tensor, image_patches_mask: Tensor | None = None, *,
                     key: Tensor | None = None) -> TowerOutput:
        """The image tower's :class:`TowerOutput` (``image_patches_mask (B, N)``: patches replaced by the mask token)."""
        return self.image_encoder(params["image_encoder"], image, image_patches_mask, key=key)

    def encode_text(self, params: Params, text: Tensor, attention_mask: Tensor | None = None, *,
                    key: Tensor | None = None) -> TowerOutput:
        """The text tower's :class:`TowerOutput` (padding masked by ``attention_mask`` or the pad id)."""
        self._check_text(text, "text")
        out = self.text_encoder(params["text_encoder"], text, attention_mask, key=key, return_hidden_states=True)
        return TowerOutput(out.last_hidden_state, out.pooled, out.hidden_states)

    def project_image(self, params: Params, tower: TowerOutput) -> Tensor:
        return self.image_proj()(params["image_projection"], tower.last_hidden_state[:, 0])

    def project_text(self, params: Params, tower: TowerOutput) -> Tensor:
        return self.text_proj()(params["text_projection"], tower.last_hidden_state[:, 0])

    def image_embeddings(self, params: Params, image: Tensor) -> Tensor:
        """``(B, P)`` L2-normalised contrastive image embeddings (zero-shot classification, retrieval)."""
        return torch.nn.functional.normalize(self.project_image(params, self.encode_image(params, image)), dim=-1)

    def text_embeddings(self, params: Params, text: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``(B, P)`` L2-normalised contrastive text embeddings."""
        tower = self.encode_text(params, text, attention_mask)
        return torch.nn.functional.normalize(self.project_text(params, tower), dim=-1)

    def encode_mm(self, params: Params, image_hidden: Tensor, text_hidden: Tensor, text_valid: Tensor | None = None,
                  *, key: Tensor | None = None) -> TowerOutput:
        """The multimodal encoder over ``image_hidden (B, 1 + N, Di)`` and ``text_hidden (B, T, Dt)`` (the towers'
        last block outputs, before their LayerNorms); ``text_valid (B, T)`` masks the text's padding."""
        img = self.image_to_mm()(params["image_to_mm_projection"], image_hidden)
        txt = self.text_to_mm()(params["text_to_mm_projection"], text_hidden)
        mask = None
        if text_valid is not None and self.mask_text_padding_in_mm:
            mask = torch.cat([text_valid.new_ones(img.shape[:2]), text_valid], dim=1)
        return self.mm_encoder(params["mm_encoder"], torch.cat([img, txt], dim=1), mask, key=key)

    # --- the forward -----------------------------------------------------------------------------------------

    def __call__(self, params: Params, image: Tensor | None = None, text: Tensor | None = None,
                 image_patches_mask: Tensor | None = None, text_masked: Tensor | None = None,
                 required_embedding: str | None = None, skip_unmasked_mm_encoder: bool = True, *,
                 text_attention_mask: Tensor | None = None, key: Tensor | None = None) -> FLAVAOutput:
        if required_embedding is None:
            required_embedding = "mm" if image is not None and text is not None else \
                "image" if image is not None else "text"
        if required_embedding not in EMBEDDING_OPTIONS:
            raise ValueError(f"FLAVAModel: required_embedding: expected one of {EMBEDDING_OPTIONS} or None, "
                             f"got {required_embedding!r}")
        if image is None and text is None and text_masked is None:
            raise ValueError("FLAVAModel: expected an image, a text or a masked text, got none")
        k = pr.maybe_split(key, 6)
        use_image = image is not None and required_embedding in ("image", "mm")
        use_text = required_embedding in ("text", "mm")
        image_out = image_masked = text_out = text_masked_out = None
        proj_img = proj_txt = None
        if use_image:
            image_out = self.encode_image(params, image, key=k[0])
            proj_img = self.project_image(params, image_out)
            image_masked = image_out if image_patches_mask is None else \
                self.encode_image(params, image, image_patches_mask, key=k[1])
        if use_text and text is not None:
            text_out = self.encode_text(params, text, text_attention_mask, key=k[2])
            proj_txt = self.project_text(params, text_out)
        if use_text and text_masked is not None:
            self._check_text(text_masked, "text_masked")
            text_masked_out = self.encode_text(params, text_masked, text_attention_mask, key=k[3])
        mm = mm_masked = None
        if required_embedding == "mm":
            if not skip_unmasked_mm_encoder and image_out is not None and text_out is not None:
                mm = self.encode_mm(params, image_out.hidden_states[-1], text_out.hidden_states[-1],
                                    self.text_valid(text, text_attention_mask), key=k[4])
            if image_masked is not None and text_masked_out is not None:
                mm_masked = self.encode_mm(params, image_masked.hidden_states[-1], text_masked_out.hidden_states[-1],
                                           self.text_valid(text_masked, text_attention_mask), key=k[5])
        return FLAVAOutput(image_out, image_masked, text_out, text_masked_out, mm, mm_masked, proj_img, proj_txt)
