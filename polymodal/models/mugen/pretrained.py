"""MUGEN's released text-to-video GPT weights (TorchMultimodal's ``examples/mugen/generation/text_video_gpt.py``).

``load_pretrained("mugen_L32")`` -> ``Pretrained(spec, params, vqvae_state_dict)``. The file holds
the whole reference ``MultimodalGPT`` (its text tokenizer's embedding and its frozen MUGEN VQ-VAE as
``out_tokenizer.*``): the GPT's params come back converted, the VQ-VAE's keys as they are (read them
with ``polymodal.models.vqvae.convert.from_torchmultimodal(sd, mugen_vqvae())``; the video-gpt family
does not import the vqvae family). The URLs carry the first 8 hex digits of the file's sha256
(torch.hub's convention), checked after the fetch; pass ``sha256=`` to pin the whole digest.

The GPT's text vocabulary is MUGEN's CoinRun character-BPE tokenizer (1024 entries; its files:
:data:`TOKENIZER_URLS`); polymodal has no reader for that format yet, so prompts must be encoded by
the caller.

>>> sorted(MUGEN_GPT_URLS)
['mugen_L16', 'mugen_L32', 'mugen_L8']
"""

from __future__ import annotations

import os
from typing import NamedTuple

from torch import Tensor

from ... import hub
from ...core.encoders.gpt import MultimodalGPT
from ...core.pytree import Params
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
    """A loaded text-to-video GPT: spec, params, and the reference VQ-VAE's keys (``out_tokenizer.`` stripped)."""

    spec: MultimodalGPT
    params: Params
    vqvae_state_dict: dict[str, Tensor]


def load_pretrained(name: str = "mugen_L32", path: str | os.PathLike | None = None, *, sha256: str | None = None,
                    cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Pretrained:
    """MUGEN's text-to-video GPT ``name`` (``"mugen_L32"``: 32-frame clips, 8x8x8 codes; ``L16``, ``L8``).

    >>> spec, params, vq_sd = load_pretrained("mugen_L32")  # doctest: +SKIP
    """
    if name not in MUGEN_GPT_URLS:
        raise ValueError(f"load_pretrained: unknown MUGEN GPT {name!r}; expected one of {sorted(MUGEN_GPT_URLS)}")
    if path is None:
        url = MUGEN_GPT_URLS[name]
        path = hub.fetch(os.path.basename(url), [url], sha256, cache=cache_dir or hub.cache_dir() / "mugen",
                         progress=progress, hint="or pass path=... to load_pretrained")
        prefix = url.rsplit("-", 1)[-1].split(".")[0]
        if sha256 is None and not hub.sha256_of(path).startswith(prefix):
            raise ValueError(f"load_pretrained: '{path}' does not match the sha256 prefix {prefix} in its URL; "
                             "delete it to download it again")
    sd = hub.read_state_dict(path)
    spec = mugen_gpt(video_latent_shape=_LATENT[name])
    vq = {k[len("out_tokenizer."):]: v for k, v in sd.items() if k.startswith("out_tokenizer.")}
    return Pretrained(spec, from_torchmultimodal(sd, spec), vq)
