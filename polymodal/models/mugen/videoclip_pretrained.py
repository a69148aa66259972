"""TorchMultimodal's published MUGEN retrieval weights (``examples/mugen/retrieval``), through ``polymodal.hub``.

* ``"videoclip_mugen"``: the MUGEN authors' VideoCLIP, fit to TorchMultimodal's implementation
  (``configs/eval.yaml``'s ``checkpoint_path``; a Lightning checkpoint: ``model.`` + the CLIP
  keys, ``contrastive_loss.logit_scale``). TorchMultimodal reports text->video recall@1/5/10 of
  8.26 / 22.34 / 31.68 % on MUGEN's test set with it.
* ``"s3d_kinetics400"`` (``configs/train.yaml``'s ``video_pretrain_path``) and ``"video_encoder"``
  (``video_clip.py``'s ``PRETRAINED_VIDEO_ENCODER_URL``): S3D pretrained on Kinetics-400, in the
  layout of its ``VideoEncoder`` (``model.`` + torchvision's S3D names).

TorchMultimodal publishes no sha256 for these files. ``video_encoder-weights-b0e27f13.pth``
follows torch.hub's convention (the name carries the first 8 hex digits of the file's sha256),
which is checked; the other two are read without a digest (``weights_only``: no code runs).

>>> load_pretrained("videoclip_mugen")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

from ... import hub
from ...core.encoders.s3d import S3D, s3d
from ...core.pytree import Params
from .videoclip import VideoCLIP
from .videoclip_builders import videoclip
from .videoclip_convert import from_torchmultimodal, s3d_table

__all__ = ["URLS", "SHA256_PREFIX", "Pretrained", "load_pretrained", "load_video_encoder"]

_BASE = "https://pytorch.s3.amazonaws.com/models/multimodal/mugen"
URLS = {
    "videoclip_mugen": f"{_BASE}/videoclip_lightning_mugen.pt",
    "s3d_kinetics400": f"{_BASE}/S3D_kinetics400.pt",
    "video_encoder": f"{_BASE}/video_encoder-weights-b0e27f13.pth",
}
SHA256_PREFIX = {"video_encoder": "b0e27f13"}  # torch.hub's file-name convention


class Pretrained(NamedTuple):
    """A loaded model: its spec, params and batch-norm state."""

    spec: Any
    params: Params
    state: Params


def default_cache_dir() -> Path:
    """``<hub cache>/mugen``."""
    return hub.cache_dir() / "mugen"


def _fetch(name: str, cache_dir: str | os.PathLike | None, progress: bool) -> Path:
    if name not in URLS:
        raise ValueError(f"load_pretrained: no published weights for {name!r}; expected one of {sorted(URLS)}")
    url = URLS[name]
    try:
        return hub.fetch(os.path.basename(url), [url], SHA256_PREFIX.get(name), cache=cache_dir if cache_dir is not None
                         else default_cache_dir(), progress=progress, hint="or pass path=...")
    except (RuntimeError, ValueError) as e:
        raise type(e)(f"load_pretrained({name!r}): {e}") from e


def load_pretrained(name: str = "videoclip_mugen", path: str | os.PathLike | None = None,
                    cache_dir: str | os.PathLike | None = None, *, spec: VideoCLIP | None = None,
                    progress: bool = True) -> Pretrained:
    """MUGEN's VideoCLIP weights (a TorchMultimodal ``CLIP`` state dict or its Lightning checkpoint).

    Args:
        name: ``"videoclip_mugen"``.
        path: a local checkpoint instead of the download.
        cache_dir: where downloads go (default :func:`default_cache_dir`).
        spec: the architecture (default :func:`~.videoclip_builders.videoclip`), checked against the file.
    """
    if name in ("s3d_kinetics400", "video_encoder"):
        raise ValueError(f"load_pretrained: {name!r} holds a video encoder only; use load_video_encoder({name!r})")
    spec = spec if spec is not None else videoclip()
    path = path if path is not None else _fetch(name, cache_dir, progress)
    params, state = from_torchmultimodal(hub.read_state_dict(path), spec)
    return Pretrained(spec, params, state)


def load_video_encoder(name: str = "s3d_kinetics400", path: str | os.PathLike | None = None,
                       cache_dir: str | os.PathLike | None = None, *, spec: S3D | None = None,
                       progress: bool = True) -> Pretrained:
    """Kinetics-400 S3D weights for VideoCLIP's video tower (``params["video"]["encoder"]``,
    ``state["video"]["encoder"]``); ``spec`` defaults to :func:`~polymodal.core.encoders.s3d.s3d`.
    A torchvision S3D state dict (no ``model.`` prefix; its classifier ignored) is read too."""
    spec = spec if spec is not None else s3d()
    path = path if path is not None else _fetch(name, cache_dir, progress)
    sd = hub.read_state_dict(path)
    prefix = "model." if any(k.startswith("model.") for k in sd) else ""
    params, state = s3d_table(prefix).to_ours(sd, spec, with_state=True)
    return Pretrained(spec, params, state)
