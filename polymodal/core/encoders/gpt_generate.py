"""Autoregressive generation for :class:`MultimodalGPT`: greedy, temperature, top-k, top-p, from keys.

Every random draw comes from one ``uniform(key, (steps, B, vocab))`` (Gumbel-max sampling), so the same key gives
the same sample, with or without the KV cache, and under ``vmap`` each example can get its own key.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import random as pr
from ..pytree import Params
from . import gpt_decode
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
             top_p: float | None = None, use_cache: bool = True, compile: bool = False,
             progress: bool | None = False) -> Tensor:
    """Sample output-modality ids ``(B, max_new_tokens)`` conditioned on ``in_ids (B, L_in)``.

    With the KV cache (default) the keys and values go into one preallocated buffer, written in place
    (:mod:`.gpt_decode`), and each step computes the logits of the newest position over the output
    vocabulary only (the full pass masks the other modality's logits to the dtype's minimum: they are
    never sampled, so the distribution is the same). ``compile=True`` runs each step through one
    ``torch.compile``d graph (the first call compiles; same tokens up to float rounding in the
    attention). ``use_cache=False`` recomputes the full pass at every step (slower; equal results).
    ``progress``: a tqdm bar over the tokens (True), on a terminal only (None), or none (False).
    Runs without autograd.

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
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    with torch.no_grad():
        return _generate(model, params, in_ids, key, n, temperature, top_k, top_p, use_cache, compile,
                         _tokens(n, progress))


def _tokens(n: int, progress: bool | None):
    """``range(n)``, under a tqdm bar unless ``progress`` is False (None: shown on a terminal only)."""
    if progress is False:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc="generate", unit="token", leave=False, dynamic_ncols=True,
                disable=None if progress is None else False)


def _generate(model: MultimodalGPT, params: Params, in_ids: Tensor, key: Tensor | None, n: int, temperature: float,
              top_k: int | None, top_p: float | None, use_cache: bool, compile: bool, steps) -> Tensor:
    b, lo = in_ids.shape[0], model.num_in_tokens
    out = torch.zeros((b, n), dtype=torch.long, device=in_ids.device)
    greedy = key is None or temperature == 0.0
    gumbel = None
    if not greedy:  # all the noise in one draw over the joint vocabulary (as sample_logits), the output part kept
        u = pr.uniform(key, (n, b, model.vocab))[..., lo:]
        gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))
    filtered = top_k is not None or top_p is not None

    def draw(logits: Tensor, t: int) -> Tensor:  # logits (B, num_out_tokens) -> output ids (B,)
        if greedy:
            return logits.argmax(-1)
        logits = logits.float() if temperature == 1.0 else logits.float() / temperature
        if filtered:
            logits = filter_logits(logits, top_k, top_p)
        return (logits + gumbel[t]).argmax(-1)

    if not use_cache:
        for t in steps:
            out[:, t] = draw(model(params, in_ids, out[:, :t + 1]).logits[:, -1, lo:], t)
        return out
    if not gpt_decode.supports(model):  # the generic layer stack with a growing cache
        logits, cache = model.prefill(params, in_ids)
        pos_table = model.out_pos(params["out_pos"])
        for t in steps:
            out[:, t] = tok = draw(logits[:, lo:], t)
            if t + 1 < n:
                logits, cache = model.step(params, tok, t, cache, pos_table=pos_table)
        return out
    pl = gpt_decode.plan(model, params, rows=None if compile else b)  # the compiled step keeps dense weights
    logits, kv = gpt_decode.prefill(model, params, pl, in_ids, n)
    start = 1 + in_ids.shape[-1]
    step = gpt_decode.compiled_decode_step() if compile else None
    for t in steps:
        out[:, t] = tok = draw(logits, t)
        if t + 1 < n:
            if step is None:
                logits = gpt_decode.decode_step(pl, tok, t, kv, start)
            else:
                logits = step(pl, tok, torch.tensor(t, device=tok.device), kv, start)
    return out
