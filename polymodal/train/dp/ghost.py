"""The norm-only DP step: per-example gradient norms and the sum of clipped per-example
gradients without materialising per-example gradients of the large layers.

One forward pass over the whole batch runs under :class:`.ghost_trace.Tracer`, one backward
pass records each known layer's output gradient ``G`` next to its saved input ``A``. Then

1. per-example squared norms, parameter by parameter: the ghost identity
   ``<A A^T, G G^T>`` or the direct product for linear / conv / embedding weights
   (:mod:`.ghost_ops`), direct sums for biases and norms' affine parameters, taps for
   broadcast parameters, and exact ``vmap(grad)`` for every parameter the tracer could not
   follow (the *fallback*, found in the autograd graph, so every model works);
2. clip factors ``c_i = min(1, C / (||g_i|| + 1e-6))`` (Opacus's formula), times the
   Poisson padding mask; an example with a non-finite gradient norm gets 0 and its gradient is
   left out of the sums (:func:`clip_factors`);
3. the clipped sum ``sum_i c_i g_i`` by book-keeping: ``(c * G)^T A`` from the stored
   tensors, one matmul per weight, no second backward.

Exact up to float rounding: the norms equal those of the full per-example gradients. Loss
functions follow :mod:`.per_sample`: ``loss_fn(params, batch[, key=]) -> losses (B,)``, called
once on the whole batch (with one key: dropout draws for the batch), and examples must not
interact (no batch statistics).

>>> import torch
>>> from polymodal.core import random as pr
>>> from polymodal.core.layers import MLP
>>> mlp = MLP(4, 3, hidden_dims=(8,), norm="layer_norm")
>>> p = mlp.init(key=pr.key(0))
>>> batch = {"x": torch.randn(6, 5, 4), "y": torch.randn(6, 5, 3)}
>>> loss = lambda p, b: ((mlp(p, b["x"]) - b["y"]) ** 2).sum((1, 2))
>>> out = ghost_clip(loss, p, batch, max_grad_norm=1.0)
>>> from polymodal.train.dp.per_sample import per_sample_grad_norms
>>> bool(torch.allclose(out.norms, per_sample_grad_norms(loss, p, batch, method="vmap"), rtol=1e-4))
True
>>> out.grads["layers"][0]["weight"].shape, out.fallback
(torch.Size([8, 4]), ())
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from polymodal.core import pytree
from polymodal.core.layers.seam import compose, current_policy, use_policy
from polymodal.core.pytree import Params

from .ghost_ops import Call, clipped_sum, materialize, sq_norms
from .ghost_trace import Tracer, reachable
from .per_sample import (
    Trainable, check_losses, iter_chunks, batch_size, call_loss, grads_tree, sq_norms_of, trainable_names, with_leaves,
)

__all__ = ["ghost_clip", "GhostResult", "clip_factors"]


class GhostResult(NamedTuple):
    """What :func:`ghost_clip` returns."""

    grads: Any  # sum_i c_i g_i shaped like params (None at frozen leaves); None without max_grad_norm
    norms: Tensor  # (B,) per-example gradient norms over all trainable leaves
    losses: Tensor  # (B,) per-example losses (detached)
    aux: Any  # loss_fn's aux (has_aux), from the batch pass
    fallback: tuple[str, ...]  # parameters whose per-example gradients came from vmap


def clip_factors(norms: Tensor, max_grad_norm: float, mask: Tensor | None = None) -> Tensor:
    """``min(1, C / (norm + 1e-6))`` per example (Opacus's flat clipping), zero where ``mask`` is False
    and where the norm is not finite.

    An example whose gradient has a NaN or inf entry (NaN input, overflow) has no direction to
    clip to: it is left out of the sum (factor 0, and the clipped sums zero its gradient rather than
    compute ``0 * inf``), which contributes less than ``C`` as the privacy analysis requires.
    :func:`~polymodal.train.dp.dp_train_step` counts such examples (``DPStepOutput.nonfinite``)."""
    c = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    c = torch.where(torch.isfinite(norms), c, c.new_zeros(()))
    return c if mask is None else c * mask.to(c.dtype)


class _PerExample:
    """Per-example gradients ``(B, *p.shape)`` accumulated by parameter name (and rows)."""

    def __init__(self, leaves: dict[str, Tensor], n: int) -> None:
        self.leaves, self.n = leaves, n
        self.dense: dict[str, Tensor] = {}
        self.derived: dict[int, list] = {}  # id(static tensor) -> [tensor, summed per-example grads]

    def add(self, target: Any, value: Tensor) -> None:
        if isinstance(target, tuple):
            name, rows = target
            p = self.leaves[name]
            buf = self.dense.get(name)
            if buf is None and rows is None:  # first contribution: keep it (it is ours)
                self.dense[name] = value.reshape((self.n,) + tuple(p.shape))
                return
            if buf is None:
                buf = self.dense[name] = p.new_zeros((self.n,) + tuple(p.shape))
            if rows is None:
                buf += value.reshape(buf.shape)
            else:
                buf[:, rows[0]:rows[1]] += value.reshape((self.n, rows[1] - rows[0]) + tuple(p.shape[1:]))
        elif target is not None:
            entry = self.derived.setdefault(id(target), [target, None])
            v = value.reshape((self.n,) + tuple(target.shape))
            entry[1] = v if entry[1] is None else entry[1] + v

    def pull_back(self) -> None:
        """Per-example gradients of derived tensors -> of the leaves, by one batched vjp."""
        if not self.derived:
            return
        outs, vals = zip(*self.derived.values())
        names = list(self.leaves)
        try:
            res = torch.autograd.grad(outs, [self.leaves[k] for k in names], vals, is_grads_batched=True,
                                      allow_unused=True)
        except RuntimeError:  # an op without a batching rule in its backward: loop over examples
            per = [torch.autograd.grad(outs, [self.leaves[k] for k in names], [v[i] for v in vals],
                                       retain_graph=True, allow_unused=True) for i in range(self.n)]
            res = [None if per[0][j] is None else torch.stack([p[j] for p in per]) for j in range(len(names))]
        for k, r in zip(names, res):
            if r is not None:
                self.add((k, None), r)
        self.derived.clear()


def _dims(p: Tensor, rows: tuple[int, int] | None) -> tuple[int, int]:
    return (p.shape[0] if rows is None else rows[1] - rows[0]), p[0].numel() if p.dim() > 1 else 1


def _overlap(groups: dict) -> bool:
    spans = sorted((0, 1 << 62) if r is None else r for r in groups)
    return any(a[1] > b[0] for a, b in zip(spans, spans[1:]))


def ghost_clip(loss_fn: Callable, params: Params, batch: Any, *, max_grad_norm: float | None,
               trainable: Trainable = None, key: Tensor | None = None, mask: Tensor | None = None,
               chunk_size: int | None = None, has_aux: bool = False, scale: float = 1.0,
               materialize_all: bool = False) -> GhostResult:
    """Per-example gradient norms and (with ``max_grad_norm``) the sum of clipped per-example gradients.

    Args:
        loss_fn: ``(params, batch[, key=]) -> losses (B,)`` (or ``(losses, aux)`` with ``has_aux``).
        params: the parameter tree. batch: pytree of tensors with a leading example axis ``B``.
        max_grad_norm: clipping bound ``C``; ``None`` computes only the norms.
        trainable: which leaves get gradients (see :mod:`.per_sample`).
        key: passed to ``loss_fn`` for the batch pass; the vmap fallback uses ``fold_in(key, i)``.
        mask: ``(B,)`` bool, False for Poisson padding rows (their clip factor is 0).
        chunk_size: examples per vmap call of the fallback.
        scale: multiplies the clipped sum (folded into the clip factors: e.g. ``1 / batch size``).
        materialize_all: return the full per-example gradients as ``grads`` (``(B, *p.shape)``
            leaves, ``norms=None``) instead: per-sample gradients from the same trace.

    Returns:
        :class:`GhostResult` ``(grads, norms (B,), losses (B,), aux, fallback)``.
    """
    n = batch_size(batch)
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise ValueError(f"ghost_clip: max_grad_norm must be > 0, got {max_grad_norm!r}")
    if mask is not None and (not isinstance(mask, Tensor) or mask.shape != (n,)):
        raise ValueError(f"ghost_clip: mask: expected a ({n},) tensor, got {getattr(mask, 'shape', type(mask).__name__)}")
    names = trainable_names(params, trainable)
    flat = pytree.flatten(params)
    if n == 0:  # an empty (Poisson) batch: zero norms and sums, the model is not run
        zeros = {k: flat[k].new_zeros(((0,) if materialize_all else ()) + tuple(flat[k].shape)) for k in names}
        grads = grads_tree(params, zeros) if (max_grad_norm is not None or materialize_all) else None
        empty = torch.zeros(0, device=flat[names[0]].device)
        return GhostResult(grads, None if materialize_all else empty, empty, None, ())
    leaves = {k: flat[k].detach().requires_grad_() for k in names}
    tracer = Tracer(leaves, n)
    tracer.add_data(batch)
    # inside the block seam's policies, so that blocks recomputed in backward (activation
    # checkpointing) are traced again
    with use_policy(compose(current_policy(), tracer.seam_policy)), tracer:
        losses, aux = call_loss(loss_fn, with_leaves(params, leaves), batch, key, has_aux)
    check_losses(losses, n, "ghost_clip")
    fallback = reachable(losses, tracer.names)
    tap_grads: tuple = ()
    if losses.requires_grad:
        got = torch.autograd.grad(losses.sum(), [tracer.anchor] + [t.q for t in tracer.taps], allow_unused=True)
        tap_grads = got[1:]
    losses = losses.detach()  # drops the forward graph (and whatever it saved) before the sums
    with torch.no_grad():
        per, groups = _collect(loss_fn, params, batch, names, leaves, tracer, tap_grads, fallback, key, chunk_size,
                               has_aux, materialize_all)
        if materialize_all:
            for k in names:
                if k not in per.dense:  # unused by the loss: zero gradients
                    per.dense[k] = leaves[k].new_zeros((n,) + tuple(leaves[k].shape))
            return GhostResult(grads_tree(params, per.dense), None, losses, aux, tuple(k for k in names if k in fallback))
        return _finish(params, names, leaves, per, groups, tracer.n, fallback, losses, aux, max_grad_norm, mask, scale)


def _collect(loss_fn, params, batch, names, leaves, tracer, tap_grads, fallback, key, chunk_size, has_aux,
             materialize_all) -> tuple[_PerExample, dict]:
    """Sort the recorded sources: per-example tensors (``per``) and ghost groups ``{name: {rows: calls}}``."""
    n = tracer.n
    per = _PerExample(leaves, n)
    groups: dict[str, dict] = {}
    for tw, call, tb in tracer.calls:
        if call.g is None:  # output unused by the loss
            continue
        if isinstance(tw, tuple):
            groups.setdefault(tw[0], {}).setdefault(tw[1], []).append(call)
        elif tw is not None:  # a derived weight: materialise and pull back
            d_out, d_in = tw.shape[0], tw[0].numel()
            per.add(tw, materialize([call], d_out, d_in))
        if tb is not None:
            per.add(tb, call.gb)
    for tw, call, tb in tracer.norms:
        for t, v in ((tw, call.gw), (tb, call.gb)):
            if t is not None and v is not None:
                per.add(t, v)
    for tap, g in zip(tracer.taps, tap_grads):
        if g is not None:
            per.add(tap.target, tap.per_example(g))
    per.pull_back()
    for name in fallback:
        groups.pop(name, None)
        per.dense.pop(name, None)
    for name in list(groups):  # mixed sources or overlapping row slices: materialise those too
        if materialize_all or name in per.dense or _overlap(groups[name]):
            for rows, calls in groups.pop(name).items():
                per.add((name, rows), materialize(calls, *_dims(leaves[name], rows)))
                for call in calls:
                    call.x = call.g = None
    if fallback:
        fb = [k for k in names if k in fallback]
        parts = [g for g, _, _ in iter_chunks(loss_fn, params, fb, batch, key, chunk_size, has_aux)]
        for k in fb:
            per.dense[k] = parts[0][k] if len(parts) == 1 else torch.cat([p[k] for p in parts])
    return per, groups


def _finish(params, names, leaves, per, groups, n, fallback, losses, aux, max_grad_norm, mask, scale) -> GhostResult:
    sq = torch.zeros(n, dtype=torch.float64 if any(v.dtype == torch.float64 for v in leaves.values()) else torch.float32,
                     device=next(iter(leaves.values())).device)
    for v in per.dense.values():
        sq = sq + sq_norms_of(v).to(sq.dtype)
    for name, by_rows in groups.items():
        grams: dict = {}  # input Grams shared by the row slices of one weight
        for rows, calls in by_rows.items():
            sq = sq + sq_norms(calls, *_dims(leaves[name], rows), grams).to(sq.dtype)
    norms = sq.sqrt()

    grads = None
    if max_grad_norm is not None:
        c = clip_factors(norms, max_grad_norm, mask) * scale
        bad = ~torch.isfinite(norms)
        drop = bad if bool(bad.any()) else None  # non-finite gradients: left out (see clip_factors)
        sums: dict[str, Tensor] = {}
        scaled: dict = {}
        for name in names:
            p = leaves[name]
            if name in per.dense:
                v = per.dense.pop(name)
                if drop is not None:
                    v = v.masked_fill(drop.reshape((-1,) + (1,) * (v.dim() - 1)), 0.0)
                sums[name] = torch.tensordot(c.to(p.dtype), v, dims=1)
                continue
            by_rows = groups.pop(name, {})
            if list(by_rows) == [None]:
                sums[name] = clipped_sum(by_rows[None], c, *_dims(p, None), scaled, drop).reshape(p.shape)
            else:
                out = p.new_zeros(p.shape)
                for rows, calls in by_rows.items():
                    m = clipped_sum(calls, c, *_dims(p, rows), scaled, drop)
                    out[rows[0]:rows[1]] += m.reshape((rows[1] - rows[0],) + tuple(p.shape[1:]))
                sums[name] = out
            scaled.clear()
            for calls in by_rows.values():  # free A and G as we go: the sums take their place
                for call in calls:
                    call.x = call.g = None
        grads = grads_tree(params, sums)
    return GhostResult(grads, norms, losses, aux, tuple(k for k in names if k in fallback))
