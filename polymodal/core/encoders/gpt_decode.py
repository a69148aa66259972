"""Fast single-token decoding for :class:`~.gpt.MultimodalGPT`: a preallocated KV cache written in place.

:meth:`MultimodalGPT.step` grows its cache with ``torch.cat`` at every step (a copy of every layer's
keys and values per token: quadratic in the output length) and runs the generic layer stack (checks,
masks and per-layer spec objects rebuilt per call). Generation instead

* allocates one buffer per layer ``kv[i] (2, B, H, S, Dh)`` for the whole sequence
  (``S = 1 + in_len + out_len - 1``: start token, prompt, every output token but the last), fills it
  from the prompt's pass (:func:`prefill`), and writes each new token's keys and values into it by
  index (:func:`decode_step`): no copy of the earlier positions;
* computes logits only for the newest position and only over the output modality's rows of
  ``to_logit`` (the joint vocabulary's other rows are masked to the dtype's minimum in the full pass
  and can never be sampled, so the sampled distribution is the same);
* reads the weights once into a flat :class:`DecodePlan` (no pytree walks or spec checks per step).

:func:`decode_step` attends over the filled prefix (a view, eager); :func:`decode_step_masked` attends
over the whole buffer with a position mask, so every step has the same shapes and ``torch.compile``
makes one graph for all of them (:func:`compiled_decode_step`).

The buffers are the one exception to the core's "state is returned, never mutated" rule, on
purpose (returning a new buffer per step is the copy this module removes): :func:`prefill` allocates
them, the steps write into them, and :func:`~.gpt_generate.generate` never lets them escape.

Supported stacks: pre-norm decoder layers without cross-attention and with fused q/k/v (every
:func:`~.gpt.multimodal_gpt`); :func:`supports` says whether a model qualifies (else generation falls
back to :meth:`MultimodalGPT.step`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layers import LayerNorm
from ..layers import linear_kernel as lk
from ..layers.activation import QUICK_GELU_SCALE
from ..pytree import Params
from .gpt import MultimodalGPT

__all__ = ["DecodePlan", "supports", "plan", "prefill", "decode_step", "decode_step_masked", "compiled_decode_step"]


class DecodePlan(NamedTuple):
    """Everything a decoding step reads, flat. ``layers``: per layer ``(norm1 w, b, in_proj w, b,
    out_proj w, b, norm2 w, b, linear1 w, b, linear2 w, b)`` (None where a bias is absent)."""

    layers: tuple
    norm: tuple  # final LayerNorm (w, b)
    logit_weight: Tensor  # (num_out_tokens, d_model): the output modality's rows of to_logit
    out_table: Tensor  # (num_out_tokens, out_dim) token embeddings of the output modality
    out_proj: tuple | None  # (w, b) of the output token projection, or None
    pos_table: Tensor  # (out_len, d_model) output position embeddings
    num_heads: int
    eps: float  # the blocks' LayerNorm eps
    activation: str
    final_eps: float  # the final LayerNorm's eps
    mlp_scale: float = 1.0  # the MLP's output is multiplied by this (1 / 1.702 where quick_gelu was folded)


def supports(model: MultimodalGPT) -> bool:
    """Whether :func:`plan` handles this model's decoder (else use :meth:`MultimodalGPT.step`)."""
    dec = model.decoder
    layer = dec.layer
    attn = layer.self_attn()
    return (layer.norm_first and dec.cross_attention_every == 0 and not dec.final_norm and attn.fused
            and not layer.fp32_norm and layer.activation != "geglu")


def _ln(p: Params) -> tuple:
    return p.get("weight"), p.get("bias")


def plan(model: MultimodalGPT, params: Params, rows: int | None = None) -> DecodePlan:
    """Read the weights a decoding step needs once (views of the matrices; MUGEN's quick_gelu fold scales a few
    vectors, :func:`_fold_quick_gelu`). ``rows``: the batch size the steps will run, to pack every matrix (the
    blocks', the logits' and the output tokens' projection) for oneDNN's GEMV once
    (:func:`~..layers.linear_kernel.pack`: CPU float32; on the fast path a step then reads each weight at about
    twice the rate); None keeps them dense."""
    if not supports(model):
        raise ValueError("gpt_decode.plan: expected pre-norm decoder layers without cross-attention, with fused q/k/v "
                         "and plain LayerNorms (see gpt_decode.supports)")
    layers = []
    for p in params["decoder"]["layers"]:
        a = p["self_attn"]
        layers.append((*_ln(p["norm1"]), a["in_proj_weight"], a.get("in_proj_bias"), a["out_proj"]["weight"],
                       a["out_proj"].get("bias"), *_ln(p["norm2"]), p["linear1"]["weight"], p["linear1"].get("bias"),
                       p["linear2"]["weight"], p["linear2"].get("bias")))
    proj = None if model.out_proj is None else (params["out_proj"]["weight"], params["out_proj"].get("bias"))
    logit_weight = params["to_logit"]["weight"][model.num_in_tokens:]
    layer = model.decoder.layer
    act, mlp_scale = layer.activation, 1.0
    if rows is not None:  # the matrices: in_proj, out_proj, linear1, linear2 of every layer, and the logits
        layers = [tuple(lk.pack(t, rows) if i in (2, 4, 8, 10) else t for i, t in enumerate(w)) for w in layers]
        if act == "quick_gelu":  # silu: fused into oneDNN's linear1 where that runs, else one op against three
            layers, act, mlp_scale = [_fold_quick_gelu(w, model.d_model) for w in layers], "silu", 1 / QUICK_GELU_SCALE
        logit_weight = lk.pack(logit_weight, rows)
        if proj is not None:  # the output tokens' projection into the model (MUGEN: 256 -> 768)
            proj = (lk.pack(proj[0], rows), proj[1])
    return DecodePlan(tuple(layers), _ln(params["norm"]), logit_weight, params["out_embed"]["weight"], proj,
                      model.out_pos(params["out_pos"]), layer.num_heads, layer.layer_norm_eps, act,
                      LayerNorm(model.d_model).eps, mlp_scale)


def _fold_quick_gelu(w: tuple, d: int) -> tuple:
    """``quick_gelu(y) = y sigmoid(c y) = silu(c y) / c`` (``c = 1.702``), and oneDNN fuses silu into the GEMM (it
    has no post-op for quick_gelu). ``c y`` comes from scaling the vectors before ``linear1``: ``norm2``'s weight
    and bias and ``linear1``'s bias, so ``linear1`` gives ``c y``. ``linear2``'s bias is scaled by ``c`` too,
    and the MLP's output by ``1 / c`` (``DecodePlan.mlp_scale``). The matrices are not copied; the model's
    tensors are untouched."""
    n1w, n1b, wqkv, bqkv, wo, bo, n2w, n2b, w1, b1, w2, b2 = w
    c = QUICK_GELU_SCALE
    dense = w1.weight if isinstance(w1, lk.Packed) else w1
    n2w = torch.full((d,), c, dtype=dense.dtype, device=dense.device) if n2w is None else n2w * c
    scaled = [None if t is None else t * c for t in (n2b, b1, b2)]
    return (n1w, n1b, wqkv, bqkv, wo, bo, n2w, scaled[0], w1, scaled[1], w2, scaled[2])


def _logits(pl: DecodePlan, h: Tensor) -> Tensor:
    """``(B, D) -> (B, num_out_tokens)``: final norm and the output modality's logits."""
    return lk.linear(F.layer_norm(h, h.shape[-1:], *pl.norm, pl.final_eps), pl.logit_weight)


def prefill(model: MultimodalGPT, params: Params, pl: DecodePlan, in_ids: Tensor,
            out_len: int) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Run ``[sos, in tokens]`` once: the output-vocabulary logits of the first output token
    ``(B, num_out_tokens)`` and the per-layer KV buffers ``(2, B, H, 1 + L_in + out_len - 1, Dh)``
    with the prompt's keys and values in their first ``1 + L_in`` positions (the rest zero).

    The blocks run on the plan's weights (packed where :func:`plan` packed them) and write their keys
    and values straight into the buffers; the last block carries only the final position past its
    attention, the one output the first token's logits read.

    Rows with the same prompt (several samples of one caption, as ``polymodal generate --num-samples`` and
    reranking pipelines draw them) run once: the blocks see the distinct prompts only, and each row gets
    its prompt's logits and keys and values."""
    distinct, rows = _distinct_prompts(in_ids)
    if distinct is not None:
        logits, kv = prefill(model, params, pl, distinct, out_len)
        return logits[rows], tuple(buf[:, rows] for buf in kv)
    x = torch.cat([params["sos"].expand(in_ids.shape[0], 1, model.d_model), model.embed(params, in_ids, "in")], 1)
    b, s0, d = x.shape
    kv = []
    for i, w in enumerate(pl.layers):
        buf = x.new_zeros((2, b, pl.num_heads, s0 + max(out_len - 1, 0), d // pl.num_heads))
        x = _prefill_layer(pl, w, x, buf, last=i == len(pl.layers) - 1)
        kv.append(buf)
    return _logits(pl, x[:, -1]), tuple(kv)


def _distinct_prompts(in_ids: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """``(distinct rows, each row's index among them)`` of ``in_ids (B, L)`` where some rows repeat, else
    ``(None, None)`` (and always under a ``torch.func`` transform, where the count would be data-dependent)."""
    if in_ids.shape[0] < 2 or lk._transforms_active():
        return None, None
    distinct, rows = torch.unique(in_ids, dim=0, return_inverse=True)
    return (None, None) if distinct.shape[0] == in_ids.shape[0] else (distinct, rows)


def _prefill_layer(pl: DecodePlan, w: tuple, x: Tensor, kv: Tensor, last: bool) -> Tensor:
    """One pre-norm block over the prompt ``x (B, L, D)`` (causal); writes its keys and values into
    ``kv[:, :, :, :L]``. ``last``: only the final position goes on past the attention -> ``(B, 1, D)``."""
    n1w, n1b, wqkv, bqkv, wo, bo, *_ = w
    b, n, d = x.shape
    hd = pl.num_heads
    qkv = lk.linear(F.layer_norm(x, (d,), n1w, n1b, pl.eps), wqkv, bqkv).view(b, n, 3, hd, d // hd)
    qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, H, L, Dh)
    kv[:, :, :, :n] = qkv[1:]
    q = qkv[0]
    if last:  # the final position sees every key: no mask
        q, x = q[:, :, -1:], x[:, -1:]
    y = F.scaled_dot_product_attention(q, kv[0, :, :, :n], kv[1, :, :, :n], is_causal=not last)
    return _mlp(pl, w, x + lk.linear(y.transpose(1, 2).reshape(b, -1, d), wo, bo))


def _mlp(pl: DecodePlan, w: tuple, x: Tensor) -> Tensor:
    """``x + MLP(norm2(x))`` of block ``w`` (the MLP's output scaled by ``pl.mlp_scale``)."""
    *_, n2w, n2b, w1, b1, w2, b2 = w
    h = lk.linear(lk.linear(F.layer_norm(x, x.shape[-1:], n2w, n2b, pl.eps), w1, b1, pl.activation), w2, b2)
    return x + h if pl.mlp_scale == 1.0 else torch.add(x, h, alpha=pl.mlp_scale)


def _embed(pl: DecodePlan, tok: Tensor, pos: Tensor | int) -> Tensor:
    x = F.embedding(tok, pl.out_table)
    if pl.out_proj is not None:
        x = lk.linear(x, *pl.out_proj)
    return x + pl.pos_table[pos]


def _layer(pl: DecodePlan, w: tuple, x: Tensor, kv: Tensor, write: int | Tensor, attend) -> Tensor:
    """One pre-norm block on ``x (B, D)``; writes this token's keys/values into ``kv (2, B, H, S, Dh)``."""
    n1w, n1b, wqkv, bqkv, wo, bo, *_ = w
    b, d = x.shape
    hd = pl.num_heads
    qkv = lk.linear(F.layer_norm(x, (d,), n1w, n1b, pl.eps), wqkv, bqkv).view(b, 3, hd, 1, d // hd)
    if isinstance(write, int):
        kv[:, :, :, write:write + 1].copy_(qkv[:, 1:].transpose(0, 1))
    else:  # index_put_ on the graph's input buffer: torch.compile keeps it in place
        kv[:, :, :, write.reshape(1)] = qkv[:, 1:].transpose(0, 1)
    y = attend(qkv[:, 0], kv[0], kv[1]).reshape(b, d)
    return _mlp(pl, w, x + lk.linear(y, wo, bo))


# CPU decoding attention over the cache as two matrix-vector products (``_gemv_attention``) where it beats SDPA's
# CPU kernel, per benchmarks/results/cpu_kernels.md: wide heads (Dh >= 96) and a cache of 2^18 to 2^20
# elements per layer (1-4 MB: MUGEN's GPT at batch 4, 1.1-1.5x); SDPA elsewhere (narrow heads, small or large caches).
GEMV_ATTENTION_MIN_HEAD_DIM = 96
GEMV_ATTENTION_ELEMENTS = (1 << 18, 1 << 20)


def _gemv_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``softmax(q k^T / sqrt(Dh)) v`` for one query per head, ``q (B, H, 1, Dh)``, ``k``, ``v (B, H, n, Dh)`` ->
    ``(B, H, 1, Dh)``: the scores as a matrix-vector product over ``k``'s rows, the values as a weighted sum of
    ``v``'s rows. Each reads its cache once, row by row."""
    scores = (k @ (q * q.shape[-1] ** -0.5).transpose(-1, -2)).squeeze(-1)  # (B, H, n)
    return (scores.softmax(-1).unsqueeze(-1) * v).sum(-2, keepdim=True)


def _single_query_attention(kv: Tensor, n: int):
    """The attention a decoding step runs over the first ``n`` positions of caches shaped like ``kv (2, B, H, S,
    Dh)``: :func:`_gemv_attention` on CPU where it is the faster (see ``GEMV_ATTENTION_*``), SDPA elsewhere.
    Returns ``attend(q, k, v)`` over the whole buffers ``k``, ``v (B, H, S, Dh)``; chosen once per step."""
    _, b, h, _, dh = kv.shape
    lo, hi = GEMV_ATTENTION_ELEMENTS
    gemv = kv.device.type == "cpu" and dh >= GEMV_ATTENTION_MIN_HEAD_DIM and lo <= b * h * n * dh <= hi
    fn = _gemv_attention if gemv else F.scaled_dot_product_attention
    return lambda q, k, v: fn(q, k[:, :, :n], v[:, :, :n])


def decode_step(pl: DecodePlan, tok: Tensor, t: int, kv: tuple[Tensor, ...], start: int) -> Tensor:
    """Feed output token ``tok (B,)`` at output position ``t``; its keys/values go to buffer position
    ``start + t`` (``start = 1 + L_in``) of each layer's ``kv`` (written in place; the buffers are the decoding
    loop's own). Returns the next output token's logits ``(B, num_out_tokens)``. Attends over the
    filled prefix ``kv[..., :start + t + 1, :]`` (a view)."""
    n = start + t + 1
    x = _embed(pl, tok, t)
    attend = _single_query_attention(kv[0], n)
    for i, w in enumerate(pl.layers):
        x = _layer(pl, w, x, kv[i], n - 1, attend)
    return _logits(pl, x)


def decode_step_masked(pl: DecodePlan, tok: Tensor, t: Tensor, kv: tuple[Tensor, ...], start: int) -> Tensor:
    """:func:`decode_step` with the position a 0-d integer tensor and attention over the whole buffer
    under the mask ``position <= start + t``: the same shapes at every step (one compiled graph)."""
    write = t + start
    x = _embed(pl, tok, t)
    allowed = (torch.arange(kv[0].shape[-2], device=tok.device) <= write)[None]  # (1, S): broadcasts to (B, H, 1, S)

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)

    for i, w in enumerate(pl.layers):
        x = _layer(pl, w, x, kv[i], write, attend)
    return _logits(pl, x)


_COMPILED = None


def compiled_decode_step():
    """``torch.compile(decode_step_masked, fullgraph=True, dynamic=False)``, made once per process
    (one graph per model shape and batch size; the step position is a tensor, so no recompiles)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(decode_step_masked, fullgraph=True, dynamic=False)
    return _COMPILED
