"""Omnivore (Girdhar et al. 2022): one Swin3D model for images, videos and RGB-D.

* spec :class:`Omnivore` (``model.py``) over the core Swin3D encoder with an RGB-D patch
  embedding (``patch_embed.py``); ``spec(params, x, input_type)`` with ``input_type`` in
  ``"image"`` / ``"video"`` / ``"rgbd"``; builders ``omnivore_swin_t/s/b`` (parameter counts equal
  TorchMultimodal's) and ``omnivore_tiny``;
* checkpoints: :func:`from_torchmultimodal` / :func:`to_torchmultimodal`; :func:`load_pretrained`
  downloads the published weights through ``polymodal.hub``;
* shells: ``polymodal.nn.build("omnivore_swin_t")`` or ``polymodal.nn.Omnivore``.

>>> from polymodal.core import random as pr
>>> sorted(build("omnivore_tiny").init(key=pr.key(0)))
['encoder', 'heads']
"""

from .builders import BUILDERS, build, omnivore, omnivore_encoder, omnivore_swin_b, omnivore_swin_s, omnivore_swin_t, omnivore_tiny
from .convert import from_torchmultimodal, infer_spec, merge_published, to_torchmultimodal
from .model import MODALITIES, Omnivore, OmnivoreHead, OmnivoreOutput
from .patch_embed import RGBDPatchEmbed3d
from .pretrained import URLS, Pretrained, load_pretrained

__all__ = [
    "BUILDERS", "build", "omnivore", "omnivore_encoder", "omnivore_swin_t", "omnivore_swin_s", "omnivore_swin_b",
    "omnivore_tiny", "from_torchmultimodal", "to_torchmultimodal", "infer_spec", "merge_published", "MODALITIES",
    "Omnivore", "OmnivoreHead", "OmnivoreOutput", "RGBDPatchEmbed3d", "URLS", "Pretrained", "load_pretrained",
]

from ...registry import register_family  # noqa: E402


def _load_pretrained(name, path=None, cache_dir=None, **kw):
    """``polymodal.nn`` shells' loader: ``path`` is one whole state dict, else the published files."""
    pre = load_pretrained(name, path=path, cache_dir=cache_dir)
    return pre.spec, pre.params, None


register_family(
    "omnivore",
    builders=BUILDERS,
    presets={"tiny": "omnivore_tiny", "swin-t": "omnivore_swin_t"},
    task="polymodal.models.omnivore.task:OmnivoreTask",
    description="one Swin3D model for images, videos and RGB-D (Girdhar et al. 2022)",
    extra={"build": build, "load_pretrained": _load_pretrained, "from_torchmultimodal": from_torchmultimodal, "to_torchmultimodal": to_torchmultimodal},
)
