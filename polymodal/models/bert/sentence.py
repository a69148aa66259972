"""Sentence embeddings: mean pooling over real tokens, then L2 normalisation (sentence-transformers'
recipe for all-MiniLM-L6-v2 and friends).

>>> import torch
>>> h = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [9.0, 9.0]]])
>>> mean_pool_normalize(h, torch.tensor([[1, 1, 0]]))  # (2, 2) / |(2, 2)|
tensor([[0.7071, 0.7071]])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core.layers.pooling import mean_pool
from ...core.pytree import Params

__all__ = ["mean_pool_normalize", "embed_texts"]


def mean_pool_normalize(hidden: Tensor, attention_mask: Tensor, normalize: bool = True) -> Tensor:
    """``hidden (B, T, D)``, ``attention_mask (B, T)`` (1 = real) -> ``(B, D)``: the mean of the real
    tokens' vectors, unit length when ``normalize``."""
    if tuple(attention_mask.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"mean_pool_normalize: attention_mask: expected shape {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(attention_mask.shape)}")
    pooled = mean_pool(hidden, attention_mask.bool())
    return F.normalize(pooled, dim=-1) if normalize else pooled


@torch.no_grad()
def embed_texts(spec, params: Params, tokenizer, texts: Sequence[str], *, batch_size: int = 32,
                normalize: bool = True) -> Tensor:
    """``(N, D)`` embeddings of ``texts`` with an encoder spec, its params and its tokenizer."""
    out = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[i:i + batch_size]))
        mask = batch["attention_mask"]
        h = spec(params, batch["input_ids"], mask, batch.get("token_type_ids")).last_hidden_state
        out.append(mean_pool_normalize(h, mask, normalize))
    if not out:
        return torch.zeros(0, spec.hidden_size)
    return torch.cat(out)
