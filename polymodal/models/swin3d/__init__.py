"""Swin3D (Video Swin Transformer): the encoder spec and builders from ``polymodal.core.encoders.swin3d``
plus torchvision checkpoint conversion (:mod:`.convert`).

>>> from polymodal.models.swin3d import swin3d_t
>>> swin3d_t().num_features
768
"""

from ...core.encoders.swin3d import Swin3D, Swin3DOutput, swin3d, swin3d_b, swin3d_s, swin3d_t
from .convert import from_torchvision, infer_spec, to_torchvision

__all__ = ["Swin3D", "Swin3DOutput", "swin3d", "swin3d_t", "swin3d_s", "swin3d_b", "from_torchvision", "to_torchvision", "infer_spec"]

from ...registry import register_family  # noqa: E402

register_family("swin3d", builders={"swin3d_t": swin3d_t, "swin3d_s": swin3d_s, "swin3d_b": swin3d_b},
                description="Video Swin Transformer encoders (Liu et al. 2022)")
