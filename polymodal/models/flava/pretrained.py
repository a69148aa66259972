"""TorchMultimodal's published FLAVA checkpoints, downloaded through :mod:`polymodal.hub` and converted.

``load_pretrained("flava_full")`` (the full pretraining model: encoders, dVAE tokenizer and loss heads) or
``load_pretrained("flava_full_model")`` (``FLAVAModel`` only) fetches TorchMultimodal's file into
``<hub cache>/flava`` (``$POLYMODAL_CACHE``; mirrors via ``$POLYMODAL_HUB_MIRROR``) unless ``path`` names a
local file, and returns ``Pretrained(spec, params)``. The layout (TorchMultimodal's ``FLAVAForPreTraining`` /
``FLAVAModel`` / ``FLAVAForClassification``, or polymodal's own flat keys) is read from the keys.

sha256: TorchMultimodal publishes none for these files and none could be computed here (no network in
this session): ``SHA256`` is ``None``, so a download is not verified; pass ``sha256=`` once you have
checked a copy (``polymodal.hub.sha256_of``), and a cached file is then verified on every load.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ... import hub
from ...core.pytree import Params, cast, unflatten
from .builders import flava_model, flava_model_for_classification, flava_model_for_pretraining
from .convert import from_torchmultimodal, to_torchmultimodal

__all__ = ["URLS", "SHA256", "Pretrained", "load_pretrained", "default_cache_dir"]

# torchmultimodal/models/flava/model.py: FLAVA_FOR_PRETRAINED_MAPPING / FLAVA_MODEL_MAPPING ("flava_full").
URLS: dict[str, str] = {
    "flava_full": "https://download.pytorch.org/models/multimodal/flava/flava_for_pretraining_unified_text_encoder.pt",
    "flava_full_model": "https://download.pytorch.org/models/multimodal/flava/flava_model_unified_text_encoder.pt",
}
SHA256: dict[str, str | None] = {"flava_full": None, "flava_full_model": None}  # not published (module docstring)


class Pretrained(NamedTuple):
    """A loaded model: its spec and params."""

    spec: Any
    params: Params


def default_cache_dir() -> Path:
    """``<hub cache>/flava``."""
    return hub.cache_dir() / "flava"


def _spec_for(sd: dict) -> Any:
    if any(k.startswith("classifier.") for k in sd):
        n = sd[max((k for k in sd if k.startswith("classifier.") and k.endswith(".weight")),
                   key=lambda k: int(k.split(".")[2]))].shape[0]
        return flava_model_for_classification(n)
    if any(k.startswith("model.") for k in sd):
        return flava_model_for_pretraining()
    return flava_model()


def load_pretrained(name: str = "flava_full", path: str | os.PathLike | None = None,
                    cache_dir: str | os.PathLike | None = None, *, spec: Any = None, sha256: str | None = None,
                    dtype: torch.dtype | None = torch.float32, progress: bool = True) -> Pretrained:
    """TorchMultimodal's FLAVA weights (``name`` in :data:`URLS`) or the file at ``path``.

    ``spec`` overrides the architecture read from the keys (default: TorchMultimodal's builders' defaults);
    ``sha256`` verifies the download / cached file. Mismatched keys raise one ``ValueError`` naming them.

    >>> pre = load_pretrained("flava_full")  # doctest: +SKIP
    """
    if path is None:
        if name not in URLS:
            raise ValueError(f"load_pretrained: no published FLAVA weights for {name!r}; expected one of "
                             f"{sorted(URLS)} (or pass path=...)")
        url = URLS[name]
        try:
            path = hub.fetch(os.path.basename(url), [url], sha256 or SHA256[name],
                             cache=cache_dir if cache_dir is not None else default_cache_dir(), progress=progress,
                             hint="or pass path=... to load_pretrained")
        except (RuntimeError, ValueError) as e:
            raise type(e)(f"load_pretrained({name!r}): {e}") from e
    elif sha256 is not None and (got := hub.sha256_of(path)) != sha256:
        raise ValueError(f"load_pretrained: '{path}' has sha256 {got}, expected {sha256}")
    sd = hub.read_state_dict(path)
    spec = spec if spec is not None else _spec_for(sd)
    if any(k.endswith(".self_attn.in_proj_weight") for k in sd):  # polymodal's own flat keys (pytree.save)
        sd = to_torchmultimodal(unflatten(dict(sd)), spec)  # checks the tree against the spec
    params = from_torchmultimodal(sd, spec)
    return Pretrained(spec, cast(params, dtype) if dtype is not None else params)
