"""MUGEN's released text-to-video GPT weights (TorchMultimodal's ``examples/mugen/generation/text_video_gpt.py``).

``load_pretrained("mugen_L32")`` -> ``Pretrained(spec, params, vqvae, vqvae_params, vqvae_state)``. The
file holds the whole reference ``MultimodalGPT`` (its text tokenizer's embedding and its frozen MUGEN
VQ-VAE as ``out_tokenizer.*``): both come back converted, the VQ-VAE through the registered ``vqvae``
family's builder and converter (as ``--vqvae RUN`` is read; families do not import each other). The URLs carry the first 8 hex digits of the file's sha256
(torch.hub's convention), checked after the fetch; pass ``sha256=`` to pin the whole digest.

The GPT's text vocabulary is MUGEN's CoinRun character-BPE tokenizer (1024 entries; its files:
:data:`TOKENIZER_URLS`); polymodal has no reader for that format yet, so prompts must be encoded by
the caller.

>>> sorted(MUGEN_GPT_URLS)
['mugen_L16', 'mugen_L32', 'mugen_L8']
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple


from ... import hub
from ...core.encoders.gpt import MultimodalGPT
from ...core.pytree import Params
from ...registry import family
from .builders import mugen_gpt
from .convert import from_torchmultimodal

__all__ = ["MUGEN_GPT_URLS", "TOKENIZER_URLS", "Pretrained", "load_pretrained"]

_BASE = "https://pytorch.s3.amazonaws.com/models/multimodal/mugen"
MUGEN_GPT_URLS: dict[str, str] = {
    "mugen_L32": f"{_BASE}/text_video_gpt_L32_weights-17db9549.pth",
    "mugen_L16": f"{_BASE}/text_video_gpt_L16_weights-5dfc5a0a.pth",
    "mugen_L8": f"{_BASE}/text_video_gpt_L8_weights-72b6d2ab.pth",
}
TOKENIZER_URLS = {"encoder": f"{_BASE}/tokenizer-coinrun_1024_encoder.json",
                  "merges": f"{_BASE}/tokenizer-coinrun_1024_merges.txt"}
_LATENT = {"mugen_L32": (8, 8, 8), "mugen_L16": (4, 8, 8), "mugen_L8": (2, 8, 8)}


class Pretrained(NamedTuple):
    """A loaded text-to-video GPT (spec, params) and the MUGEN VQ-VAE that tokenises its videos
    (spec, params, state: batch-norm statistics and codebook)."""

    spec: MultimodalGPT
    params: Params
    vqvae: Any
    vqvae_params: Params
    vqvae_state: Params


def _mugen_vqvae() -> tuple[Any, Callable]:
    """The MUGEN VQ-VAE spec and its TorchMultimodal converter, from the registered ``vqvae`` family."""
    fam = family("vqvae")
    return fam.build("mugen"), fam.extra["from_torchmultimodal"]


def load_pretrained(name: str = "mugen_L32", path: str | os.PathLike | None = None, *, sha256: str | None = None,
                    cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Pretrained:
    """MUGEN's text-to-video GPT ``name`` (``"mugen_L32"``: 32-frame clips, 8x8x8 codes; ``L16``, ``L8``).

    >>> spec, params, vqvae, vq_params, vq_state = load_pretrained("mugen_L32")  # doctest: +SKIP
    """
    if name not in MUGEN_GPT_URLS:
        raise ValueError(f"load_pretrained: unknown MUGEN GPT {name!r}; expected one of {sorted(MUGEN_GPT_URLS)}")
    if path is None:
        url = MUGEN_GPT_URLS[name]
        path = hub.fetch(os.path.basename(url), [url], sha256, cache=cache_dir or hub.cache_dir() / "mugen",
                         progress=progress, hint="or pass path=... to load_pretrained", check_hash=True)
    sd = hub.read_state_dict(path)
    spec = mugen_gpt(video_latent_shape=_LATENT[name])
    vqvae, vq_from_tmm = _mugen_vqvae()
    vq_params, vq_state = vq_from_tmm({k: v for k, v in sd.items() if k.startswith("out_tokenizer.")}, vqvae,
                                      prefix="out_tokenizer.")
    return Pretrained(spec, from_torchmultimodal(sd, spec), vqvae, vq_params, vq_state)
