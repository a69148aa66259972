"""The scaled dot-product attention kernel, with the ``vmap`` batching rules torch lacks.

:func:`sdpa` is the fast path. torch has no batching rule for the CPU flash kernel
(``aten::_scaled_dot_product_flash_attention_for_cpu``) nor for the CUDA backward kernels
(efficient, cuDNN): under ``torch.func.vmap`` it warns "There is a performance drop because
we have not yet implemented the batching rule" and loops over examples. So attention goes
through two custom ops (forward, backward) whose batching rule folds the mapped dimension
into the batch dimension and calls the kernel once: ``vmap(grad(f))`` (per-sample
gradients) runs at full speed, and ``torch.compile(fullgraph=True)`` sees two opaque ops
with fake implementations. The ops run the CPU flash kernels (always on CPU: SDPA would pick
the same one) and, under vmap only, CUDA's memory-efficient kernels; otherwise CUDA calls
SDPA, which picks its fastest kernel.

Gradients: the backward is the kernel's backward; a gradient for a float mask (a learned
bias) comes from the saved log-sum-exp (CPU) or the kernel (CUDA); double backward
recomputes with the math formula (slow, correct). Forward-mode AD (``jvp``/``jacfwd``) is
not supported on the custom-op path.

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

__all__ = ["sdpa", "math_sdpa", "repeat_kv"]

_aten = torch.ops.aten
_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def repeat_kv(t: Tensor, n: int) -> Tensor:
    """Repeat each of the ``Hkv`` heads ``n`` times: ``(B, Hkv, T, D) -> (B, Hkv * n, T, D)`` (GQA)."""
    return t if n == 1 else t.repeat_interleave(n, dim=-3)


def _scale(q: Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale


def _scores(q: Tensor, k: Tensor, mask: Tensor | None, is_causal: bool, scale: float | None) -> Tensor:
    """Masked logits ``(B, H, Tq, Tk)``; ``mask`` is additive float, ``is_causal`` top-left (as SDPA)."""
    k = repeat_kv(k, q.shape[-3] // k.shape[-3])
    s = (q @ k.transpose(-2, -1)) * _scale(q, scale)
    if mask is not None:
        s = s + mask
    if is_causal:
        tq, tk = s.shape[-2:]
        causal = torch.ones(tq, tk, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~causal, float("-inf"))
    return s


def math_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False,
              scale: float | None = None) -> Tensor:
    """Reference formula of :func:`sdpa` in plain ops (fully masked rows give zeros)."""
    s = _scores(q, k, mask, is_causal, scale)
    valid = (s > float("-inf")).any(-1, keepdim=True)
    p = torch.softmax(torch.where(valid, s, 0.0), dim=-1) * valid
    return p @ repeat_kv(v, q.shape[-3] // v.shape[-3])


def _sum_to(g: Tensor, shape: torch.Size) -> Tensor:
    """Sum a ``(B, H, Tq, Tk)`` gradient down to a broadcast ``shape`` of the same rank."""
    dims = [i for i, (a, b) in enumerate(zip(g.shape, shape)) if b == 1 and a != 1]
    return g.sum(dims, keepdim=True) if dims else g


# --- the two custom ops: CPU flash kernels; CUDA memory-efficient kernels ------------------


@torch.library.custom_op("polymodal::fused_attention", mutates_args=(), device_types="cpu")
def _flash_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool,
               scale: float | None) -> tuple[Tensor, Tensor]:
    out, lse = _aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, attn_mask=mask, scale=scale)
    return out.contiguous(), lse.contiguous()


@_flash_fwd.register_fake
def _(q, k, v, mask, is_causal, scale):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    tq = q.shape[-2] if q.device.type == "cpu" else -(-q.shape[-2] // 32) * 32  # CUDA pads to 32
    return q.new_empty(q.shape), q.new_empty(q.shape[:-2] + (tq,), dtype=lse_dtype)


@torch.library.custom_op("polymodal::fused_attention_backward", mutates_args=(), device_types="cpu")
def _flash_bwd(g: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, out: Tensor, lse: Tensor,
               is_causal: bool, scale: float | None, mask_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = g.contiguous()
    gq, gk, gv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
        g, q, k, v, out, lse, 0.0, is_causal, attn_mask=mask, scale=scale)
    gq, gk, gv = gq.contiguous(), gk.contiguous(), gv.contiguous()
    if not mask_grad:
        return gq, gk, gv, q.new_empty(0)
    # d(logits) = P * (dP - rowsum(dO * O)), with P rebuilt from the saved log-sum-exp.
    p = torch.exp(_scores(q, k, mask, is_causal, scale).float() - lse.unsqueeze(-1).float()).nan_to_num(0.0)
    dp = (g @ repeat_kv(v, q.shape[-3] // v.shape[-3]).transpose(-2, -1)).float()
    ds = p * (dp - (g.float() * out.float()).sum(-1, keepdim=True))
    return gq, gk, gv, _sum_to(ds, mask.shape).to(mask.dtype).contiguous()


@_flash_bwd.register_fake
def _(g, q, k, v, mask, out, lse, is_causal, scale, mask_grad):
    gm = mask.new_empty(mask.shape) if mask_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), gm


def _mem_eff_bias(mask: Tensor | None, q: Tensor, k: Tensor) -> Tensor | None:
    """The bias as SDPA hands it to the CUDA memory-efficient kernel: rows 16-aligned, expanded."""
    if mask is None:
        return None
    tk = k.shape[-2]
    pad = (-tk) % 16
    m = F.pad(mask, (0, pad))[..., :tk] if pad else mask
    return m.expand(q.shape[0], q.shape[1], q.shape[2], tk)


@_flash_fwd.register_kernel("cuda")
def _(q, k, v, mask, is_causal, scale):
    n = q.shape[-3] // k.shape[-3]
    k, v = repeat_kv(k, n), repeat_kv(v, n)
    out, lse, _, _ = _aten._scaled_dot_product_efficient_attention(
        q, k, v, _mem_eff_bias(mask, q, k), True, 0.0, is_causal, scale=scale)
    return out.contiguous(), lse.contiguous()


@_flash_bwd.register_kernel("cuda")
def _(g, q, k, v, mask, out, lse, is_causal, scale, mask_grad):
    n = q.shape[-3] // k.shape[-3]
    kr, vr = repeat_kv(k, n), repeat_kv(v, n)
    rng = torch.zeros((), dtype=torch.int64, device=q.device)  # philox state: unused without dropout
    # The kernel reads out and grad_out with one set of strides: lay both out (B, T, H, D)-contiguous.
    g, out = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (g, out))
    gq, gk, gv, gb = _aten._scaled_dot_product_efficient_attention_backward(
        g, q, kr, vr, _mem_eff_bias(mask, q, kr), out, lse, rng, rng, 0.0,
        [True, True, True, mask_grad], is_causal, scale=scale)
    if n > 1:  # GQA: each kv head gathers the gradients of its query-head group
        gk, gv = (t.unflatten(-3, (k.shape[-3], n)).sum(-3) for t in (gk, gv))
    gm = _sum_to(gb, mask.shape).to(mask.dtype).contiguous() if mask_grad else q.new_empty(0)
    return gq.contiguous(), gk.contiguous(), gv.contiguous(), gm


# --- batching rules: fold the mapped dimension into the batch dimension ----------------------


def _fold(t: Tensor, d: int | None, n: int) -> Tensor:
    """``(..n at d.., B, *rest)`` -> ``(n * B, *rest)``; unmapped ``t`` is repeated ``n`` times."""
    t = t.movedim(d, 0) if d is not None else t.unsqueeze(0).expand((n,) + t.shape)
    return t.reshape((n * t.shape[1],) + t.shape[2:])


def _fold_mask(mask: Tensor | None, d: int | None, n: int, b: int, full: bool = False) -> Tensor | None:
    """A 4-D per-example mask ``(b or 1, h, tq, tk)`` folded to ``(n * b, ...)``, or kept ``(1, ...)``
    when unmapped and broadcast over the batch (``full`` forces the folded form)."""
    if mask is None:
        return None
    if d is None and mask.shape[0] == 1 and not full:
        return mask
    m = mask.movedim(d, 0) if d is not None else mask.unsqueeze(0).expand((n,) + mask.shape)
    return m.expand((n, b) + m.shape[2:]).reshape((n * b,) + m.shape[2:])


def _unfold(t: Tensor, n: int) -> Tensor:
    return t.reshape((n, t.shape[0] // n) + t.shape[1:])


@_flash_fwd.register_vmap
def _(info, in_dims, q, k, v, mask, is_causal, scale):
    n = info.batch_size
    dq, dk, dv, dm = in_dims[:4]
    q = _fold(q, dq, n)
    b = q.shape[0] // n
    out, lse = _flash_fwd(q, _fold(k, dk, n), _fold(v, dv, n), _fold_mask(mask, dm, n, b), is_causal, scale)
    return (_unfold(out, n), _unfold(lse, n)), (0, 0)


@_flash_bwd.register_vmap
def _(info, in_dims, g, q, k, v, mask, out, lse, is_causal, scale, mask_grad):
    n = info.batch_size
    dg, dq, dk, dv, dm, do, dl = in_dims[:7]
    q = _fold(q, dq, n)
    b = q.shape[0] // n
    # A per-example mask gradient needs the mask laid out per example (full), then summed back.
    m = _fold_mask(mask, dm, n, b, full=mask_grad)
    gq, gk, gv, gm = _flash_bwd(_fold(g, dg, n), q, _fold(k, dk, n), _fold(v, dv, n), m, _fold(out, do, n),
                                _fold(lse, dl, n), is_causal, scale, mask_grad)
    if mask_grad:
        per_example = mask.movedim(dm, 0).shape[1:] if dm is not None else mask.shape
        gm = _unfold(gm, n)
        gm = gm.sum(1, keepdim=True) if per_example[0] == 1 else gm
        return (_unfold(gq, n), _unfold(gk, n), _unfold(gv, n), gm.reshape((n,) + tuple(per_example))), (0, 0, 0, 0)
    return (_unfold(gq, n), _unfold(gk, n), _unfold(gv, n), gm), (0, 0, 0, None)


# --- autograd (functorch-compatible: setup_context + generated vmap rules) -------------------


class _FlashAttention(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v, mask, is_causal, scale):
        return _flash_fwd(q, k, v, mask, is_causal, scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, is_causal, scale = inputs
        out, lse = output
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.is_causal, ctx.scale = is_causal, scale
        ctx.mask_grad = mask is not None and ctx.needs_input_grad[3]

    @staticmethod
    def backward(ctx, g, _g_lse):
        q, k, v, mask, out, lse = ctx.saved_tensors
        gq, gk, gv, gm = _FlashAttentionBackward.apply(g, q, k, v, mask, out, lse, ctx.is_causal, ctx.scale,
                                                        ctx.mask_grad)
        return gq, gk, gv, (gm if ctx.mask_grad else None), None, None


class _FlashAttentionBackward(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(g, q, k, v, mask, out, lse, is_causal, scale, mask_grad):
        return _flash_bwd(g, q, k, v, mask, out, lse, is_causal, scale, mask_grad)

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, q, k, v, mask, _out, _lse, is_causal, scale, mask_grad = inputs
        ctx.save_for_backward(g, q, k, v, mask)
        ctx.is_causal, ctx.scale, ctx.mask_grad = is_causal, scale, mask_grad

    @staticmethod
    def backward(ctx, ggq, ggk, ggv, ggm):
        # Double backward: differentiate the math formula's vjp (out and lse are recomputed there).
        g, q, k, v, mask = ctx.saved_tensors
        c, s = ctx.is_causal, ctx.scale
        if mask is None:
            def first(g, q, k, v):
                return torch.func.vjp(lambda q, k, v: math_sdpa(q, k, v, None, c, s), q, k, v)[1](g)
            dg, dq, dk, dv = torch.func.vjp(first, g, q, k, v)[1]((ggq, ggk, ggv))
            return dg, dq, dk, dv, None, None, None, None, None, None

        def first(g, q, k, v, m):
            return torch.func.vjp(lambda q, k, v, m: math_sdpa(q, k, v, m, c, s), q, k, v, m)[1](g)
        ggm = ggm if ctx.mask_grad else torch.zeros_like(mask)
        dg, dq, dk, dv, dm = torch.func.vjp(first, g, q, k, v, mask)[1]((ggq, ggk, ggv, ggm))
        return dg, dq, dk, dv, (dm if ctx.needs_input_grad[4] else None), None, None, None, None, None


@torch.compiler.allow_in_graph
def _fused_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool,
                     scale: float | None) -> Tensor:
    # Opaque to dynamo: it cannot vmap an autograd.Function it traced itself, so it runs this
    # one as is (under the real functorch transforms, with fake tensors) and records the ops.
    return _FlashAttention.apply(q, k, v, mask, is_causal, scale)[0]


def _flash_ok(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether our ops have a kernel for this layout (CPU flash; CUDA memory-efficient)."""
    if not (q.dim() == 4 and k.dim() == 4 and v.dim() == 4 and k.dtype == q.dtype and v.dtype == q.dtype
            and q.shape[-1] == k.shape[-1] == v.shape[-1] and q.shape[-2] > 0 and k.shape[-2] > 0):
        return False
    if q.device.type == "cpu":
        return q.dtype in _FLASH_DTYPES
    return q.device.type == "cuda" and q.dtype in _CUDA_DTYPES and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256


def _under_vmap() -> bool:
    """Eager and inside ``torch.func.vmap`` (while compiling the transform stack can't be read)."""
    if torch.compiler.is_compiling():
        return False
    stack = torch._C._functorch.get_interpreter_stack() or []
    return any(i.key() == torch._C._functorch.TransformType.Vmap for i in stack)


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Bool (True = attend) or float mask -> additive ``dtype`` mask of rank 4."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.where(mask, 0.0, float("-inf")).to(dtype)
    elif mask.dtype != dtype:
        mask = mask.to(dtype)
    return mask.reshape((1,) * (4 - mask.dim()) + mask.shape) if mask.dim() < 4 else mask


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, is_causal: bool = False,
         scale: float | None = None) -> Tensor:
    """Fused attention ``softmax(q k^T * scale + mask) v``, vmap-batched on CPU.

    Args:
        q: ``(B, H, Tq, D)``; k: ``(B, Hkv, Tk, D)``; v: ``(B, Hkv, Tk, Dv)``; ``Hkv`` divides ``H``
            (grouped-query attention: query head ``h`` reads kv head ``h // (H // Hkv)``).
        mask: bool (True = attend) or additive float, broadcastable to ``(B, H, Tq, Tk)``.
        is_causal: SDPA's causal mask (top-left aligned; equal to bottom-right when ``Tq == Tk``).
        scale: logit scale, default ``1 / sqrt(D)``.

    Returns:
        ``(B, H, Tq, Dv)``; rows whose keys are all masked are zeros.
    """
    cpu = q.device.type == "cpu"
    # CPU: always our ops (SDPA would run the same kernel). CUDA: ours under vmap only, where SDPA's
    # backward kernels lack batching rules; elsewhere SDPA picks its fastest kernel (flash, cuDNN).
    fused = _flash_ok(q, k, v) and (cpu or _under_vmap())
    if fused and cpu:  # the CPU flash kernel already gives zeros for fully masked rows
        return _fused_attention(q, k, v, _additive(mask, q.dtype), is_causal, scale)
    valid = None
    if mask is not None:  # kernels differ on fully masked rows (NaN or 0): unmask them, zero them after
        valid = (mask if mask.dtype == torch.bool else mask > float("-inf")).any(-1, keepdim=True)
        mask = mask | ~valid if mask.dtype == torch.bool else torch.where(valid, mask, 0.0)
    if fused:
        out = _fused_attention(q, k, v, _additive(mask, q.dtype), is_causal, scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                             enable_gqa=q.shape[-3] != k.shape[-3])
    return out if valid is None else out * valid.to(out.dtype)
