"""Heads on a BERT encoder: the masked-LM head (tied decoder) and the sequence-classification head.

>>> import torch
>>> from polymodal.core import random as pr
>>> head = MaskedLMHead(hidden_size=8, vocab_size=20)
>>> head(head.init(key=pr.key(0)), torch.ones(2, 3, 8), torch.ones(20, 8)).shape
torch.Size([2, 3, 20])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import random as pr
from ..layers.activation import activation as get_activation
from ..layers.dropout import dropout as apply_dropout
from ..layers.linear import Linear
from ..layers.norm import LayerNorm
from ..pytree import Params
from ..spec import Spec, check_last_dim, check_sizes

__all__ = ["MaskedLMHead", "SequenceClassificationHead"]


@dataclass(frozen=True)
class MaskedLMHead(Spec):
    """``hidden (..., D), word_embeddings (V, D) -> logits (..., V)``: dense, activation, LayerNorm,
    then the decoder tied to the word embeddings plus a bias (``BertForMaskedLM``'s ``cls.predictions``).

    Params ``transform: {dense: {weight (D, D), bias}, LayerNorm: {weight, bias}}``, ``bias (V,)``;
    the decoder weight is the encoder's ``embeddings.word_embeddings.weight`` passed at call time.
    """

    hidden_size: int  # D
    vocab_size: int  # V
    activation: str = "gelu"  # BERT's hidden_act
    layer_norm_eps: float = 1e-12  # eps of the LayerNorm
    init_std: float = 0.02  # N(0, std) init of the dense layer

    def __post_init__(self) -> None:
        check_sizes(self, hidden_size=self.hidden_size, vocab_size=self.vocab_size)

    def dense(self) -> Linear:
        return Linear(self.hidden_size, self.hidden_size, weight_init="normal", init_std=self.init_std)

    def norm(self) -> LayerNorm:
        return LayerNorm(self.hidden_size, eps=self.layer_norm_eps)

    def init(self, *, key: Tensor) -> Params:
        return {"transform": {"dense": self.dense().init(key=key), "LayerNorm": self.norm().init(key=key)},
                "bias": torch.zeros(self.vocab_size)}

    def __call__(self, params: Params, hidden: Tensor, word_embeddings: Tensor) -> Tensor:
        check_last_dim(hidden, "hidden", self.hidden_size, self)
        if tuple(word_embeddings.shape) != (self.vocab_size, self.hidden_size):
            raise ValueError(f"MaskedLMHead: word_embeddings: expected shape ({self.vocab_size}, {self.hidden_size}), "
                             f"got {tuple(word_embeddings.shape)}")
        t = params["transform"]
        h = self.norm()(t["LayerNorm"], get_activation(self.activation)(self.dense()(t["dense"], hidden)))
        return F.linear(h, word_embeddings, params["bias"])


@dataclass(frozen=True)
class SequenceClassificationHead(Spec):
    """``pooled (..., D) -> logits (..., num_labels)``: dropout then a linear layer
    (``BertForSequenceClassification``'s ``classifier``: params ``{weight (num_labels, D), bias}``)."""

    hidden_size: int  # D
    num_labels: int  # classes
    dropout: float = 0.0  # dropout on the pooled vector (with a call key)
    init_std: float = 0.02  # N(0, std) init

    def linear(self) -> Linear:
        return Linear(self.hidden_size, self.num_labels, weight_init="normal", init_std=self.init_std)

    def init(self, *, key: Tensor) -> Params:
        return self.linear().init(key=key)

    def __call__(self, params: Params, pooled: Tensor, *, key: Tensor | None = None) -> Tensor:
        return self.linear()(params, apply_dropout(pooled, self.dropout, key=key))
