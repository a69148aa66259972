"""The answer decoder's prediction head (TorchMultimodal ``examples/albef/model.py``'s ``PredictionHead``):
dense, GELU, LayerNorm, then an untied decoder to the vocabulary.

>>> import torch
>>> from polymodal.core import random as pr
>>> head = PredictionHead(hidden_size=8, vocab_size=20)
>>> head(head.init(key=pr.key(0)), torch.ones(2, 3, 8)).shape
torch.Size([2, 3, 20])
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ...core import random as pr
from ...core.layers.activation import activation as get_activation
from ...core.layers.linear import Linear
from ...core.layers.norm import LayerNorm
from ...core.pytree import Params
from ...core.spec import Spec, check_last_dim, check_sizes

__all__ = ["PredictionHead"]


@dataclass(frozen=True)
class PredictionHead(Spec):
    """``(..., D) -> (..., V)``. Params ``dense``, ``layer_norm``, ``decoder`` (TorchMultimodal's names)."""

    hidden_size: int  # D
    vocab_size: int  # V
    layer_norm_eps: float = 1e-12  # eps of the LayerNorm
    activation: str = "gelu"  # transform_act_fn

    def __post_init__(self) -> None:
        check_sizes(self, hidden_size=self.hidden_size, vocab_size=self.vocab_size)

    def dense(self) -> Linear:
        return Linear(self.hidden_size, self.hidden_size)

    def decoder(self) -> Linear:
        return Linear(self.hidden_size, self.vocab_size)

    def norm(self) -> LayerNorm:
        return LayerNorm(self.hidden_size, eps=self.layer_norm_eps)

    def init(self, *, key: Tensor) -> Params:
        kd, ko = pr.split(key, 2)
        return {"dense": self.dense().init(key=kd), "layer_norm": self.norm().init(key=key),
                "decoder": self.decoder().init(key=ko)}

    def __call__(self, params: Params, hidden: Tensor) -> Tensor:
        check_last_dim(hidden, "hidden", self.hidden_size, self)
        h = get_activation(self.activation)(self.dense()(params["dense"], hidden))
        return self.decoder()(params["decoder"], self.norm()(params["layer_norm"], h))
