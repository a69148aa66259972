"""The CLIP model spec: an image tower, a text tower and a learnable temperature.

``params = {"visual": ..., "text": ..., "logit_scale": ()}``. ResNet image towers carry
batch-norm running statistics as explicit state (``spec.init_state() = {"visual": ...}``;
``None`` for ViT towers); every entry point takes it as ``state=`` and normalises with it
(frozen) unless ``training=True`` is asked of :meth:`CLIP.__call__`.

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

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core import random as pr
from ...core.pytree import Params
from ...core.spec import Spec
from .config import CLIPConfig
from .resnet import ModifiedResNet
from .text import TextTransformer
from .vision import VisionTransformer

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
    * ``clip(params, images, tokens) -> CLIPOutput``; with ``state=`` given (ResNet towers),
      ``(CLIPOutput, new_state)``, the core's convention for stateful specs.

    ``key`` enables the ViT's patch dropout when the config has one (the only randomness).
    """

    config: CLIPConfig = field(default_factory=CLIPConfig)  # the architecture (see builders.py for the published ones)

    @property
    def is_resnet(self) -> bool:
        return self.config.is_resnet

    def visual(self) -> VisionTransformer | ModifiedResNet:
        c = self.config
        if c.is_resnet:
            return ModifiedResNet(c.vision, c.embed_dim)
        return VisionTransformer(c.vision, c.embed_dim)

    def text(self) -> TextTransformer:
        return TextTransformer(self.config.text, self.config.embed_dim)

    def block_stacks(self) -> list[str]:
        return [f"visual.{s}" for s in self.visual().block_stacks()] + [f"text.{s}" for s in self.text().block_stacks()]

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    @property
    def context_length(self) -> int:
        return self.config.text.context_length

    def init(self, *, key: Tensor) -> Params:
        kv, kt = pr.split(key)
        return {"visual": self.visual().init(key=kv), "text": self.text().init(key=kt),
                "logit_scale": torch.tensor(float(self.config.logit_scale_init))}

    def init_state(self) -> Params | None:
        """``{"visual": batch-norm statistics}`` for ResNet towers, ``None`` for ViT towers."""
        return {"visual": self.visual().init_state()} if self.is_resnet else None

    def _image(self, params: Params, images: Tensor, state: Params | None, training: bool,
               key: Tensor | None) -> tuple[Tensor, Params | None]:
        if self.is_resnet:
            old = None if state is None else state["visual"]
            y, new = self.visual()(params["visual"], images, old, training=training)
            return y, (state if new is old else {"visual": new})
        return self.visual()(params["visual"], images, key=key), state

    def encode_image(self, params: Params, images: Tensor, normalize: bool = True, *, state: Params | None = None,
                     key: Tensor | None = None) -> Tensor:
        """``images (B, 3, S, S)`` -> ``(B, E)`` image embeddings (unit norm if ``normalize``).

        ``state``: batch-norm statistics of a ResNet tower (``None``: fresh ones, as a newly
        initialised torch model in eval mode); they normalise and are never updated here.
        """
        y, _ = self._image(params, images, state, False, key)
        return F.normalize(y, dim=-1) if normalize else y

    def encode_text(self, params: Params, tokens: Tensor, normalize: bool = True) -> Tensor:
        """``tokens (B, context_length)`` int -> ``(B, E)`` text embeddings (unit norm if ``normalize``)."""
        y = self.text()(params["text"], tokens)
        return F.normalize(y, dim=-1) if normalize else y

    def __call__(self, params: Params, images: Tensor, tokens: Tensor, state: Params | None = None, *,
                 training: bool = False, key: Tensor | None = None) -> CLIPOutput | tuple[CLIPOutput, Params | None]:
        """Both towers, L2-normalised, and the log temperature.

        Args:
            images: ``(B, 3, S, S)`` float. tokens: ``(B', context_length)`` int.
            state: batch-norm statistics (ResNet towers). When given, the return value is
                ``(CLIPOutput, new_state)``; ``training=True`` then normalises with batch
                statistics and advances them (unless the config freezes them).
            key: patch-dropout key (ViT configs with ``patch_dropout > 0``).
        """
        if training and self.is_resnet and state is None:
            raise ValueError("CLIP: training=True with a ResNet tower needs state= (from init_state()), "
                             "or its updated batch-norm statistics would be lost")
        image, new_state = self._image(params, images, state, training, key)
        out = CLIPOutput(F.normalize(image, dim=-1), self.encode_text(params, tokens), params["logit_scale"])
        return out if state is None else (out, new_state)
