"""Token embedding lookup."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..pytree import Params
from ..spec import Spec, check_ids, check_sizes, take_params
from .init import initializer

__all__ = ["Embedding"]

_INT = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)


@dataclass(frozen=True)
class Embedding(Spec):
    """Lookup table ``weight (num_embeddings, embedding_dim)``: ids ``(*)`` -> ``(*, embedding_dim)``.

    >>> import torch
    >>> from polymodal.core import random as pr
    >>> e = Embedding(10, 4)
    >>> e(e.init(key=pr.key(0)), torch.tensor([[1, 2]])).shape
    torch.Size([1, 2, 4])
    """

    num_embeddings: int  # vocabulary size
    embedding_dim: int  # vector size
    padding_idx: int | None = None  # row initialised to zero and given no gradient (as torch.nn.Embedding)
    weight_init: str = "normal"  # torch's default N(0, 1); "trunc_normal" / "normal" with init_std for BERT-style
    init_std: float = 1.0  # std of the init

    def init(self, *, key: Tensor) -> Params:
        w = initializer(self.weight_init)(
            key, (self.num_embeddings, self.embedding_dim), std=self.init_std,
            fan_in=self.embedding_dim, fan_out=self.num_embeddings,
        )
        if self.padding_idx is not None:
            w[self.padding_idx] = 0.0
        return {"weight": w}

    def __post_init__(self) -> None:
        check_sizes(self, num_embeddings=self.num_embeddings, embedding_dim=self.embedding_dim)

    def __call__(self, params: Params, ids: Tensor) -> Tensor:
        """``ids (*)`` in ``[0, num_embeddings)`` -> ``(*, embedding_dim)``. Out-of-range ids raise a
        ``ValueError`` naming the range on CPU, outside ``torch.compile`` and ``torch.func``
        transforms (``core.spec.check_ids``: elsewhere it would cost a device sync per call)."""
        (w,) = take_params(params, self, weight=True)
        check_ids(ids, "ids", self.num_embeddings, self)  # dtype always, values eagerly on CPU
        return F.embedding(ids, w, padding_idx=self.padding_idx)
