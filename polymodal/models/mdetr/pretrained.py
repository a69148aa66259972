"""MDETR's published weights through ``polymodal.hub`` (download once, cache, optional sha256).

``mdetr_resnet101_pretrained``: TorchMultimodal's conversion of MDETR's pre-trained ResNet-101 model
(Kamath et al. 2021, Section 3: pre-training on 1.3M aligned image-text pairs; the URL of
``examples/mdetr/README.md``), an ``MDETRForPhraseGrounding`` state dict under ``"model"`` (and its EMA
under ``"model_ema"``, used by default, as the README's ``--ema``). The file is read with
``torch.load(weights_only=True)``: nothing is unpickled. No sha256 is published for it; pass one to pin
the file you checked. The original MDETR checkpoints (zenodo.org/record/4721981: pre-trained, Flickr30k,
GQA) use the authors' own layout, which this module does not convert.

>>> sorted(URLS)
['mdetr_resnet101_pretrained']
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ... import hub
from ...core.pytree import Params
from .builders import mdetr_for_phrase_grounding
from .convert import from_torchmultimodal

__all__ = ["URLS", "SHA256", "Pretrained", "load_pretrained", "read_checkpoint"]

URLS: dict[str, str] = {
    "mdetr_resnet101_pretrained":
        "https://pytorch.s3.amazonaws.com/models/multimodal/mdetr/pretrained_resnet101_checkpoint.pth",
}
SHA256: dict[str, str | None] = {"mdetr_resnet101_pretrained": None}  # not published
_BUILDERS = {"mdetr_resnet101_pretrained": mdetr_for_phrase_grounding}


class Pretrained(NamedTuple):
    """The spec and its params."""

    spec: Any
    params: Params


def read_checkpoint(path: str | os.PathLike, ema: bool = True) -> dict[str, torch.Tensor]:
    """The TorchMultimodal state dict inside an MDETR training checkpoint (``"model_ema"`` when ``ema`` and
    present, else ``"model"``; a bare state dict as is)."""
    try:
        obj = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise ValueError(f"'{path}' is not a weights-only torch checkpoint: {e}") from e
    if isinstance(obj, dict) and ("model" in obj or "model_ema" in obj):
        obj = obj["model_ema"] if ema and isinstance(obj.get("model_ema"), dict) else obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"'{path}': expected a state dict of tensors (or one under 'model' / 'model_ema')")
    return obj


def load_pretrained(name: str = "mdetr_resnet101_pretrained", *, path: str | os.PathLike | None = None,
                    sha256: str | None = None, ema: bool = True, cache_dir: str | os.PathLike | None = None
                    ) -> Pretrained:
    """Spec and params of a published checkpoint: ``path`` (a local file) or the cached download of
    ``URLS[name]`` (checked against ``sha256`` when given or known)."""
    if name not in URLS:
        raise ValueError(f"unknown MDETR checkpoint {name!r}; expected one of {sorted(URLS)}")
    if path is None:
        path = hub.fetch(f"mdetr/{Path(URLS[name]).name}", URLS[name], sha256 or SHA256[name], cache=cache_dir,
                         hint="set $POLYMODAL_HUB_MIRROR or pass path= to a downloaded copy")
    spec = _BUILDERS[name]()
    return Pretrained(spec, from_torchmultimodal(read_checkpoint(path, ema), spec))
