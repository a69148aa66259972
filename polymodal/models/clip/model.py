"""The CLIP model spec: an image tower, a text tower and a learnable temperature.

``CLIP(visual=CLIPVisionTransformer | ModifiedResNet, text=CLIPTextTransformer, logit_scale_init)``:
the towers are the spec's fields, built once by a builder (``builders.py``). ``params =
{"visual": ..., "text": ..., "logit_scale": ()}``.

State: a ResNet image tower carries batch-norm running statistics (``spec.init_state() =
{"visual": ...}``); a ViT tower has none (``init_state() is None``). The core's rule for stateful
specs applies: a CLIP whose ``init_state()`` is not ``None`` always returns ``(CLIPOutput,
new_state)`` from ``__call__`` (``state=None``: fresh statistics), whatever the mode; a ViT CLIP
returns ``CLIPOutput``. The ``encode_*`` entry points never update state and return tensors.

>>> import torch
>>> from polymodal.core import random as pr
>>> from polymodal.models.clip import build
>>> clip = build("clip_tiny")
>>> params = clip.init(key=pr.key(0))
>>> images, tokens = torch.randn(2, 3, 64, 64), torch.randint(0, 49407, (2, 32))
>>> out = clip(params, images, tokens)
>>> out.image_embeddings.shape, out.text_embeddings.shape, float(out.logit_scale.exp())  # doctest: +ELLIPSIS
(torch.Size([2, 128]), torch.Size([2, 128]), 14.28...)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core import random as pr
from ...core.pytree import Params
from ...core.spec import Spec
from .resnet import ModifiedResNet
from .text import CLIPTextTransformer, trim_padding
from .vision import CLIPVisionTransformer

__all__ = ["CLIP", "CLIPOutput"]


class CLIPOutput(NamedTuple):
    """What :class:`CLIP` returns (functional and shell alike)."""

    image_embeddings: Tensor  # (B, E), L2-normalised
    text_embeddings: Tensor  # (B, E), L2-normalised
    logit_scale: Tensor  # (): the learnable *log* inverse temperature; logits = exp(s) * img @ txt.T


@dataclass(frozen=True)
class CLIP(Spec):
    """CLIP (Radford et al. 2021): contrastive image and text encoders into one embedding space.

    * ``encode_image(params, images, normalize=True, *, state=None, key=None) -> (B, E)``
    * ``encode_text(params, tokens, normalize=True) -> (B, E)``
    * ``clip(params, images, tokens) -> CLIPOutput`` (ViT tower);
      ``clip(params, images, tokens, state) -> (CLIPOutput, new_state)`` (ResNet tower, always).

    ``key`` enables the ViT's patch dropout when it has one (the only randomness).
    """

    visual: CLIPVisionTransformer | ModifiedResNet  # image tower
    text: CLIPTextTransformer  # text tower (same embed_dim as the image tower)
    logit_scale_init: float = math.log(1 / 0.07)  # initial log inverse temperature (CLIP paper, section 2.5)

    def __post_init__(self) -> None:
        if not isinstance(self.visual, (CLIPVisionTransformer, ModifiedResNet)):
            raise TypeError(f"CLIP: visual: expected CLIPVisionTransformer or ModifiedResNet, "
                            f"got {type(self.visual).__name__}")
        if not isinstance(self.text, CLIPTextTransformer):
            raise TypeError(f"CLIP: text: expected CLIPTextTransformer, got {type(self.text).__name__}")
        if self.visual.embed_dim != self.text.embed_dim:
            raise ValueError(f"CLIP: the towers must share embed_dim: visual has {self.visual.embed_dim}, "
                             f"text has {self.text.embed_dim}")

    @property
    def embed_dim(self) -> int:
        """Size of the joint image-text embedding."""
        return self.visual.embed_dim

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.visual, ModifiedResNet)

    @property
    def image_size(self) -> int:
        return self.visual.image_size

    @property
    def context_length(self) -> int:
        return self.text.context_length

    def trim_text(self, tokens: Tensor, multiple_of: int | None = None) -> Tensor:
        """``tokens (B, T)`` cut after the last end-of-text position (:func:`trim_padding`): what
        :meth:`encode_text` embeds exactly as the padded rows, for less work."""
        return trim_padding(tokens, multiple_of)

    def init(self, *, key: Tensor) -> Params:
        kv, kt = pr.split(key)
        return {"visual": self.visual.init(key=kv), "text": self.text.init(key=kt),
                "logit_scale": torch.tensor(float(self.logit_scale_init))}

    def init_state(self) -> Params | None:
        """``{"visual": batch-norm statistics}`` for ResNet towers, ``None`` for ViT towers."""
        return {"visual": self.visual.init_state()} if self.is_resnet else None

    def _image(self, params: Params, images: Tensor, state: Params | None, training: bool,
               key: Tensor | None) -> tuple[Tensor, Params | None]:
        if self.is_resnet:
            old = None if state is None else state["visual"]
            y, new = self.visual(params["visual"], images, old, training=training)
            return y, (state if new is old else {"visual": new})
        if state is not None:
            raise ValueError("CLIP: state: a ViT image tower has no state (init_state() is None), got a state")
        return self.visual(params["visual"], images, key=key), None

    def encode_image(self, params: Params, images: Tensor, normalize: bool = True, *, state: Params | None = None,
                     key: Tensor | None = None) -> Tensor:
        """``images (B, 3, S, S)`` -> ``(B, E)`` image embeddings (unit norm if ``normalize``).

        ``state``: batch-norm statistics of a ResNet tower (``None``: fresh ones, as a newly
        initialised torch model in eval mode); they normalise and are never updated here.
        """
        y, _ = self._image(params, images, state, False, key)
        return F.normalize(y, dim=-1) if normalize else y

    def encode_text(self, params: Params, tokens: Tensor, normalize: bool = True) -> Tensor:
        """``tokens (B, T <= context_length)`` int -> ``(B, E)`` text embeddings (unit norm if ``normalize``)."""
        y = self.text(params["text"], tokens)
        return F.normalize(y, dim=-1) if normalize else y

    def __call__(self, params: Params, images: Tensor, tokens: Tensor, state: Params | None = None, *,
                 training: bool = False, key: Tensor | None = None) -> CLIPOutput | tuple[CLIPOutput, Params]:
        """Both towers, L2-normalised, and the log temperature.

        Args:
            images: ``(B, 3, S, S)`` float. tokens: ``(B', T <= context_length)`` int. ``B'`` may
                differ from ``B`` (zero-shot: images against class prompts); a contrastive loss
                over the output needs pairs and says so (``expected shape (B, E) (as emb_a)``).
            state: batch-norm statistics (ResNet towers; ``None``: fresh ones). ``training=True``
                normalises with batch statistics and advances them (unless ``frozen_bn``).
            key: patch-dropout key (ViT towers with ``patch_dropout > 0``).
        Returns:
            ResNet tower: ``(CLIPOutput, new_state)``, always; ViT tower: ``CLIPOutput``.
        """
        image, new_state = self._image(params, images, state, training, key)
        out = CLIPOutput(F.normalize(image, dim=-1), self.encode_text(params, tokens), params["logit_scale"])
        return (out, new_state) if self.is_resnet else out
