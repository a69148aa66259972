"""MDETR: modulated detection (Kamath et al. 2021): a frozen-norm ResNet and a RoBERTa text encoder
feed DETR's transformer; object queries decode boxes, class logits and (in the heads) text alignment.

``MDETR(params, images (B, 3, H, W), input_ids (B, T), image_mask=None, text_padding_mask=None, *, key)``
-> :class:`MDETROutput`. Masks are bool with True = padding (TorchMultimodal's convention); without
them nothing of the image is padding and the text's padding is ``input_ids == pad_token_id``.
:func:`pad_images` / :func:`pad_text` batch lists of differently sized inputs as TorchMultimodal does.

Params (TorchMultimodal's ``MDETR`` names, see ``convert.py`` for the few renamings)::

    image_backbone (torchvision ResNet names), text_encoder (core BERT encoder), transformer,
    text_projection {fc, layer_norm}, image_projection {weight (D, C, 1, 1), bias}, query_embed {weight (Q, D)},
    bbox_embed {layers: [3 Linear]}, class_embed {weight (num_classes + 1, D), bias},
    [extra_query_embeddings {weight (E, D)}]

>>> import torch
>>> from polymodal.core import random as pr
>>> from polymodal.models.mdetr.builders import mdetr_tiny
>>> m = mdetr_tiny().model
>>> out = m(m.init(key=pr.key(0)), torch.rand(2, 3, 64, 64), torch.tensor([[0, 5, 6, 2], [0, 7, 2, 1]]))
>>> out.pred_logits.shape, out.pred_boxes.shape, out.aux_boxes.shape
(torch.Size([2, 8, 256]), torch.Size([2, 8, 4]), torch.Size([2, 2, 8, 4]))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core import random as pr
from ...core.encoders.bert import BERTTextEncoder
from ...core.encoders.resnet import ResNet
from ...core.layers.conv import Conv2d
from ...core.layers.embedding import Embedding
from ...core.layers.linear import Linear
from ...core.layers.mlp import MLP
from ...core.pytree import Params
from ...core.spec import Spec, check_dtype, check_floating
from .transformer import FeatureResizer, MDETRTransformer, sine_position_embedding_2d

__all__ = ["MDETR", "MDETROutput", "pad_images", "pad_text"]


class MDETROutput(NamedTuple):
    """``pred_logits (B, Q, num_classes + 1)`` and ``pred_boxes (B, Q, 4)`` (normalised cx, cy, w, h in
    [0, 1]) from the last decoder layer; ``aux_logits (L, B, Q, C + 1)`` / ``aux_boxes (L, B, Q, 4)`` from
    every decoder layer (the last equals ``pred_*``: DETR's auxiliary losses use the first ``L - 1``);
    ``decoder_hidden_states (L, B, Q, D)`` (object queries only); ``text_memory (B, T, D)``;
    ``extra_embeddings (B, E, D)``: the extra (VQA) queries' output, or None."""

    pred_logits: Tensor
    pred_boxes: Tensor
    aux_logits: Tensor
    aux_boxes: Tensor
    decoder_hidden_states: Tensor
    text_memory: Tensor
    extra_embeddings: Tensor | None


def pad_images(images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """``[(3, H_i, W_i)]`` -> ``(B, 3, H, W)`` zero-padded bottom / right and the mask ``(B, H, W)``
    (True = padding)."""
    if not images:
        raise ValueError("pad_images: expected at least one image, got none")
    for i, im in enumerate(images):
        if im.dim() != 3 or im.shape[0] != 3:
            raise ValueError(f"pad_images: images[{i}]: expected shape (3, H, W), got {tuple(im.shape)}")
    h, w = max(im.shape[1] for im in images), max(im.shape[2] for im in images)
    out = images[0].new_zeros(len(images), 3, h, w)
    mask = torch.ones(len(images), h, w, dtype=torch.bool, device=images[0].device)
    for i, im in enumerate(images):
        out[i, :, : im.shape[1], : im.shape[2]] = im
        mask[i, : im.shape[1], : im.shape[2]] = False
    return out, mask


def pad_text(ids: Sequence[Tensor], pad_token_id: int = 1) -> tuple[Tensor, Tensor]:
    """``[(T_i,)]`` -> ``(B, T)`` padded with ``pad_token_id`` and the padding mask (True = padding)."""
    padded = torch.nn.utils.rnn.pad_sequence(list(ids), batch_first=True, padding_value=pad_token_id)
    return padded, padded == pad_token_id


@dataclass(frozen=True)
class MDETR(Spec):
    """See the module docstring."""

    image_backbone: ResNet  # frozen-norm ResNet body (MDETR: resnet101, layer2..4 trained)
    text_encoder: BERTTextEncoder  # RoBERTa-base without pooler
    transformer: MDETRTransformer  # DETR encoder-decoder
    text_projection: FeatureResizer  # text width -> transformer width
    num_queries: int = 100  # object queries
    num_classes: int = 255  # class logits (+1: no object); MDETR uses them as token positions
    num_extra_queries: int = 0  # extra queries decoded beside the object queries (VQA heads)
    pos_temperature: float = 10000.0  # sine position embedding's base

    @property
    def hidden_dim(self) -> int:
        return self.transformer.d_model

    def image_projection(self) -> Conv2d:
        return Conv2d(self.image_backbone.out_channels, self.hidden_dim, 1)

    def bbox_embed(self) -> MLP:
        return MLP(self.hidden_dim, 4, (self.hidden_dim, self.hidden_dim))

    def class_embed(self) -> Linear:
        return Linear(self.hidden_dim, self.num_classes + 1)

    def init(self, *, key: Tensor) -> Params:
        ks = pr.split(key, 9)
        d = self.hidden_dim
        p: Params = {
            "image_backbone": self.image_backbone.init(key=ks[0]),
            "text_encoder": self.text_encoder.init(key=ks[1]),
            "transformer": self.transformer.init(key=ks[2]),
            "text_projection": self.text_projection.init(key=ks[3]),
            "image_projection": self.image_projection().init(key=ks[4]),
            "query_embed": Embedding(self.num_queries, d).init(key=ks[5]),
            "bbox_embed": self.bbox_embed().init(key=ks[6]),
            "class_embed": self.class_embed().init(key=ks[7]),
        }
        if self.num_extra_queries:
            p["extra_query_embeddings"] = Embedding(self.num_extra_queries, d).init(key=ks[8])
        return p

    def encode_text(self, params: Params, input_ids: Tensor, text_padding_mask: Tensor, *,
                    key: Tensor | None = None) -> Tensor:
        """``(B, T) -> (B, T, D)``: the text encoder's last hidden state, resized to the transformer width."""
        k1, k2 = pr.maybe_split(key, 2)
        h = self.text_encoder(params["text_encoder"], input_ids, ~text_padding_mask, key=k1).last_hidden_state
        return self.text_projection(params["text_projection"], h, key=k2)

    def encode_image(self, params: Params, images: Tensor, image_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, 3, H, W)`` -> projected features ``(B, D, h, w)``, their mask ``(B, h, w)`` and positions."""
        feats = self.image_backbone(params["image_backbone"], images)
        mask = F.interpolate(image_mask[None].float(), size=feats.shape[-2:]).bool()[0]
        pos = sine_position_embedding_2d(mask, self.hidden_dim // 2, self.pos_temperature).to(feats.dtype)
        return self.image_projection()(params["image_projection"], feats), mask, pos

    def __call__(self, params: Params, images: Tensor, input_ids: Tensor, image_mask: Tensor | None = None,
                 text_padding_mask: Tensor | None = None, *, key: Tensor | None = None) -> MDETROutput:
        check_floating(images, "images", self)
        check_dtype(input_ids, "MDETR: input_ids", (torch.int64, torch.int32))
        if images.dim() != 4 or input_ids.dim() != 2 or images.shape[0] != input_ids.shape[0]:
            raise ValueError(f"MDETR: expected images (B, 3, H, W) and input_ids (B, T) with the same B, got "
                             f"{tuple(images.shape)} and {tuple(input_ids.shape)}")
        b, _, h, w = images.shape
        if image_mask is None:
            image_mask = torch.zeros(b, h, w, dtype=torch.bool, device=images.device)
        elif tuple(image_mask.shape) != (b, h, w) or image_mask.dtype != torch.bool:
            raise ValueError(f"MDETR: image_mask: expected a bool tensor {(b, h, w)}, got {image_mask.dtype} "
                             f"{tuple(image_mask.shape)}")
        if text_padding_mask is None:
            text_padding_mask = input_ids == self.text_encoder.embeddings.pad_token_id
        elif tuple(text_padding_mask.shape) != tuple(input_ids.shape) or text_padding_mask.dtype != torch.bool:
            raise ValueError(f"MDETR: text_padding_mask: expected a bool tensor {tuple(input_ids.shape)}, got "
                             f"{text_padding_mask.dtype} {tuple(text_padding_mask.shape)}")
        k_text, k_tr = pr.maybe_split(key, 2)
        text = self.encode_text(params, input_ids, text_padding_mask, key=k_text)
        img, mask, pos = self.encode_image(params, images, image_mask)
        queries = params["query_embed"]["weight"]
        if self.num_extra_queries:
            queries = torch.cat([queries, params["extra_query_embeddings"]["weight"]])
        out = self.transformer(params["transformer"], img, mask, queries, pos, text, text_padding_mask, key=k_tr)
        hs, extra = out.decoder_hidden_states, None
        if self.num_extra_queries:  # TorchMultimodal / MDETR read the extra queries off the FIRST decoder layer
            extra = hs[0, :, self.num_queries:]
            hs = hs[:, :, : self.num_queries]
        logits = self.class_embed()(params["class_embed"], hs)
        boxes = self.bbox_embed()(params["bbox_embed"], hs).sigmoid()
        return MDETROutput(logits[-1], boxes[-1], logits, boxes, hs, out.text_memory, extra)
