"""Sharded training over parameter pytrees: FSDP expressed as functions at the block seam.

:func:`shard_params` turns every leaf into a DTensor sharded ``Shard(0)`` over a 1-D
:class:`~torch.distributed.device_mesh.DeviceMesh` (each rank keeps ~1/N of every
parameter; dims not divisible by N shard unevenly; 0-d leaves are replicated).
``torch.optim.AdamW`` steps on those leaves directly, so master weights and optimizer
state stay sharded, in the leaves' dtype (fp32).

During a step, each block's parameters are gathered just before the block runs by
:func:`gather_policy`, installed at the seam (``polymodal.core.layers.seam``), and the
rest of the tree (embeddings, heads, logit scale) once per step by :func:`gather_rest`.
A gather is torchtitan SimpleFSDP's one-liner::

    p.redistribute(placements=[Replicate()], forward_dtype=param_dtype, backward_dtype=reduce_dtype)
     .to_local(grad_placements=[Partial("avg")])

so autograd turns the forward all-gather into a backward reduce-scatter that averages the
gradients of the ranks (each rank's loss is the mean over its share of the batch, so the
sharded gradient is the gradient of the global-batch mean). Composed inside activation
checkpointing (``compose(checkpoint_policy(), gather_policy())``, see
``polymodal.train.policy``) the gathered parameters are freed after each block's
forward and gathered again for its recomputation.

>>> import torch
>>> from polymodal.core.layers.seam import run_layers, use_policy
>>> blocks = [{"w": torch.tensor([2.0])}, {"w": torch.tensor([3.0])}]  # plain leaves pass through
>>> with use_policy(gather_policy(MixedPrecision(param_dtype=torch.float64))):
...     y, _ = run_layers(lambda i, p, x, k, e: (x * p["w"], None), blocks, torch.ones(1))
>>> y.dtype, float(y)
(torch.float64, 6.0)
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from polymodal.core.pytree import Params, leaves, tree_map
from polymodal.core.spec import Spec
from polymodal.core.layers.seam import Policy

__all__ = [
    "MixedPrecision",
    "shard_params",
    "full_params",
    "local_bytes",
    "gather",
    "gather_policy",
    "gather_rest",
    "block_stacks",
]


@dataclass(frozen=True)
class MixedPrecision:
    """Dtypes of a sharded step; master weights and optimizer state keep the leaves' dtype (fp32).

    >>> MixedPrecision(torch.bfloat16, torch.float32).param_dtype
    torch.bfloat16
    """

    param_dtype: torch.dtype | None = None  # dtype gathered params (and block inputs) are computed in; None: as stored
    reduce_dtype: torch.dtype | None = None  # dtype gradients are reduce-scattered in; None: the stored dtype

    def __post_init__(self) -> None:
        for name in ("param_dtype", "reduce_dtype"):
            d = getattr(self, name)
            if d is not None and (not isinstance(d, torch.dtype) or not d.is_floating_point):
                raise TypeError(f"MixedPrecision: {name}: expected a floating torch.dtype or None, got {d!r}")

    def to_fsdp(self) -> Any:
        """The equivalent ``torch.distributed.fsdp.MixedPrecisionPolicy``."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)


def check_mesh(mesh: Any) -> DeviceMesh:
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"expected a torch.distributed DeviceMesh (see polymodal.train.mesh_from_env), got {type(mesh).__name__}")
    if mesh.ndim != 1:
        raise ValueError(f"expected a 1-D DeviceMesh, got {mesh.ndim}-D with shape {tuple(mesh.shape)}")
    return mesh


def shard_params(params: Params, mesh: DeviceMesh, *, requires_grad: bool = True) -> Params:
    """Every leaf as a DTensor sharded ``Shard(0)`` over the 1-D ``mesh`` (0-d leaves: ``Replicate``).

    Rank 0's values are scattered, so ranks need not agree on the input. Floating leaves come
    back as fresh autograd leaves (``requires_grad``), ready for ``torch.optim``.

    >>> shard_params({"w": torch.ones(3)}, mesh=None)
    Traceback (most recent call last):
    ...
    TypeError: expected a torch.distributed DeviceMesh (see polymodal.train.mesh_from_env), got NoneType
    """
    check_mesh(mesh)

    def shard(t: Tensor) -> DTensor:
        if isinstance(t, DTensor):
            raise TypeError(f"shard_params: leaf is already a DTensor with placements {t.placements}")
        placement = Shard(0) if t.dim() > 0 else Replicate()
        # (a replicated leaf would otherwise share storage with ``t``, and the optimizer mutate it)
        d = distribute_tensor(t.detach().to(mesh.device_type, copy=True), mesh, [placement])
        return d.requires_grad_(requires_grad and d.is_floating_point())

    return tree_map(shard, params)


def full_params(params: Params) -> Params:
    """The full (unsharded) values of a sharded tree as plain, detached tensors (collective: all ranks call it)."""
    return tree_map(lambda t: (t.full_tensor() if isinstance(t, DTensor) else t).detach(), params)


def local_bytes(obj: Params | torch.nn.Module | torch.optim.Optimizer) -> int:
    """Bytes this rank stores for a (sharded) param tree, a module's parameters or an optimizer's state."""
    if isinstance(obj, torch.nn.Module):
        ts = list(obj.parameters())
    elif isinstance(obj, torch.optim.Optimizer):
        ts = [v for st in obj.state.values() for v in st.values() if isinstance(v, Tensor)]
    else:
        ts = leaves(obj)
    total = 0
    for t in ts:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


class _MeanGrad(torch.autograd.Function):
    """Identity whose backward averages the gradient over ``group`` (in ``dtype``).

    Replicated leaves need it: ``to_local(grad_placements=[Partial()])`` of an already
    replicated DTensor leaves a Partial gradient that no collective ever reduces.
    """

    @staticmethod
    def forward(ctx, x: Tensor, group: Any, dtype: torch.dtype | None) -> Tensor:
        ctx.group, ctx.dtype = group, dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, None, None]:
        import torch.distributed as dist

        out = g.to(ctx.dtype or g.dtype, copy=True).contiguous()
        dist.all_reduce(out, group=ctx.group)
        return (out / dist.get_world_size(ctx.group)).to(g.dtype), None, None


_HAS_DTYPES = "forward_dtype" in inspect.signature(DTensor.redistribute).parameters


def _replicate(t: DTensor, param_dtype: torch.dtype | None, reduce_dtype: torch.dtype | None) -> DTensor:
    """``t`` all-gathered (computed in ``param_dtype``; its gradient reduced in ``reduce_dtype``)."""
    reps = [Replicate()] * t.device_mesh.ndim
    if _HAS_DTYPES:
        return t.redistribute(placements=reps, forward_dtype=param_dtype, backward_dtype=reduce_dtype)
    # torch without redistribute(forward_dtype=...): cast around the gather. The gradient is
    # reduced in the dtype the gather ran in, so gather in param_dtype only when that is also
    # the reduction dtype, else gather as stored and cast after.
    if param_dtype is None or param_dtype == t.dtype:
        return t.redistribute(placements=reps)
    if reduce_dtype == param_dtype:
        return t.to(param_dtype).redistribute(placements=reps)
    return t.redistribute(placements=reps).to(param_dtype)


def _gather_leaf(t: Any, mp: MixedPrecision) -> Any:
    if isinstance(t, DTensor):
        if not t.is_floating_point():
            return t.full_tensor()
        if all(p.is_replicate() for p in t.placements):
            local = t.to_local(grad_placements=t.placements)
            local = _MeanGrad.apply(local, t.device_mesh.get_group(), mp.reduce_dtype)
            return local.to(mp.param_dtype) if mp.param_dtype is not None else local
        full = _replicate(t, mp.param_dtype, mp.reduce_dtype)
        return full.to_local(grad_placements=[Partial("avg")] * t.device_mesh.ndim)
    if isinstance(t, Tensor) and mp.param_dtype is not None and t.is_floating_point():
        return t.to(mp.param_dtype)
    return t


def gather(tree: Any, mp: MixedPrecision | None = None) -> Any:
    """All-gather every DTensor leaf of ``tree`` into a plain tensor (in ``mp.param_dtype``), differentiably.

    The backward of each gather reduce-scatters (averages over ranks) its gradient in
    ``mp.reduce_dtype`` and casts it back to the leaf's dtype. Plain leaves pass through
    (cast to ``mp.param_dtype``).
    """
    mp = mp or MixedPrecision()
    return tree_map(lambda t: _gather_leaf(t, mp), tree)


class _Regather:
    """Saved-tensor hooks of one block: saved (views of) gathered params are dropped after the
    forward and gathered again when the backward unpacks them (FSDP's reshard after forward)."""

    def __init__(self, mp: MixedPrecision) -> None:
        self.mp = mp
        self.sources: dict[int, tuple[DTensor, int]] = {}
        self.cache: dict[int, Any] = {}

    def gather(self, t: Any) -> Any:
        full = _gather_leaf(t, self.mp)
        if isinstance(t, DTensor) and full.numel() and not all(p.is_replicate() for p in t.placements):
            if not full.is_contiguous():
                full = full.contiguous()
            self.sources[full.untyped_storage().data_ptr()] = (t, full.storage_offset())
        return full

    def pack(self, t: Tensor) -> Any:
        src = self.sources.get(t.untyped_storage().data_ptr()) if t.numel() else None
        if src is None:
            return t
        return (_Regather, src[0], t.size(), t.stride(), t.storage_offset() - src[1])

    def unpack(self, saved: Any) -> Tensor:
        if not (isinstance(saved, tuple) and saved and saved[0] is _Regather):
            return saved
        _, d, size, stride, offset = saved
        ref = self.cache.get(id(d))
        full = ref() if ref is not None else None
        if full is None:
            with torch.no_grad():
                full = _replicate(d, self.mp.param_dtype, None).to_local()
                full = torch.empty_like(full, memory_format=torch.contiguous_format).copy_(full)
            self.cache[id(d)] = weakref.ref(full)
        return full.as_strided(size, stride, offset)


def _saved_tensor_hooks_active() -> bool:
    # e.g. inside activation checkpointing, whose own hooks must keep handling the saved tensors
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def gather_policy(mp_policy: MixedPrecision | None = None, *, reshard_after_forward: bool = True) -> Policy:
    """Seam policy: gather each block's parameters just before it runs.

    Args:
        mp_policy: dtypes of the gathered params and the gradient reduction. With
            ``param_dtype`` the block input ``x`` (a floating tensor) is cast too, as FSDP's
            ``cast_forward_inputs`` does.
        reshard_after_forward: do not keep the gathered params between forward and backward:
            autograd's saved references to them become recipes, gathered again in the backward
            (one more all-gather per block, as FSDP). Inside activation checkpointing
            (``compose(checkpoint_policy(), gather_policy())``) the checkpoint already drops
            them and the whole gather is recomputed, so the policy leaves it alone there.
    """
    mp = mp_policy or MixedPrecision()
    if not isinstance(mp, MixedPrecision):
        raise TypeError(f"gather_policy: expected a MixedPrecision or None, got {type(mp).__name__}")

    def policy(call, index, params, x, key, extra):
        if mp.param_dtype is not None and isinstance(x, Tensor) and x.is_floating_point():
            x = x.to(mp.param_dtype)
        if not reshard_after_forward or _saved_tensor_hooks_active():
            return call(gather(params, mp), x, key, extra)
        regather = _Regather(mp)
        local = tree_map(regather.gather, params)
        with torch.autograd.graph.saved_tensors_hooks(regather.pack, regather.unpack):
            return call(local, x, key, extra)

    return policy


def _subtree(params: Params, path: str) -> Any:
    node: Any = params
    for part in path.split(".") if path else ():
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def block_stacks(stacks: Spec | Iterable[str], params: Params | None = None) -> list[str]:
    """The declared block stacks: flat-key paths of the param lists run through the seam.

    Args:
        stacks: a spec (its :meth:`~polymodal.core.spec.Spec.block_stacks` declaration: e.g. a
            ``TransformerEncoder`` declares ``["layers"]``, a ``Swin3D`` its stages but not its
            patch-merging layers) or the paths themselves.
        params: when given, every path must name a list in it.

    >>> from polymodal.core.encoders.swin3d import swin3d
    >>> block_stacks(swin3d(depths=(1, 1), num_heads=(1, 2)))
    ['stages.0', 'stages.1']
    """
    paths = stacks.block_stacks() if isinstance(stacks, Spec) else list(stacks)
    if isinstance(stacks, (str, bytes)) or not all(isinstance(s, str) for s in paths):
        raise TypeError(f"block_stacks: expected a Spec or an iterable of flat-key paths, got {stacks!r:.80}")
    if params is not None:
        bad = [s for s in paths if not isinstance(_subtree(params, s), (list, tuple))]
        if bad:
            raise KeyError(f"block stacks {bad} are not lists in params (declared: {paths}; "
                           f"top-level keys: {sorted(params) if isinstance(params, dict) else type(params).__name__})")
    return paths


def gather_rest(params: Params, mp_policy: MixedPrecision | None = None, *,
                stacks: Spec | Iterable[str] | None = None) -> Params:
    """Gather every leaf outside the block stacks, once per step; stacks stay sharded for the seam.

    Args:
        params: a tree from :func:`shard_params`.
        mp_policy: the mixed-precision policy (the same as the seam's).
        stacks: the spec whose params these are (its declared :meth:`Spec.block_stacks`), or the
            flat-key paths of the lists it runs through the seam (see :func:`block_stacks`). A list
            the model uses outside the seam (Swin's patch-merging layers) must not be named, or its
            DTensor leaves reach ordinary ops (torch raises "mixed torch.Tensor and DTensor").

    Returns:
        The tree with plain tensors outside the stacks and the stacks' DTensors as they were.
    """
    if stacks is None:
        raise TypeError("gather_rest: stacks: expected the spec whose params these are (it declares its "
                        "block_stacks()) or a list of flat-key stack paths, got None")
    mp = mp_policy or MixedPrecision()
    keep = set(block_stacks(stacks, params))

    def walk(t: Any, path: str) -> Any:
        if path[:-1] in keep:
            return t
        if isinstance(t, dict):
            return {k: walk(v, f"{path}{k}.") for k, v in t.items()}
        if isinstance(t, (list, tuple)):
            return type(t)(walk(v, f"{path}{i}.") for i, v in enumerate(t))
        return _gather_leaf(t, mp)

    return walk(params, "")
