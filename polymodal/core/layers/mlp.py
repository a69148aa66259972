"""Multi-layer perceptron."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .. import random as pr
from ..pytree import Params
from ..spec import Spec, check_sizes
from .activation import activation
from .dropout import dropout
from .linear import Linear
from .norm import LayerNorm

__all__ = ["MLP"]


@dataclass(frozen=True)
class MLP(Spec):
    """``Linear -> [norm] -> act -> dropout`` per hidden size, then a final ``Linear``.

    Params: ``layers`` is a list of ``{"weight", "bias"}`` (one per Linear); with
    ``norm="layer_norm"`` a parallel list ``norms``. ``activation="geglu"`` doubles each
    hidden projection and gates it. ``(*, in_dim) -> (*, out_dim)``.

    >>> import torch
    >>> from polymodal.core import random as pr
    >>> m = MLP(4, 2, hidden_dims=(8,), activation="gelu", dropout=0.0)
    >>> m(m.init(key=pr.key(0)), torch.ones(3, 4)).shape
    torch.Size([3, 2])
    """

    in_dim: int  # input features
    out_dim: int  # output features
    hidden_dims: tuple[int, ...] = ()  # sizes of the hidden layers (int or tuple)
    activation: str = "relu"  # name from core.layers.activation.ACTIVATIONS
    dropout: float = 0.0  # dropout after each hidden activation (TorchMultimodal defaults 0.5)
    norm: str | None = None  # None or "layer_norm" after each hidden Linear
    bias: bool = True  # biases in the Linears
    weight_init: str = "torch"  # init of every Linear (see Linear)
    init_std: float = 0.02  # std for normal-family inits

    def __post_init__(self) -> None:
        if isinstance(self.hidden_dims, int):
            object.__setattr__(self, "hidden_dims", (self.hidden_dims,))
        else:
            object.__setattr__(self, "hidden_dims", tuple(self.hidden_dims))
        check_sizes(self, in_dim=self.in_dim, out_dim=self.out_dim,
                    **{f"hidden_dims[{i}]": d for i, d in enumerate(self.hidden_dims)})

    def _linears(self) -> list[Linear]:
        gate = 2 if self.activation == "geglu" else 1
        dims = (self.in_dim,) + self.hidden_dims
        lins = [
            Linear(dims[i], self.hidden_dims[i] * gate, self.bias, self.weight_init, self.init_std)
            for i in range(len(self.hidden_dims))
        ]
        return lins + [Linear(dims[-1], self.out_dim, self.bias, self.weight_init, self.init_std)]

    def _norms(self) -> list[LayerNorm]:
        if self.norm is None:
            return []
        if self.norm != "layer_norm":
            raise ValueError(f"MLP: unknown norm {self.norm!r}; expected None or 'layer_norm'")
        gate = 2 if self.activation == "geglu" else 1
        return [LayerNorm(h * gate) for h in self.hidden_dims]

    def init(self, *, key: Tensor) -> Params:
        lins = self._linears()
        keys = pr.split(key, len(lins))
        p: Params = {"layers": [lin.init(key=k) for lin, k in zip(lins, keys)]}
        if self.norm is not None:
            p["norms"] = [n.init(key=key) for n in self._norms()]
        return p

    def __call__(self, params: Params, x: Tensor, *, key: Tensor | None = None) -> Tensor:
        lins, norms = self._linears(), self._norms()
        act = activation(self.activation)
        keys = pr.maybe_split(key, len(lins))
        for i, lin in enumerate(lins[:-1]):
            if not norms:  # the activation fused into the GEMM on oneDNN where it can be
                x = lin(params["layers"][i], x, activation=self.activation)
            else:
                x = act(norms[i](params["norms"][i], lin(params["layers"][i], x)))
            x = dropout(x, self.dropout, key=keys[i])
        return lins[-1](params["layers"][-1], x)
