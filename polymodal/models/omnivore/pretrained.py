"""The published Omnivore weights (TorchMultimodal's URLs): download through ``polymodal.hub``, convert.

Each model is two files, an encoder and its heads (``omnivore_swin_t_encoder-b7e39400.pth``,
``omnivore_swin_t_heads-c8bfb7fd.pth``, ...). As with every file on ``download.pytorch.org``,
the 8 hex digits before ``.pth`` are the start of the file's sha256: :func:`load_pretrained`
checks that prefix on every download and every cached file (the full digests are not
published; pass ``sha256=`` to :func:`fetch_published` to pin a full one). Files are read with
``weights_only=True`` (:func:`polymodal.hub.read_state_dict`) and cached under
``<hub cache>/omnivore``.

>>> sorted(PUBLISHED)
['omnivore_swin_b', 'omnivore_swin_s', 'omnivore_swin_t']
>>> load_pretrained("omnivore_tiny")
Traceback (most recent call last):
...
ValueError: load_pretrained: no published weights for 'omnivore_tiny'; expected one of ['omnivore_swin_b', 'omnivore_swin_s', 'omnivore_swin_t'] (or pass encoder_path= and heads_path=, or path=)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from ... import hub
from ...core.pytree import Params, unflatten
from .builders import build
from .convert import from_torchmultimodal, merge_published, to_torchmultimodal
from .model import Omnivore

__all__ = ["URLS", "PUBLISHED", "Pretrained", "load_pretrained", "fetch_published", "default_cache_dir"]

_BASE = "https://download.pytorch.org/models"
# TorchMultimodal's _OMNIVORE_PRETRAINED_URLS (torchmultimodal/models/omnivore.py).
URLS: dict[str, str] = {
    "swin_t_encoder": f"{_BASE}/omnivore_swin_t_encoder-b7e39400.pth",
    "swin_s_encoder": f"{_BASE}/omnivore_swin_s_encoder-40b05ba1.pth",
    "swin_b_encoder": f"{_BASE}/omnivore_swin_b_encoder-a9134768.pth",
    "swin_t_heads": f"{_BASE}/omnivore_swin_t_heads-c8bfb7fd.pth",
    "swin_s_heads": f"{_BASE}/omnivore_swin_s_heads-c5e77246.pth",
    "swin_b_heads": f"{_BASE}/omnivore_swin_b_heads-3c38b3ed.pth",
}
# builder -> (encoder file key, heads file key)
PUBLISHED: dict[str, tuple[str, str]] = {f"omnivore_swin_{s}": (f"swin_{s}_encoder", f"swin_{s}_heads") for s in "tsb"}


class Pretrained(NamedTuple):
    """A loaded model: its spec and params."""

    spec: Omnivore
    params: Params


def default_cache_dir() -> Path:
    """``<hub cache>/omnivore``."""
    return hub.cache_dir() / "omnivore"


def fetch_published(key: str, cache_dir: str | os.PathLike | None = None, *, sha256: str | None = None,
                    progress: bool = True) -> Path:
    """The cached file ``URLS[key]`` (downloaded when missing), its sha256 checked against the
    digest prefix in its name (and against ``sha256`` when given)."""
    if key not in URLS:
        raise ValueError(f"fetch_published: unknown file {key!r}; expected one of {sorted(URLS)}")
    url = URLS[key]
    name = url.rsplit("/", 1)[-1]
    return hub.fetch(name, url, sha256, cache=cache_dir if cache_dir is not None else default_cache_dir(),
                     progress=progress, hint="or pass encoder_path= and heads_path= to load_pretrained",
                     check_hash=hub.hash_prefix(name) is not None)


def load_pretrained(name: str = "omnivore_swin_t", *, encoder_path: str | os.PathLike | None = None,
                    heads_path: str | os.PathLike | None = None, path: str | os.PathLike | None = None,
                    cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Pretrained:
    """The published Omnivore weights of ``name`` (``"omnivore_swin_t"``, ``_s``, ``_b``) as params.

    Args:
        name: the builder; its spec is checked against the files (every key and shape).
        encoder_path, heads_path: local copies of the two published files (no download then).
        path: one file holding a whole ``Omnivore`` state dict (TorchMultimodal's or polymodal's keys).
        cache_dir: where downloads go (default :func:`default_cache_dir`).

    >>> spec, params = load_pretrained("omnivore_swin_t")  # doctest: +SKIP
    """
    key = name.replace("-", "_")
    spec = build(key)
    if path is not None:
        sd = hub.read_state_dict(path)
        if any(k.startswith("encoder.stages.") for k in sd):  # polymodal's own layout
            sd = to_torchmultimodal(unflatten(dict(sd)), spec)
        return Pretrained(spec, from_torchmultimodal(sd, spec))
    if encoder_path is None or heads_path is None:
        if key not in PUBLISHED:
            raise ValueError(f"load_pretrained: no published weights for {name!r}; expected one of {sorted(PUBLISHED)} "
                             "(or pass encoder_path= and heads_path=, or path=)")
        enc_key, heads_key = PUBLISHED[key]
        try:
            encoder_path = encoder_path or fetch_published(enc_key, cache_dir, progress=progress)
            heads_path = heads_path or fetch_published(heads_key, cache_dir, progress=progress)
        except (RuntimeError, ValueError) as e:
            raise type(e)(f"load_pretrained({name!r}): {e}") from e
    sd = merge_published(hub.read_state_dict(encoder_path), hub.read_state_dict(heads_path))
    return Pretrained(spec, from_torchmultimodal(sd, spec))
