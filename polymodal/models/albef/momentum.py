"""ALBEF's explicit state: momentum (EMA) copies of the encoders and feature queues with their pointer.

TorchMultimodal keeps these as module buffers and ``requires_grad=False`` copies updated in place;
here they are a pytree passed in and returned (DESIGN.md, convention 4)::

    state = {"momentum": <the momentum subtree of params>,
             "image_queue": (E, Q), "text_queue": (E, Q),    # unit columns, TorchMultimodal's layout
             "idx_queue": (1, Q) int64,                       # sample ids (-100: empty slot)
             "queue_ptr": (1,) int64}                         # next slot to write

Under sharded training (the loop's ``--shard``) the copies are DTensors placed like the params
(:func:`shard_momentum`, :func:`momentum_like`; :func:`momentum_update` takes a DTensor param's placement);
the queues stay replicated: every rank enqueues all ranks' features (:func:`gather_features`).

>>> import torch
>>> p, m = {"w": torch.ones(2)}, {"w": torch.zeros(2)}
>>> momentum_update(m, p, 0.9)["w"].tolist()
[0.10000000149011612, 0.10000000149011612]
>>> s = init_queues(embed_size=4, queue_size=6, key=torch.tensor([0, 1]))
>>> s2 = enqueue(s, torch.ones(2, 4), torch.ones(2, 4), torch.tensor([7, 8]))
>>> s2["idx_queue"].tolist(), s2["queue_ptr"].tolist()
([[7, 8, -100, -100, -100, -100]], [2])
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core import random as pr
from ...core.losses.contrastive import gather_embeddings
from ...core.pytree import Params, leaves, tree_map

__all__ = ["momentum_update", "copy_momentum", "init_queues", "enqueue", "gather_features", "check_queue",
           "momentum_like", "shard_momentum", "mesh_of", "with_momentum_form"]


def _dtensor() -> Any:
    """The DTensor class, or ``()`` while ``torch.distributed.tensor`` is not imported (then no leaf is a
    DTensor, and this module does not pay for importing it)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod.DTensor if mod is not None else ()


def _local_shard(t: Tensor, like: Any) -> Any:
    """``t`` (this rank's full value, the same on every rank) as a DTensor placed like the DTensor ``like``:
    each rank keeps its own slice, without communication."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(t.detach(), like.device_mesh, like.placements, src_data_rank=None)


def _ema(a: Tensor, b: Tensor, m: float) -> Tensor:
    # Sharded params (DTensors): the copy takes their placement (a plain copy is sliced locally, as it holds
    # the full value on every rank); a sharded copy of a plain (gathered) param slices the param instead.
    dt = _dtensor()
    if isinstance(b, dt) and not isinstance(a, dt):
        a = _local_shard(a, b)
    elif isinstance(a, dt) and not isinstance(b, dt):
        b = _local_shard(b, a)
    elif isinstance(a, dt) and a.placements != b.placements:
        a = a.redistribute(b.device_mesh, b.placements)
    # One fresh tensor, then accumulated into in place (the inputs are untouched): the three full-size
    # temporaries of ``m * a + (1 - m) * b`` cost more than the arithmetic on 200M-parameter trees.
    return (b.detach() * (1 - m)).add_(a.detach(), alpha=m)


def momentum_update(momentum: Params, params: Params, m: float) -> Params:
    """``m * momentum + (1 - m) * params`` leaf by leaf (TorchMultimodal's ``momentum_update``); pure.

    Args:
        momentum: the EMA copies (any tree). params: the live tree of the same structure.
        m: the momentum (0.995 for ALBEF).
    Returns:
        the new EMA tree (detached: momentum copies never receive gradients). Under sharded training
        a leaf is a DTensor when either input is: a DTensor param makes its copy a DTensor of the same
        placement (a plain copy, the same full value on every rank, is sliced locally: no
        communication); a DTensor copy of a plain param keeps its placement.
    """
    return tree_map(lambda a, b: _ema(a, b, m), momentum, params)


def mesh_of(tree: Params) -> Any:
    """The device mesh of the first DTensor leaf of ``tree`` (None when no leaf is sharded)."""
    dt = _dtensor()
    for t in leaves(tree):
        if isinstance(t, dt):
            return t.device_mesh
    return None


def momentum_like(momentum: Params, params: Params) -> Params:
    """Each momentum copy in the form its param has: the param's placement where it is a DTensor (a plain
    copy is sliced locally), a full plain tensor where it is not (a sharded copy is all-gathered:
    collective, every rank calls it). Sharded training's loss sees the block stacks sharded (gathered
    block by block at the seam) and the rest gathered; the momentum forward then sees the same."""
    dt = _dtensor()

    def like(a: Tensor, b: Tensor) -> Tensor:
        if isinstance(b, dt):
            return _local_shard(a, b) if not isinstance(a, dt) else a.redistribute(b.device_mesh, b.placements)
        return a.full_tensor() if isinstance(a, dt) else a

    return tree_map(like, momentum, params)


def shard_momentum(momentum: Params, mesh: Any) -> Params:
    """Every copy as a DTensor placed as the loop's :func:`~polymodal.train.distributed.sharding.shard_params`
    places params (``Shard(0)``; 0-d leaves ``Replicate``), so the momentum state's memory scales with the
    ranks like the params'. Plain leaves must hold the same full value on every rank (they do: copies
    made from gathered params, or loaded from one checkpoint): each rank keeps its slice, no communication."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    def shard(t: Tensor) -> Tensor:
        if isinstance(t, DTensor):
            return t.detach()
        placement = Shard(0) if t.dim() > 0 else Replicate()
        return distribute_tensor(t.detach(), mesh, [placement], src_data_rank=None)
    return tree_map(shard, momentum)


def with_momentum_form(fn, state: Params, params: Params, momentum_params: Params):
    """``fn(state) -> (out, new_state)`` with the momentum copies in the form the model sees them: unchanged
    when nothing is sharded; under ``--shard`` (``params`` holding DTensors) the copies are handed over
    like ``momentum_params`` (:func:`momentum_like`) and stored back sharded like the loop's params
    (:func:`shard_momentum`). The one place both ALBEF tasks step their state through."""
    mesh = mesh_of(params)
    if mesh is None:
        return fn(state)
    out, new = fn({**state, "momentum": momentum_like(state["momentum"], momentum_params)})
    return out, {**new, "momentum": shard_momentum(new["momentum"], mesh)}


def copy_momentum(params: Params) -> Params:
    """Fresh momentum copies: detached clones of ``params`` (ALBEF's ``copy.deepcopy`` at construction)."""
    return tree_map(lambda t: t.detach().clone(), params)


def init_queues(*, embed_size: int, queue_size: int, key: Tensor, device: torch.device | str | None = None,
                empty_id: int = -100) -> Params:
    """Random unit feature queues ``(E, Q)`` (TorchMultimodal: ``normalize(randn(E, Q), dim=0)``), ids
    ``empty_id`` and pointer 0."""
    ki, kt = pr.split(key, 2)
    img = F.normalize(pr.normal(ki, (embed_size, queue_size)), dim=0)
    txt = F.normalize(pr.normal(kt, (embed_size, queue_size)), dim=0)
    out = {"image_queue": img, "text_queue": txt,
           "idx_queue": torch.full((1, queue_size), empty_id, dtype=torch.long),
           "queue_ptr": torch.zeros(1, dtype=torch.long)}
    return out if device is None else {k: v.to(device) for k, v in out.items()}


def check_queue(queue_size: int, global_batch: int, owner: str = "ALBEF") -> None:
    """The queue must hold a whole number of global batches (the pointer wraps to 0 exactly)."""
    if global_batch <= 0 or queue_size % global_batch:
        raise ValueError(f"{owner}: queue_size {queue_size} is not divisible by the global batch size "
                         f"{global_batch}; expected a global batch that divides {queue_size}")


def gather_features(*xs: Tensor) -> tuple[Tensor, ...]:
    """Every rank's rows concatenated in rank order (no gradient): what the queues receive under
    data-parallel or sharded training (the identity without a process group)."""
    return tuple(gather_embeddings(x.detach(), "none")[0] for x in xs)


def enqueue(state: Params, image_feat: Tensor, text_feat: Tensor, idx: Tensor) -> Params:
    """Write ``(N, E)`` features and ``(N,)`` ids at the pointer and advance it by ``N`` modulo ``Q``.

    ``N`` is the global batch (already gathered, :func:`gather_features`); the write is an
    out-of-place ``index_copy`` at ``(ptr + arange(N)) % Q``, so no value is read in Python.
    Returns the new state (other entries kept).
    """
    q = state["image_queue"].shape[1]
    n = image_feat.shape[0]
    check_queue(q, n, "enqueue")
    if text_feat.shape[0] != n or idx.reshape(-1).shape[0] != n:
        raise ValueError(f"enqueue: expected {n} text features and ids (as image features), got "
                         f"{text_feat.shape[0]} and {idx.reshape(-1).shape[0]}")
    ptr = state["queue_ptr"]
    slots = (ptr + torch.arange(n, device=ptr.device)) % q
    iq = state["image_queue"].index_copy(1, slots, image_feat.detach().T.to(state["image_queue"].dtype))
    tq = state["text_queue"].index_copy(1, slots, text_feat.detach().T.to(state["text_queue"].dtype))
    dq = state["idx_queue"].index_copy(1, slots, idx.reshape(1, -1).to(state["idx_queue"].dtype))
    return {**state, "image_queue": iq, "text_queue": tq, "idx_queue": dq, "queue_ptr": (ptr + n) % q}
