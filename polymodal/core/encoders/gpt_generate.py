"""Autoregressive generation for :class:`MultimodalGPT`: greedy, temperature, top-k, top-p, from keys.

Every random draw comes from one ``uniform(key, (steps, B, vocab))`` (Gumbel-max sampling), so the same key gives
the same sample, with or without the KV cache, and under ``vmap`` each example can get its own key.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import random as pr
from ..pytree import Params
from .gpt import MultimodalGPT

__all__ = ["sample_logits", "filter_logits", "generate"]


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set logits outside the top-k and/or the top-p nucleus to ``-inf`` (last axis)."""
    neg = torch.finfo(logits.dtype).min
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, neg)
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, neg)
    return logits


def sample_logits(logits: Tensor, *, key: Tensor | None, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, uniform: Tensor | None = None) -> Tensor:
    """One token id per row of ``logits (..., V)``: greedy when ``key`` is None or temperature is 0.
    ``uniform``: the U(0, 1) draws of the Gumbel noise, shaped like ``logits`` (default: from ``key``)."""
    if key is None or temperature == 0.0:
        return logits.argmax(-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    u = (pr.uniform(key, logits.shape) if uniform is None else uniform).clamp(1e-20, 1.0 - 1e-7)
    return (logits - torch.log(-torch.log(u))).argmax(-1)


def generate(model: MultimodalGPT, params: Params, in_ids: Tensor, *, key: Tensor | None = None,
             max_new_tokens: int | None = None, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, use_cache: bool = True) -> Tensor:
    """Sample output-modality ids ``(B, max_new_tokens)`` conditioned on ``in_ids (B, L_in)``.

    ``use_cache=False`` recomputes the full pass at every step (slower; equal results).

    >>> from polymodal.core import random as pr
    >>> from polymodal.core.encoders.gpt import multimodal_gpt
    >>> gpt = multimodal_gpt(10, 6, (3,), (4,), d_model=16, num_heads=2, num_layers=1)
    >>> p = gpt.init(key=pr.key(0))
    >>> generate(gpt, p, torch.zeros(2, 3, dtype=torch.long), key=pr.key(1), top_k=3).shape
    torch.Size([2, 4])
    """
    n = model.out_len if max_new_tokens is None else max_new_tokens
    if n > model.out_len:
        raise ValueError(f"max_new_tokens ({n}) exceeds the output modality's length {model.out_len}")
    out = in_ids.new_zeros((in_ids.shape[0], 0))
    # all the sampling noise in one draw (one key per call, not per step: cheaper; equal with and without cache)
    noise = None if key is None else pr.uniform(key, (n, in_ids.shape[0], model.vocab))
    draw = lambda logits, t: sample_logits(  # noqa: E731
        logits, key=key, temperature=temperature, top_k=top_k, top_p=top_p,
        uniform=None if noise is None else noise[t])
    if use_cache:
        logits, cache = model.prefill(params, in_ids)
        pos_table = model.out_pos(params["out_pos"])  # once, not at every step
    for t in range(n):
        if not use_cache:
            full = model(params, in_ids, torch.cat([out, out.new_zeros((out.shape[0], 1))], 1)).logits
            logits = full[:, -1]
        tok = draw(logits, t) - model.num_in_tokens
        out = torch.cat([out, tok[:, None]], dim=1)
        if use_cache and t + 1 < n:
            logits, cache = model.step(params, tok, t, cache, pos_table=pos_table)
    return out
