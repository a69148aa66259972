"""Per-sample gradients of any polymodal model: ``vmap(grad(loss))`` over the examples of a batch.

A *loss function* here maps a batch to one loss per example::

    loss_fn(params, batch) -> losses (B,)                  # or ((B,), aux) with has_aux=True
    loss_fn(params, batch, key=k) -> ...                   # when a key is given (dropout, masking)

``batch`` is any pytree of tensors (a tensor, a tuple, a dict) whose leaves share a leading
example axis ``B``. The same function serves the ordinary gradient (``losses.mean()``), the
per-sample gradients below (each example is passed as a batch of one, so layers that need a
batch axis, such as GroupNorm, work unchanged), and the norm-only DP step of
:mod:`polymodal.train.dp.ghost` (the whole batch at once).

``trainable`` selects the parameters that get gradients; the rest are frozen (passed through
detached): ``None`` (every floating leaf), a predicate over flat names
(``lambda name: name.startswith("head")``), a flat-name prefix or list of prefixes
(``"head"``, ``["blocks.11", "head"]``), or a mask tree of bools shaped like ``params`` in which a
bool may stand for a whole sub-tree and missing keys are frozen.

With ``key``, example ``i`` (counted over the whole batch) draws its randomness from
``fold_in(key, i)``: per-example dropout that does not depend on chunking.

>>> import torch
>>> from polymodal.core import random as pr
>>> from polymodal.core.layers import Linear
>>> lin = Linear(3, 2)
>>> p = lin.init(key=pr.key(0))
>>> loss = lambda p, b: ((lin(p, b["x"]) - b["y"]) ** 2).sum(-1)
>>> batch = {"x": torch.randn(5, 3), "y": torch.randn(5, 2)}
>>> g = per_sample_grads(loss, p, batch)
>>> g["weight"].shape, g["bias"].shape
(torch.Size([5, 2, 3]), torch.Size([5, 2]))
>>> bool(torch.allclose(per_sample_grad_norms(loss, p, batch, method="vmap"),
...                     (g["weight"].flatten(1).norm(dim=1) ** 2 + g["bias"].norm(dim=1) ** 2).sqrt()))
True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Union

import torch
import torch.utils._pytree as tpt
from torch import Tensor
from torch.func import grad, vmap

from polymodal.core import pytree
from polymodal.core import random as pr
from polymodal.core.pytree import Params

__all__ = [
    "per_sample_grads", "per_sample_grad_norms", "trainable_names", "batch_size", "example_keys",
    "call_loss", "with_leaves", "grads_tree", "sq_norms_of", "Trainable",
]

Trainable = Union[None, str, Sequence[str], Callable[[str], bool], Mapping[str, Any]]


# --- shared helpers -----------------------------------------------------------------------


def _mask_names(mask: Any, tree: Any, prefix: str, out: set[str]) -> None:
    if isinstance(mask, bool):
        if mask:
            out.update(prefix + k for k in pytree.flatten(tree)) if isinstance(tree, (Mapping, list, tuple)) \
                else out.add(prefix[:-1])
        return
    if isinstance(mask, Mapping) and isinstance(tree, Mapping):
        for k, m in mask.items():
            if k not in tree:
                raise ValueError(f"trainable: mask names {prefix + k!r}, which is not a parameter (have {sorted(tree)})")
            _mask_names(m, tree[k], f"{prefix}{k}.", out)
        return
    if isinstance(mask, (list, tuple)) and isinstance(tree, (list, tuple)):
        if len(mask) != len(tree):
            raise ValueError(f"trainable: mask at {prefix[:-1]!r} has {len(mask)} entries, params have {len(tree)}")
        for i, (m, t) in enumerate(zip(mask, tree)):
            _mask_names(m, t, f"{prefix}{i}.", out)
        return
    raise TypeError(f"trainable: mask at {prefix[:-1] or 'root'!r} must be a bool or match the params' structure, "
                    f"got {type(mask).__name__}")


def trainable_names(params: Params, trainable: Trainable = None) -> list[str]:
    """Flat names (``flatten`` order) of the floating leaves that get gradients.

    >>> import torch
    >>> p = {"enc": {"w": torch.ones(2)}, "head": {"w": torch.ones(2), "step": torch.zeros((), dtype=torch.int64)}}
    >>> trainable_names(p), trainable_names(p, "head"), trainable_names(p, {"enc": True})
    (['enc.w', 'head.w'], ['head.w'], ['enc.w'])
    """
    flat = pytree.flatten(params)
    floating = [k for k, v in flat.items() if isinstance(v, Tensor) and v.is_floating_point()]
    if trainable is None:
        names = floating
    elif callable(trainable):
        names = [k for k in floating if trainable(k)]
    elif isinstance(trainable, (str, list, tuple)) and all(isinstance(s, str) for s in ([trainable] if isinstance(trainable, str) else trainable)):
        prefixes = [trainable] if isinstance(trainable, str) else list(trainable)
        for pre in prefixes:
            if not any(k == pre or k.startswith(pre + ".") for k in flat):
                raise ValueError(f"trainable: prefix {pre!r} matches no parameter (e.g. {list(flat)[:4]})")
        names = [k for k in floating if any(k == pre or k.startswith(pre + ".") for pre in prefixes)]
    elif isinstance(trainable, (Mapping, list, tuple, bool)):
        chosen: set[str] = set()
        _mask_names(trainable, params, "", chosen)
        names = [k for k in floating if k in chosen]
    else:
        raise TypeError(f"trainable: expected None, a predicate, prefixes or a mask tree, got {type(trainable).__name__}")
    if not names:
        raise ValueError("trainable: no floating-point parameter is selected; nothing would get a gradient")
    return names


def batch_size(batch: Any) -> int:
    """The shared leading size of the batch's tensor leaves (``ValueError`` naming them if they differ)."""
    leaves, _ = tpt.tree_flatten(batch)
    sizes = {}
    for i, t in enumerate(leaves):
        if not isinstance(t, Tensor):
            raise TypeError(f"batch: every leaf must be a tensor with a leading example axis, leaf {i} is {type(t).__name__}")
        if t.dim() == 0:
            raise ValueError(f"batch: leaf {i} is a scalar; every leaf needs a leading example axis (B, ...)")
        sizes[i] = t.shape[0]
    if not sizes:
        raise ValueError("batch: expected at least one tensor")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batch: leaves disagree on the example axis: leading sizes {sizes} (leaf index: size)")
    return next(iter(sizes.values()))


def example_keys(key: Tensor, start: int, stop: int) -> Tensor:
    """``(stop - start, 2)``: ``fold_in(key, i)`` for the examples ``i`` in ``[start, stop)``."""
    return vmap(lambda i: pr.fold_in(key, i))(torch.arange(start, stop, device=key.device))


def call_loss(loss_fn: Callable, params: Params, batch: Any, key: Tensor | None, has_aux: bool) -> tuple[Tensor, Any]:
    """``(losses, aux)`` from ``loss_fn`` (the key is passed only when given)."""
    out = loss_fn(params, batch) if key is None else loss_fn(params, batch, key=key)
    if has_aux:
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(f"loss_fn: has_aux=True needs a (losses, aux) pair, got {type(out).__name__}")
        return out
    if isinstance(out, tuple):
        raise TypeError("loss_fn returned a tuple; pass has_aux=True if it is (losses, aux)")
    return out, None


def check_losses(losses: Any, n: int, where: str) -> Tensor:
    if not isinstance(losses, Tensor) or losses.shape != (n,):
        got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(f"{where}: loss_fn must return one loss per example, shape ({n},), got {got}")
    return losses


def _substitute(tree: Any, flat: Mapping[str, Tensor], prefix: str, other: Callable[[Any], Any]) -> Any:
    if isinstance(tree, Mapping):
        return {k: _substitute(v, flat, f"{prefix}{k}.", other) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_substitute(v, flat, f"{prefix}{i}.", other) for i, v in enumerate(tree))
    if tree is None:
        return None
    name = prefix[:-1]
    return flat[name] if name in flat else other(tree)


def with_leaves(params: Params, flat: Mapping[str, Tensor]) -> Params:
    """``params`` with the leaves named in ``flat`` replaced (the others detached: frozen)."""
    return _substitute(params, flat, "", lambda t: t.detach() if isinstance(t, Tensor) else t)


def grads_tree(params: Params, flat: Mapping[str, Tensor]) -> Any:
    """``params``' structure with ``flat[name]`` at the named leaves and ``None`` elsewhere."""
    return _substitute(params, flat, "", lambda t: None)


def sq_norms_of(per_example: Tensor) -> Tensor:
    """``(B,)`` squared norms of per-example tensors ``(B, *shape)`` (any shape, any B including 0)."""
    t = per_example.pow(2)
    return t.sum(tuple(range(1, t.dim()))) if t.dim() > 1 else t


def _slice(batch: Any, start: int, stop: int) -> Any:
    return tpt.tree_map(lambda t: t[start:stop], batch)


# --- the vmap path --------------------------------------------------------------------------


def _check_chunk(chunk_size: Any) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")


def iter_chunks(loss_fn: Callable, params: Params, names: Sequence[str], batch: Any, key: Tensor | None,
            chunk_size: int | None, has_aux: bool) -> Iterator[tuple[dict[str, Tensor], Tensor, Any]]:
    """Yield ``(per-example grads {name: (b, *shape)}, losses (b,), aux)`` chunk by chunk."""
    n = batch_size(batch)
    _check_chunk(chunk_size)
    flat = pytree.flatten(params)
    train = {k: flat[k].detach() for k in names}
    spec: list = []  # tree spec and static (non-tensor) leaves of aux, captured on the first trace

    def one(train_flat, example, k):
        ex = tpt.tree_map(lambda t: t.unsqueeze(0), example)
        losses, aux = call_loss(loss_fn, with_leaves(params, train_flat), ex, k, has_aux)
        losses = losses.reshape(-1)
        if losses.shape != (1,):
            raise ValueError(f"per_sample_grads: loss_fn must return one loss per example; on a batch of one it "
                             f"returned shape {tuple(losses.shape)}")
        leaves, tspec = tpt.tree_flatten(aux)
        spec[:] = [tspec, [None if isinstance(v, Tensor) else v for v in leaves]]
        return losses[0], (losses[0].detach(), [v for v in leaves if isinstance(v, Tensor)])

    if n == 0:  # an empty (Poisson) batch: nothing to run
        yield {k: v.new_zeros((0,) + tuple(v.shape)) for k, v in train.items()}, torch.zeros(0), None
        return
    fn = vmap(grad(one, has_aux=True), in_dims=(None, 0, None if key is None else 0))
    step = n if chunk_size is None else chunk_size
    for start in range(0, n, step):
        stop = min(n, start + step)
        keys = None if key is None else example_keys(key, start, stop)
        try:
            g, (losses, tensors) = fn(train, _slice(batch, start, stop), keys)
        except RuntimeError as e:
            if "saved tensor hooks" in str(e) or "_NoopSaveInputs" in str(e):  # torch >= 2.12 / older
                raise RuntimeError("per-sample gradients by vmap cannot run under activation checkpointing "
                                   "(torch.func does not support saved tensor hooks); use method='trace' "
                                   "or the norm-only DP step, which support the seam's checkpoint policy") from e
            raise
        it = iter(tensors)
        aux = tpt.tree_unflatten([next(it) if v is None else v for v in spec[1]], spec[0]) if has_aux else None
        yield g, losses, aux


def cat_aux(parts: list) -> Any:
    if parts[0] is None or len(parts) == 1:
        return parts[0]
    return tpt.tree_map(lambda *xs: torch.cat(xs) if isinstance(xs[0], Tensor) else xs[0], *parts)


def per_sample_grads(loss_fn: Callable, params: Params, batch: Any, *, trainable: Trainable = None,
                     key: Tensor | None = None, chunk_size: int | None = None, has_aux: bool = False,
                     method: str = "vmap") -> Any:
    """Exact per-example gradients, ``vmap(grad)`` over the examples, ``chunk_size`` at a time.

    ``method="trace"`` computes them from one batched forward/backward instead (the tracer of
    :mod:`.ghost_trace`: per-example ``G_i^T A_i`` for linear / conv / embedding weights,
    direct sums for the rest, vmap only for parameters it cannot follow): 1.2x the ordinary
    gradient's time on ViT-B/16 at batch 8 (2-core CPU) against 1.2x CPU / 1.6x wall-clock for
    vmap, see ``benchmarks/results/dp_vit.md``. It assumes axis 0 of every
    activation indexes examples (batch-first), the loss sees each chunk as a batch, and with
    ``key`` the dropout draws are the batched forward's (one key per chunk, ``fold_in(key, start)``).

    Args:
        loss_fn: ``(params, batch[, key=]) -> losses (B,)`` (or ``(losses, aux)`` with ``has_aux``);
            each example is passed as a batch of one.
        params: the parameter tree.
        batch: pytree of tensors with a leading example axis ``B``.
        trainable: which leaves get gradients (see the module docstring); frozen leaves give ``None``.
        key: per-example keys ``fold_in(key, i)``; ``None`` calls ``loss_fn`` without a key.
        chunk_size: examples per vmap call (bounds the memory of the intermediates; the result
            itself holds ``B x`` the trainable parameters).
        has_aux: ``loss_fn`` returns ``(losses, aux)``; aux (e.g. a new model state) comes back
            stacked per example, ``(B, ...)`` per tensor leaf (``"trace"``: the batch's aux, a list
            of them per chunk when chunked).
        method: ``"vmap"`` or ``"trace"`` (see above).

    Returns:
        A tree shaped like ``params`` with ``(B, *p.shape)`` leaves (``None`` where frozen), or
        ``(grads, aux)`` with ``has_aux``.
    """
    names = trainable_names(params, trainable)
    parts, auxs = [], []
    if method == "trace":
        from .ghost import ghost_clip

        _check_chunk(chunk_size)
        n = batch_size(batch)
        step = max(n, 1) if chunk_size is None else chunk_size
        for start in range(0, max(n, 1), step):
            k = key if key is None or step >= n else pr.fold_in(key, start)
            out = ghost_clip(loss_fn, params, _slice(batch, start, min(n, start + step)), max_grad_norm=None,
                             trainable=names.__contains__, key=k, has_aux=has_aux, materialize_all=True)
            parts.append(pytree.flatten(out.grads))
            auxs.append(out.aux)
        if has_aux and len(auxs) > 1:
            auxs = [auxs]  # the batched loss's aux per chunk, as a list
    elif method == "vmap":
        for g, _, aux in iter_chunks(loss_fn, params, names, batch, key, chunk_size, has_aux):
            parts.append(g)
            auxs.append(aux)
    else:
        raise ValueError(f"per_sample_grads: method must be 'vmap' or 'trace', got {method!r}")
    flat = parts[0] if len(parts) == 1 else {k: torch.cat([p[k] for p in parts]) for k in names}
    grads = grads_tree(params, flat)
    return (grads, cat_aux(auxs)) if has_aux else grads


def per_sample_grad_norms(loss_fn: Callable, params: Params, batch: Any, *, trainable: Trainable = None,
                          key: Tensor | None = None, chunk_size: int | None = None, has_aux: bool = False,
                          method: str = "ghost") -> Any:
    """L2 norms ``(B,)`` of the per-example gradients (over all trainable leaves together).

    ``method="ghost"`` (default) never materialises the per-example gradients of the layers it
    knows (linear, conv, embedding, norms' affine parameters, broadcast parameters such as
    position embeddings; see :mod:`polymodal.train.dp.ghost`) and computes the rest exactly with
    vmap; ``method="vmap"`` computes every per-example gradient chunk by chunk and keeps only the
    norms. With ``key`` the two methods draw dropout differently (one key for the batch vs one
    per example), so compare them with ``key=None``. Returns ``norms`` or ``(norms, aux)``.
    """
    if method == "ghost":
        from .ghost import ghost_clip

        out = ghost_clip(loss_fn, params, batch, max_grad_norm=None, trainable=trainable, key=key,
                         chunk_size=chunk_size, has_aux=has_aux)
        return (out.norms, out.aux) if has_aux else out.norms
    if method != "vmap":
        raise ValueError(f"per_sample_grad_norms: method must be 'ghost' or 'vmap', got {method!r}")
    names = trainable_names(params, trainable)
    norms, auxs = [], []
    for g, _, aux in iter_chunks(loss_fn, params, names, batch, key, chunk_size, has_aux):
        norms.append(torch.stack([sq_norms_of(g[k]) for k in names]).sum(0).sqrt())
        auxs.append(aux)
    out = torch.cat(norms)
    return (out, cat_aux(auxs)) if has_aux else out
