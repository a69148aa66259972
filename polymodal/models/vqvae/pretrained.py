"""MUGEN's released video VQ-VAE weights (TorchMultimodal's ``examples/mugen/generation/video_vqvae.py``).

``load_pretrained("mugen_L32")`` -> ``Pretrained(spec, params, state)``: the file is fetched through
:func:`polymodal.hub.fetch` (cache ``<hub cache>/mugen``, ``$POLYMODAL_HUB_MIRROR`` first) and read
weights-only; the layout is TorchMultimodal's (:mod:`.convert`). L32 / L16 / L8 are the clip lengths
(32, 16, 8 frames of 256x256) the same architecture was trained on.

The reference publishes these URLs without a checksum (``load_module_from_url`` checks none), so no
sha256 is pinned here: pass ``sha256=`` to pin the one of a file you trust.

>>> sorted(MUGEN_VQVAE_URLS)
['mugen_L16', 'mugen_L32', 'mugen_L8']
"""

from __future__ import annotations

import os
from typing import NamedTuple

from ... import hub
from ...core.pytree import Params
from .builders import mugen_vqvae
from .convert import from_torchmultimodal
from .model import VQVAE

__all__ = ["MUGEN_VQVAE_URLS", "Pretrained", "load_pretrained"]

_BASE = "https://download.pytorch.org/models/multimodal/mugen"
MUGEN_VQVAE_URLS: dict[str, str] = {
    "mugen_L32": f"{_BASE}/mugen_video_vqvae_L32.pt",
    "mugen_L16": f"{_BASE}/mugen_video_vqvae_L16.pt",
    "mugen_L8": f"{_BASE}/mugen_video_vqvae_L8.pt",
}


class Pretrained(NamedTuple):
    """A loaded VQ-VAE: spec, params and state (batch-norm statistics, codebook)."""

    spec: VQVAE
    params: Params
    state: Params


def load_pretrained(name: str = "mugen_L32", path: str | os.PathLike | None = None, *, sha256: str | None = None,
                    cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Pretrained:
    """MUGEN's video VQ-VAE ``name`` (``"mugen_L32"``, ``"mugen_L16"``, ``"mugen_L8"``); ``path``: a local file.

    >>> spec, params, state = load_pretrained("mugen_L32")  # doctest: +SKIP
    """
    if name not in MUGEN_VQVAE_URLS:
        raise ValueError(f"load_pretrained: unknown MUGEN VQ-VAE {name!r}; expected one of {sorted(MUGEN_VQVAE_URLS)}")
    if path is None:
        url = MUGEN_VQVAE_URLS[name]
        path = hub.fetch(os.path.basename(url), [url], sha256, cache=cache_dir or hub.cache_dir() / "mugen",
                         progress=progress, hint="or pass path=... to load_pretrained")
    spec = mugen_vqvae()
    params, state = from_torchmultimodal(hub.read_state_dict(path), spec)
    return Pretrained(spec, params, state)
