"""TorchMultimodal's published ALBEF checkpoints (``examples/albef/model.py``'s ``_ALBEF_PRETRAINED_URLS``),
downloaded and cached by :func:`polymodal.hub.fetch` and read as ``(spec, params, state)``.

* ``retrieval``: ``<base>/pretrained_retrieval_checkpoint.pt``, architecture ``albef_retrieval(mlm=False)``;
* ``vqa``: ``<base>/pretrained_vqa_checkpoint.pt``, architecture ``albef_vqa()``;

with ``<base>`` = ``https://download.pytorch.org/models/multimodal/albef``.

The reference publishes no digest for these files and this project could not download them to
compute one (no network where it was written), so :data:`SHA256` is empty: the download is then
unverified and the hub says so. Pass ``sha256=`` (or fill :data:`SHA256`) to pin a file. The files are
``torch.save`` state dicts, read with ``weights_only=True`` (:func:`polymodal.hub.read_state_dict`), and
converted by :func:`.convert.from_torchmultimodal` (momentum copies and queues become the state).

>>> sorted(PRETRAINED_URLS)
['retrieval', 'vqa']
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

from ... import hub
from ...core.pytree import Params
from .builders import albef_retrieval, albef_vqa
from .convert import from_torchmultimodal

__all__ = ["PRETRAINED_URLS", "SHA256", "Pretrained", "load_pretrained"]

_BASE = "https://download.pytorch.org/models/multimodal/albef"
PRETRAINED_URLS = {"retrieval": f"{_BASE}/pretrained_retrieval_checkpoint.pt",
                   "vqa": f"{_BASE}/pretrained_vqa_checkpoint.pt"}
SHA256: dict[str, str | None] = {"retrieval": None, "vqa": None}  # unknown: see the module docstring
_SPECS = {"retrieval": lambda: albef_retrieval(mlm=False), "vqa": albef_vqa}
_ALIASES = {"albef_retrieval": "retrieval", "albef_vqa": "vqa"}


class Pretrained(NamedTuple):
    """``spec``, ``params`` and ``state`` (momentum copies; queues for retrieval)."""

    spec: Any
    params: Params
    state: Params


def load_pretrained(name: str, path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None, *,
                    sha256: str | None = None, progress: bool = True) -> Pretrained:
    """Load ``"retrieval"`` or ``"vqa"`` (or ``"albef_retrieval"`` / ``"albef_vqa"``): from ``path`` if given,
    else the hub cache (``cache_dir`` or ``<hub cache>/albef``), downloading from ``$POLYMODAL_HUB_MIRROR``
    then the published URL when missing."""
    key = _ALIASES.get(name, name)
    if key not in PRETRAINED_URLS:
        raise ValueError(f"albef.load_pretrained: unknown checkpoint {name!r}; expected one of "
                         f"{sorted(PRETRAINED_URLS)}")
    if path is None:
        url = PRETRAINED_URLS[key]
        path = hub.fetch(url.rsplit("/", 1)[1] if cache_dir is not None else f"albef/{url.rsplit('/', 1)[1]}", url,
                         sha256 or SHA256[key], cache=cache_dir, progress=progress,
                         hint="TorchMultimodal's ALBEF checkpoints are on download.pytorch.org")
    spec = _SPECS[key]()
    params, state = from_torchmultimodal(hub.read_state_dict(path), spec)
    return Pretrained(spec, params, state)


def shell_loader(name: str, path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                 **kw: Any) -> tuple[Any, Params, None]:
    """``polymodal.nn`` shells' loader: the params (the momentum state stays with :func:`load_pretrained`)."""
    pre = load_pretrained(name, path, cache_dir)
    return pre.spec, pre.params, None
