"""OpenAI's released CLIP weights: download (sha256-verified, cached) and load as polymodal params.

``load_pretrained(name, path=None, cache_dir=None)`` returns ``Pretrained(spec, params, state)``.
With ``path`` it reads that file; otherwise :func:`polymodal.hub.fetch` looks for the file in
``cache_dir`` (default ``<hub cache>/clip``, i.e. ``~/.cache/polymodal/clip`` unless
``$POLYMODAL_CACHE`` says otherwise) and downloads it there when missing: from
``$POLYMODAL_HUB_MIRROR``, then OpenAI's URL, then the storage origin behind OpenAI's CDN host.
The URLs carry the file's sha256 in their path; it is checked after every download and on
every cached file, and a mismatch is an error.

Readable files: safetensors, ``torch.save`` files (read with ``weights_only=True``; a
``{"state_dict": ...}`` training checkpoint and DDP's ``module.`` prefix are fine), and OpenAI's
TorchScript archives (read by :mod:`.torchscript` without running their code). The layout
(OpenAI / open_clip, TorchMultimodal or polymodal) is detected from the keys.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch

from ... import hub
from ...core.pytree import Params, cast, unflatten
from ...hub import download, read_state_dict
from .builders import BUILDERS, canonical_name
from .convert import detect_layout, from_open_clip, from_torchmultimodal, to_open_clip
from .model import CLIP

__all__ = ["OPENAI_URLS", "Pretrained", "load_pretrained", "download", "mirrors", "read_state_dict", "default_cache_dir"]

_BASE = "https://openaipublic.azureedge.net/clip/models"
# clip.available_models() -> URL; the path segment before the file name is the file's sha256.
OPENAI_URLS: dict[str, str] = {
    "clip_rn50": f"{_BASE}/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "clip_rn101": f"{_BASE}/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "clip_rn50x4": f"{_BASE}/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "clip_rn50x16": f"{_BASE}/52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "clip_rn50x64": f"{_BASE}/be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
    "clip_vit_b32": f"{_BASE}/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "clip_vit_b16": f"{_BASE}/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "clip_vit_l14": f"{_BASE}/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "clip_vit_l14_336": f"{_BASE}/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}


def mirrors(url: str) -> list[str]:
    """``url`` and, for OpenAI's CDN host, the storage origin behind it (the sha256 check makes
    any source safe to use)."""
    cdn, origin = "openaipublic.azureedge.net", "openaipublic.blob.core.windows.net"
    return [url, url.replace(cdn, origin)] if cdn in url else [url]


class Pretrained(NamedTuple):
    """A loaded model: its spec, params and (ResNet towers) batch-norm state, else ``None``."""

    spec: CLIP
    params: Params
    state: Params | None


def default_cache_dir() -> Path:
    """``<hub cache>/clip``: ``~/.cache/polymodal/clip`` unless ``$POLYMODAL_CACHE`` / ``$XDG_CACHE_HOME`` say otherwise."""
    return hub.cache_dir() / "clip"


def load_pretrained(name: str, path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None, *,
                    quick_gelu: bool = True, dtype: torch.dtype | None = torch.float32,
                    progress: bool = True) -> Pretrained:
    """OpenAI's CLIP weights for ``name`` (``"ViT-B/32"``, ``"ViT-B-32"``, ``"clip_vit_b32"``, ...).

    Args:
        name: the model; its builder gives the architecture (checked against the file).
        path: a local checkpoint (any supported format and layout); no download then.
        cache_dir: where downloads go (default :func:`default_cache_dir`).
        quick_gelu: the activation (OpenAI's weights were trained with QuickGELU).
        dtype: cast floating leaves (OpenAI's files are float16); ``None`` keeps them.

    >>> clip, params, state = load_pretrained("ViT-B/32")  # doctest: +SKIP
    """
    builder, _ = canonical_name(name)
    spec = BUILDERS[builder](quick_gelu=quick_gelu)
    if path is None:
        if builder not in OPENAI_URLS:
            raise ValueError(f"load_pretrained: no published weights for {name!r}; expected one of "
                             f"{sorted(OPENAI_URLS)} (or pass path=...)")
        url = OPENAI_URLS[builder]
        try:
            path = hub.fetch(os.path.basename(url), mirrors(url), url.split("/")[-2],
                             cache=cache_dir if cache_dir is not None else default_cache_dir(), progress=progress,
                             hint="or pass path=... to load_pretrained")
        except (RuntimeError, ValueError) as e:
            raise type(e)(f"load_pretrained({name!r}): {e}") from e
    sd = read_state_dict(path)
    layout = detect_layout(sd)
    if layout == "polymodal":
        flat = dict(sd)
        state_keys = [k for k in flat if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")]
        state_flat = {k: flat.pop(k) for k in state_keys}
        sd = to_open_clip(unflatten(flat), unflatten(state_flat) if state_flat else None, spec)
    convert = from_torchmultimodal if layout == "torchmultimodal" else from_open_clip
    params, state = convert(sd, spec, with_state=True)
    if dtype is not None:
        params = cast(params, dtype)
        state = None if state is None else cast(state, dtype)
    return Pretrained(spec, params, state)
