"""The scaled dot-product attention kernel, and the ``vmap`` batching rules torch lacks for it.

:func:`sdpa` calls ``torch.nn.functional.scaled_dot_product_attention``, which picks a fused
kernel (CPU flash; CUDA flash, memory-efficient or cuDNN). Several of those kernels have no
batching rule: ``aten::_scaled_dot_product_flash_attention_for_cpu`` (forward and backward)
and the CUDA backward kernels. Under ``torch.func.vmap`` torch then warns "There is a
performance drop because we have not yet implemented the batching rule" and runs the kernel
once per example. Importing this module registers the missing rules (only where torch has
none): each folds the mapped dimension into the batch dimension, calls the kernel once, and
unfolds the results. So ``vmap(grad(f))`` (per-sample gradients) runs at full speed, under
``torch.compile(fullgraph=True)`` too, with torch's own autograd formulas: nothing else
changes (double backward through the fused kernels is unsupported there, as in torch).

>>> import torch
>>> q = k = v = torch.randn(2, 4, 5, 8)
>>> per_example = torch.func.vmap(lambda q, k, v: sdpa(q, k, v))(q[:, None], k[:, None], v[:, None])
>>> torch.allclose(per_example[:, 0], sdpa(q, k, v), atol=1e-6)
True
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._C._functorch import _add_batch_dim, _unwrap_batched
from torch._functorch.pyfunctorch import retrieve_current_functorch_interpreter

__all__ = ["sdpa", "math_sdpa", "repeat_kv"]

_NEG_INF = float("-inf")


def repeat_kv(t: Tensor, n: int) -> Tensor:
    """Repeat each of the ``Hkv`` heads ``n`` times: ``(B, Hkv, T, D) -> (B, Hkv * n, T, D)`` (GQA)."""
    return t if n == 1 else t.repeat_interleave(n, dim=-3)


def math_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False,
              scale: float | None = None) -> Tensor:
    """Reference formula of :func:`sdpa` in plain ops; ``mask`` additive float (rows all ``-inf`` give zeros)."""
    k, v = repeat_kv(k, q.shape[-3] // k.shape[-3]), repeat_kv(v, q.shape[-3] // v.shape[-3])
    s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if mask is not None:
        s = s + mask
    if is_causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), _NEG_INF)
    valid = (s > _NEG_INF).any(-1, keepdim=True)
    return (torch.softmax(torch.where(valid, s, 0.0), dim=-1) * valid) @ v


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False,
         scale: float | None = None) -> Tensor:
    """Fused attention ``softmax(q k^T * scale + mask) v`` (SDPA), with zeros for fully masked rows.

    Args:
        q: ``(B, H, Tq, D)``; k: ``(B, Hkv, Tk, D)``; v: ``(B, Hkv, Tk, Dv)``; ``Hkv`` divides ``H``
            (grouped-query attention: query head ``h`` reads kv head ``h // (H // Hkv)``).
        mask: bool (True = attend) or additive float, broadcastable to ``(B, H, Tq, Tk)``.
        is_causal: SDPA's causal mask (top-left aligned; equal to bottom-right when ``Tq == Tk``).
        scale: logit scale, default ``1 / sqrt(D)``.

    Returns:
        ``(B, H, Tq, Dv)``; rows whose keys are all masked are zeros (kernels disagree there:
        some give NaN), so such rows are unmasked for the kernel and zeroed after.
    """
    gqa = q.shape[-3] != k.shape[-3]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    valid = (mask if mask.dtype == torch.bool else mask > _NEG_INF).any(-1, keepdim=True)
    mask = mask | ~valid if mask.dtype == torch.bool else torch.where(valid, mask, 0.0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    return out * valid.to(out.dtype)


# --- batching rules for the fused kernels ----------------------------------------------------

# Arguments that are per-batch-element data (leading axis B), masks (broadcast to (B, H, Tq, Tk)),
# and everything else (RNG state, sequence offsets), by the names in the kernels' schemas.
_DATA = {"grad_out", "grad_out_", "query", "key", "value", "out", "logsumexp"}
_MASKS = {"attn_mask", "attn_bias"}
_NO_BATCHING = torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchBatched)
_KERNELS = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention_for_cpu_backward",
    "_scaled_dot_product_efficient_attention_backward",
    "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_cudnn_attention_backward",
)


def _fold(t: Tensor, d: int | None, n: int) -> Tensor:
    """``(..n at d.., B, *rest)`` -> ``(n * B, *rest)``; an unmapped ``t`` is repeated ``n`` times."""
    t = t.movedim(d, 0) if d is not None else t.unsqueeze(0).expand((n,) + t.shape)
    return t.reshape((n * t.shape[1],) + t.shape[2:])


def _fold_mask(m: Tensor, d: int | None, n: int, b: int) -> Tensor:
    """A mask broadcastable to ``(b, H, Tq, Tk)`` per example, as one for ``(n * b, H, Tq, Tk)``."""
    if d is None and (m.dim() < 4 or m.shape[0] == 1):
        return m  # broadcasts over the folded batch as it is
    if d is None:
        m = m.unsqueeze(0).expand((n,) + m.shape)
    else:
        m = m.movedim(d, 0)
        m = m.reshape(m.shape[:1] + (1,) * (5 - m.dim()) + m.shape[1:])
    return m.expand((n, b) + m.shape[2:]).reshape((n * b,) + m.shape[2:])


def _batching_rule(op: torch._ops.OpOverload):
    names = [a.name for a in op._schema.arguments]
    kw_only = {a.name for a in op._schema.arguments if a.kwarg_only}

    def call(values: dict) -> tuple:
        out = op(*[values[k] for k in names if k not in kw_only and k in values],
                 **{k: values[k] for k in kw_only if k in values})
        return out if isinstance(out, tuple) else (out,)

    def rule(keyset, *args, **kwargs):
        interp = retrieve_current_functorch_interpreter()
        level, n = interp.level(), interp.batch_size()
        values, dims = dict(zip(names, args)) | kwargs, {}
        for name, val in values.items():
            if isinstance(val, Tensor):
                values[name], dims[name] = _unwrap_batched(val, level)
        aux = [k for k, d in dims.items() if d is not None and k not in _DATA and k not in _MASKS]
        with torch._C._ExcludeDispatchKeyGuard(_NO_BATCHING):
            if aux and values.get("dropout_p", 0.0) != 0.0:  # per-example RNG state: one call per example
                outs = [call({k: (v.select(dims[k], i) if dims.get(k) is not None else v) for k, v in values.items()})
                        for i in range(n)]
                return tuple(_add_batch_dim(torch.stack(o), 0, level) if isinstance(o[0], Tensor) else o[0]
                             for o in zip(*outs))
            for k in aux:  # RNG state without dropout is unused: any example's will do
                values[k] = values[k].select(dims[k], 0)
            for k in _DATA & values.keys():
                if isinstance(values[k], Tensor):
                    values[k] = _fold(values[k], dims.get(k), n)
            b = values["query"].shape[0] // n
            for k in _MASKS & values.keys():
                if isinstance(values[k], Tensor):
                    values[k] = _fold_mask(values[k], dims.get(k), n, b)
            outs = call(values)
        return tuple(_add_batch_dim(o.unflatten(0, (n, b)), 0, level)
                     if isinstance(o, Tensor) and o.dim() > 0 and o.shape[0] == n * b else o for o in outs)

    return rule


_LIB = torch.library.Library("aten", "IMPL")
for _name in _KERNELS:
    if hasattr(torch.ops.aten, _name) and not torch._C._dispatch_has_kernel_for_dispatch_key(
            f"aten::{_name}", "FuncTorchBatched"):
        _LIB.impl(_name, _batching_rule(getattr(torch.ops.aten, _name).default), "FuncTorchBatched",
                  with_keyset=True)
