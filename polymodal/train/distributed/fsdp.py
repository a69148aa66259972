"""The second sharding route: ``torch.distributed.fsdp.fully_shard`` (FSDP2) over a shell, block by block.

:func:`fully_shard_shell` applies ``fully_shard`` to every block of every stack in a
``polymodal.nn`` shell (the ``ShellNode`` children of the list levels that the seam runs, as the shell's spec declares them in
``block_stacks()``) and then to the root. FSDP2 all-gathers a
module's parameters in its forward pre-hook and reshards them after, so the core has to
*call* each block's node: :func:`node_policy` is the seam policy that maps block ``i``'s
params to its node and runs the block as ``node(fn, x, key, extra)``; ``fully_shard_shell``
installs it for the duration of every forward of the shell, around whatever policy is
active (e.g. activation checkpointing), so plain ``shell(inputs)`` does the right thing.

>>> import torch
>>> from polymodal.core.layers.seam import run_layers, use_policy
>>> from polymodal.nn.shell import ShellNode
>>> stack = ShellNode([{"lin": {"w": torch.tensor([2.0])}}])
>>> calls = []
>>> _ = getattr(stack, "0").register_forward_pre_hook(lambda m, a: calls.append("hook"))
>>> with use_policy(node_policy(stack, stacks=[""])):  # the node itself is the stack
...     y, _ = run_layers(lambda i, p, x, k, e: (x * p["lin"]["w"], None), stack.params, torch.ones(1))
>>> y.detach().tolist(), calls
([2.0], ['hook'])
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from polymodal.core.layers.seam import Policy, compose, current_policy, use_policy
from polymodal.core.spec import Spec
from polymodal.nn.shell import ShellNode
from polymodal.train.distributed.sharding import MixedPrecision, check_mesh, block_stacks

__all__ = ["fully_shard_shell", "node_policy", "block_nodes"]


def _declared(shell: nn.Module, stacks: Iterable[str] | None) -> list[str]:
    if stacks is not None:
        return block_stacks(stacks)
    if not isinstance(getattr(shell, "spec", None), Spec):
        raise TypeError(f"expected a polymodal.nn shell (with a .spec declaring its block_stacks()) or explicit "
                        f"stacks, got {type(shell).__name__}")
    return block_stacks(shell.spec)


def block_nodes(shell: nn.Module, stacks: Iterable[str] | None = None) -> list[nn.Module]:
    """The block modules of ``shell``: the children of each stack's list node (default: the stacks
    its spec declares, ``shell.spec.block_stacks()``)."""
    paths = _declared(shell, stacks)
    out = []
    for path in paths:
        try:
            node = shell.get_submodule(path)
        except AttributeError as e:
            raise KeyError(f"block_nodes: no stack {path!r} in the shell (declared stacks: {paths})") from e
        if not (isinstance(node, ShellNode) and node._is_list):
            raise TypeError(f"block_nodes: {path!r} is not a list level of the shell's params")
        out.extend(node.children())
    return out


def node_policy(shell: nn.Module, stacks: Iterable[str] | None = None) -> Policy:
    """Seam policy running each block through its ``ShellNode`` (so module hooks such as FSDP2's fire).

    A block is recognised by the identity of its parameters (the live leaves of the node,
    sharded DTensors under FSDP2); blocks of other trees run as they are.
    """
    owner: dict[int, nn.Module] = {}
    for node in block_nodes(shell, stacks):
        for p in node.parameters():
            owner[id(p)] = node

    def policy(call, index, params, x, key, extra):
        node = None
        for leaf in _first_leaves(params):
            node = owner.get(id(leaf))
            break
        if node is None:
            return call(params, x, key, extra)
        return node(call, x, key, extra)

    return policy


def _first_leaves(tree: Any):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _first_leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from _first_leaves(v)
    elif tree is not None:
        yield tree


def _replicate_scalar(p: nn.Parameter, mesh: DeviceMesh) -> None:
    import torch
    import torch.distributed as dist

    group = mesh.get_group()
    with torch.no_grad():
        p.data = p.data.to(mesh.device_type)
        dist.broadcast(p.data, src=dist.get_global_rank(group, 0), group=group)

    def average(param: torch.Tensor) -> None:
        # Averaging an already averaged (identical) grad again is a no-op, so accumulation stays right.
        dist.all_reduce(param.grad, group=group)
        param.grad.div_(dist.get_world_size(group))

    p.register_post_accumulate_grad_hook(average)


def fully_shard_shell(
    shell: nn.Module,
    mesh: DeviceMesh,
    *,
    mp_policy: MixedPrecision | Any | None = None,
    reshard_after_forward: bool = True,
    stacks: Iterable[str] | None = None,
) -> nn.Module:
    """``fully_shard`` every block of ``shell`` and the root, and route the seam through the blocks.

    Args:
        shell: a ``polymodal.nn`` shell (a ``Shell`` over a spec whose stacks use the seam).
        mesh: a 1-D DeviceMesh (:func:`polymodal.train.mesh_from_env`).
        mp_policy: a :class:`~polymodal.train.distributed.sharding.MixedPrecision` or FSDP2 ``MixedPrecisionPolicy``.
        reshard_after_forward: free each block's gathered params after its forward (FSDP2's option).
        stacks: flat-key paths of the stacks (default: those the shell's spec declares, ``spec.block_stacks()``).

    Returns:
        ``shell`` itself, now an FSDP module: its parameters are sharded DTensors, except 0-d ones
        (which FSDP2 refuses): those stay plain tensors, replicated, with gradients averaged over
        the mesh by a hook.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    check_mesh(mesh)
    if not isinstance(shell, ShellNode):
        raise TypeError(f"fully_shard_shell: expected a polymodal.nn shell, got {type(shell).__name__}")
    if isinstance(mp_policy, MixedPrecision):
        mp_policy = mp_policy.to_fsdp()
    mp_policy = mp_policy or MixedPrecisionPolicy()
    stacks = _declared(shell, stacks)
    # FSDP2 refuses 0-d parameters (CLIP's logit_scale): keep them replicated and average their grads.
    scalars = {p for p in shell.parameters() if p.dim() == 0}
    for p in scalars:
        _replicate_scalar(p, mesh)
    for node in block_nodes(shell, stacks):
        fully_shard(node, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward,
                    ignored_params=scalars)
    fully_shard(shell, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward,
                ignored_params=scalars)
    route = node_policy(shell, stacks)

    active: list = []

    def push(module, args):
        # Around whatever policy is active: checkpointing then runs inside the node, under FSDP's hooks.
        ctx = use_policy(compose(route, current_policy()))
        ctx.__enter__()
        active.append(ctx)

    def pop(module, args, output):
        if active:
            active.pop().__exit__(None, None, None)

    shell.register_forward_pre_hook(push)
    shell.register_forward_hook(pop, always_call=True)
    return shell
