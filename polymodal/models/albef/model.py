"""ALBEF's three encoders (Li et al. 2021, "Align before Fuse"): a ViT, the first layers of BERT as the
text encoder, and BERT layers that cross-attend to the image as the multimodal (fusion) encoder.

The vision encoder is the shared :class:`~polymodal.core.encoders.vit.VisionTransformer` (torchvision's
pre-norm ViT with a final LayerNorm: TorchMultimodal's ``ALBEFVisionEncoder`` returns its ``encoder.ln``
output), the text encoder the shared :class:`~polymodal.core.encoders.bert.BERTTextEncoder` (post-norm,
no pooler) and the multimodal encoder its :class:`~polymodal.core.layers.TransformerEncoder` with
``cross_attention_every=1`` (TorchMultimodal's ``ALBEFMultimodalEncoder``: self-attention, cross-attention
to the image tokens, feed-forward, each post-norm). Params::

    vision: VisionTransformer's       text: BERTTextEncoder's       multimodal: {layers: [...] * L}

>>> import torch
>>> from polymodal.core import random as pr
>>> from polymodal.models.albef.builders import albef_tiny
>>> spec = albef_tiny().model
>>> p = spec.init(key=pr.key(0))
>>> out = spec(p, torch.randn(2, 3, 32, 32), torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0]]))
>>> out.image_embeddings.shape, out.text_embeddings.shape, out.multimodal_embeddings.shape
(torch.Size([2, 17, 64]), torch.Size([2, 4, 64]), torch.Size([2, 4, 64]))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

from ...core import random as pr
from ...core.encoders.bert import BERTTextEncoder
from ...core.encoders.vit import VisionTransformer
from ...core.layers.transformer import TransformerEncoder
from ...core.pytree import Params
from ...core.spec import Spec

__all__ = ["ALBEFModel", "ALBEFModelOutput", "check_pair"]


class ALBEFModelOutput(NamedTuple):
    """``image_embeddings (B, 1 + N, D_v)``, ``text_embeddings (B, T, D)``, ``multimodal_embeddings (B, T, D)``."""

    image_embeddings: Tensor
    text_embeddings: Tensor
    multimodal_embeddings: Tensor


def check_pair(owner: str, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> None:
    """Images ``(B, C, H, W)``, ids ``(B, T)`` and mask ``(B, T)`` of one batch size."""
    if images.dim() != 4:
        raise ValueError(f"{owner}: images: expected shape (B, C, H, W), got {tuple(images.shape)}")
    if input_ids.dim() != 2:
        raise ValueError(f"{owner}: input_ids: expected shape (B, T), got {tuple(input_ids.shape)}")
    if images.shape[0] != input_ids.shape[0]:
        raise ValueError(f"{owner}: images and texts must pair up: expected {images.shape[0]} texts (one per "
                         f"image), got input_ids of shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"{owner}: attention_mask: expected shape {tuple(input_ids.shape)} (as input_ids), got "
                         f"{tuple(attention_mask.shape)}")


@dataclass(frozen=True)
class ALBEFModel(Spec):
    """``images (B, C, H, W), input_ids (B, T), attention_mask (B, T) -> ALBEFModelOutput``."""

    vision: VisionTransformer  # image -> (B, 1 + N, D_v) tokens (class token first)
    text: BERTTextEncoder  # ids -> (B, T, D) (BERT's first layers, no pooler)
    multimodal: TransformerEncoder  # post-norm layers cross-attending to the image tokens

    def __post_init__(self) -> None:
        layer = self.multimodal.layer
        if layer.d_model != self.text.hidden_size:
            raise ValueError(f"ALBEFModel: multimodal width {layer.d_model} must equal the text width "
                             f"{self.text.hidden_size}")
        if (layer.dim_kv or layer.d_model) != self.vision.width:
            raise ValueError(f"ALBEFModel: multimodal dim_kv {layer.dim_kv or layer.d_model} must equal the vision "
                             f"width {self.vision.width}")

    @property
    def hidden_size(self) -> int:
        return self.text.hidden_size

    def init(self, *, key: Tensor) -> Params:
        kv, kt, km = pr.split(key, 3)
        return {"vision": self.vision.init(key=kv), "text": self.text.init(key=kt),
                "multimodal": self.multimodal.init(key=km)}

    def encode_image(self, params: Params, images: Tensor, *, key: Tensor | None = None) -> Tensor:
        """``(B, C, H, W) -> (B, 1 + N, D_v)``: the ViT's tokens after its final LayerNorm."""
        return self.vision(params["vision"], images, key=key).last_hidden_state

    def encode_text(self, params: Params, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                    key: Tensor | None = None) -> Tensor:
        """``(B, T) -> (B, T, D)``; ``attention_mask`` 1 = real token (default: ids != pad id)."""
        return self.text(params["text"], input_ids, attention_mask, key=key).last_hidden_state

    def fuse(self, params: Params, text_embeddings: Tensor, attention_mask: Tensor | None, image_embeddings: Tensor,
             *, image_mask: Tensor | None = None, key: Tensor | None = None) -> Tensor:
        """The multimodal encoder: ``text (B, T, D)`` attends to itself (padding masked) and to ``image
        (B, S, D_v)`` -> ``(B, T, D)``."""
        pad = None if attention_mask is None else ~attention_mask.bool()
        mem_pad = None if image_mask is None else ~image_mask.bool()
        return self.multimodal(params["multimodal"], text_embeddings, image_embeddings, key_padding_mask=pad,
                               memory_key_padding_mask=mem_pad, key=key).last_hidden_state

    def __call__(self, params: Params, images: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None, *,
                 key: Tensor | None = None) -> ALBEFModelOutput:
        if images.dim() == 3 and input_ids.dim() == 1:  # one unbatched pair (under vmap)
            add = (lambda t: None if t is None else t[None])  # noqa: E731
            out = self(params, images[None], input_ids[None], add(attention_mask), key=key)
            return ALBEFModelOutput(*(t[0] for t in out))
        check_pair("ALBEFModel", images, input_ids, attention_mask)
        if attention_mask is None:
            attention_mask = input_ids != self.text.embeddings.pad_token_id
        kv, kt, km = pr.maybe_split(key, 3)
        img = self.encode_image(params, images, key=kv)
        txt = self.encode_text(params, input_ids, attention_mask, key=kt)
        return ALBEFModelOutput(img, txt, self.fuse(params, txt, attention_mask, img, key=km))
