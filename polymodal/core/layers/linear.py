"""Linear (affine) layer and identity."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .. import random as pr
from ..pytree import Params
from ..spec import Spec, check_floating, check_last_dim, check_param_dtype, check_sizes, take_params
from .init import initializer
from .linear_kernel import linear

__all__ = ["Linear", "Identity"]


@dataclass(frozen=True)
class Linear(Spec):
    """``y = x @ weight.T + bias`` over the last axis; params ``weight (out, in)``, ``bias (out,)``.

    Works on any leading shape ``(*, in_features) -> (*, out_features)``; batch it with vmap.

    >>> import torch
    >>> from polymodal.core import random as pr
    >>> lin = Linear(3, 2)
    >>> p = lin.init(key=pr.key(0))
    >>> lin(p, torch.ones(5, 3)).shape
    torch.Size([5, 2])
    """

    in_features: int  # size of the input's last axis
    out_features: int  # size of the output's last axis
    bias: bool = True  # learn an additive bias
    weight_init: str = "torch"  # "torch" (U(+-1/sqrt(in)), bias too), "trunc_normal", "normal", "xavier_uniform", "zeros"
    init_std: float = 0.02  # std of the normal-family weight inits (their bias starts at zero)

    def init(self, *, key: Tensor) -> Params:
        kw, kb = pr.split(key)
        shape = (self.out_features, self.in_features)
        fans = dict(fan_in=self.in_features, fan_out=self.out_features, std=self.init_std)
        params = {"weight": initializer(self.weight_init)(kw, shape, **fans)}
        if self.bias:
            if self.weight_init == "torch":
                params["bias"] = initializer("torch")(kb, (self.out_features,), **fans)
            else:
                params["bias"] = initializer("zeros")(kb, (self.out_features,))
        return params

    def __post_init__(self) -> None:
        check_sizes(self, in_features=self.in_features, out_features=self.out_features)

    def __call__(self, params: Params, x: Tensor, *, activation: str | None = None) -> Tensor:
        """``x (*, in_features) -> (*, out_features)``; ``activation`` (a name of
        :data:`~.activation.ACTIVATIONS`) is applied to the output, fused into the GEMM where
        :func:`~.linear_kernel.linear` runs on oneDNN (CPU inference) and oneDNN has it."""
        w, b = take_params(params, self, weight=True, bias=self.bias)
        check_floating(x, "x", self)
        check_last_dim(x, "x", self.in_features, self)
        check_param_dtype(x, "x", w, self)
        return linear(x, w, b, activation)


@dataclass(frozen=True)
class Identity(Spec):
    """Returns its input; no parameters (a placeholder where a layer is optional)."""

    def init(self, *, key: Tensor) -> Params:
        return {}

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        return x
