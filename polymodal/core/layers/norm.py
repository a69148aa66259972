"""Normalisation layers: LayerNorm (optionally computed in fp32), RMSNorm, GroupNorm.

BatchNorm, which carries running statistics as explicit state, lives in ``batchnorm.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..pytree import Params
from ..spec import Spec, check_floating, check_last_dim, check_ndim, check_param_dtype, check_sizes, take_params

__all__ = ["LayerNorm", "RMSNorm", "GroupNorm"]


@dataclass(frozen=True)
class LayerNorm(Spec):
    """Normalise the last axis: ``(*, dim) -> (*, dim)``; params ``weight``/``bias`` of ``(dim,)``.

    ``fp32=True`` computes in float32 and casts back (TorchMultimodal's ``Fp32LayerNorm``),
    which keeps bf16/fp16 training stable.
    """

    dim: int  # size of the normalised (last) axis
    eps: float = 1e-5  # added to the variance
    affine: bool = True  # learn weight and bias
    bias: bool = True  # learn the bias (when affine)
    fp32: bool = False  # compute in float32 whatever the input dtype

    def init(self, *, key: Tensor) -> Params:
        if not self.affine:
            return {}
        p = {"weight": torch.ones(self.dim)}
        if self.bias:
            p["bias"] = torch.zeros(self.dim)
        return p

    def __post_init__(self) -> None:
        check_sizes(self, dim=self.dim)

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        check_floating(x, "x", self)
        check_last_dim(x, "x", self.dim, self)
        w, b = take_params(params, self, weight=self.affine, bias=self.affine and self.bias)
        if self.fp32 and x.dtype != torch.float32:
            y = F.layer_norm(
                x.float(), (self.dim,), None if w is None else w.float(), None if b is None else b.float(), self.eps
            )
            return y.to(x.dtype)
        if w is not None and torch.finfo(x.dtype).bits > torch.finfo(w.dtype).bits:
            check_param_dtype(x, "x", w, self)  # wider input (float64 vs float32); 16-bit input is torch's mixed mode
        return F.layer_norm(x, (self.dim,), w, b, self.eps)


@dataclass(frozen=True)
class RMSNorm(Spec):
    """Root-mean-square norm over the last axis with a learned scale (no centring, no bias)."""

    dim: int  # size of the normalised (last) axis
    eps: float = 1e-6  # added to the mean square
    affine: bool = True  # learn the scale (False gives TorchMultimodal's SimpleRMSNorm-style)

    def init(self, *, key: Tensor) -> Params:
        return {"weight": torch.ones(self.dim)} if self.affine else {}

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        check_floating(x, "x", self)
        check_last_dim(x, "x", self.dim, self)
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return y * params["weight"] if self.affine else y


@dataclass(frozen=True)
class GroupNorm(Spec):
    """Group normalisation over channels ``(B, C, *)``; params ``weight``/``bias`` of ``(C,)``."""

    num_groups: int  # groups the channels are split into
    num_channels: int  # C
    eps: float = 1e-5  # added to the variance
    affine: bool = True  # learn per-channel weight and bias
    fp32: bool = False  # compute in float32 (TorchMultimodal's Fp32GroupNorm)

    def __post_init__(self) -> None:
        if self.num_channels % self.num_groups:
            raise ValueError(f"GroupNorm: num_channels ({self.num_channels}) must be divisible by num_groups ({self.num_groups})")

    def init(self, *, key: Tensor) -> Params:
        return {"weight": torch.ones(self.num_channels), "bias": torch.zeros(self.num_channels)} if self.affine else {}

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        check_floating(x, "x", self)
        check_ndim(x, "x", range(2, 6), f"(B, {self.num_channels}, *)", self)
        if x.shape[1] != self.num_channels:
            raise ValueError(f"GroupNorm: expected shape (B, {self.num_channels}, *), got {tuple(x.shape)}")
        w, b = params.get("weight"), params.get("bias")
        if self.fp32 and x.dtype != torch.float32:
            y = F.group_norm(x.float(), self.num_groups, None if w is None else w.float(), None if b is None else b.float(), self.eps)
            return y.to(x.dtype)
        return F.group_norm(x, self.num_groups, w, b, self.eps)
