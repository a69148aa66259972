"""``torch.nn.Module`` shells for CLIP: the whole model and its encoders.

The shells are :class:`~polymodal.nn.Shell` s over the specs of :mod:`polymodal.models.clip`
(``state_dict()`` keys equal ``flatten(params)``, plus the batch-norm buffers of ResNet towers);
what they add is construction from a builder or checkpoint name and the ``encode_*`` methods.
They are made by the generic family mechanism (:mod:`polymodal.nn.family`); this module only
gives the encoder shells their historical names.

>>> import torch
>>> from polymodal.core import random as pr
>>> model = CLIP("clip_tiny", key=pr.key(0))
>>> out = model(torch.randn(2, 3, 64, 64), torch.randint(0, 49407, (2, 32)))
>>> out.image_embeddings.shape, model.encode_text(torch.randint(0, 49407, (3, 32))).shape
(torch.Size([2, 128]), torch.Size([3, 128]))
"""

from __future__ import annotations

from ..models.clip import model as _model
from ..models.clip import resnet as _resnet
from ..models.clip import text as _text
from ..models.clip import vision as _vision
from .family import spec_shell

__all__ = ["CLIP", "CLIPVisionTransformer", "CLIPModifiedResNet", "CLIPTextTransformer"]

CLIP = spec_shell(_model.CLIP)
CLIPVisionTransformer = spec_shell(_vision.CLIPVisionTransformer)
CLIPModifiedResNet = spec_shell(_resnet.ModifiedResNet)
CLIPTextTransformer = spec_shell(_text.CLIPTextTransformer)
