"""Activation checkpointing as a policy at the block seam, composable with sharding.

``checkpoint_policy(every)`` (from ``polymodal.core.layers.seam``) wraps every ``every``-th
block in non-reentrant ``torch.utils.checkpoint`` (``every=0``: none, ``1``: every block).
:func:`training_policy` composes it with the per-block parameter gather of sharded training,
checkpoint outside and gather inside, so that

* the gathered (full) parameters of a checkpointed block are not kept between forward and
  backward: only the sharded leaves and the block input are saved;
* the recomputation in the backward gathers the parameters again, and autograd
  reduce-scatters their gradients as usual.

Blocks that are not checkpointed still free their gathered parameters after the forward
(``gather_policy(reshard_after_forward=True)``: saved references are gathered again in the
backward, FSDP's "reshard after forward"), unless ``reshard_after_forward=False``.

>>> import torch
>>> from polymodal.core.layers.seam import run_layers
>>> blocks = [{"w": torch.tensor(2.0, requires_grad=True)} for _ in range(3)]
>>> with use_policy(training_policy(checkpoint_every=1)):
...     y, _ = run_layers(lambda i, p, x, k, e: (torch.sin(x * p["w"]), None), blocks, torch.ones(()))
>>> y.backward(); bool(blocks[0]["w"].grad != 0)
True
"""

from __future__ import annotations

from polymodal.core.layers.seam import Policy, checkpoint_policy, compose, default_policy, use_policy
from polymodal.train.distributed.sharding import MixedPrecision, gather_policy

__all__ = ["checkpoint_policy", "training_policy", "use_policy"]


def training_policy(
    mp_policy: MixedPrecision | None = None,
    *,
    sharded: bool = True,
    checkpoint_every: int = 0,
    offset: int = 0,
    reshard_after_forward: bool = True,
) -> Policy:
    """The seam policy of a training step: gather (when ``sharded``) inside checkpointing (every k-th block).

    Args:
        mp_policy: dtypes of the gathered params and of the gradient reduction.
        sharded: gather DTensor params per block (:func:`~polymodal.train.distributed.sharding.gather_policy`).
        checkpoint_every: checkpoint block ``i`` when ``(i - offset) % checkpoint_every == 0``; 0: never.
        offset: see ``checkpoint_every``.
        reshard_after_forward: blocks that are not checkpointed drop their gathered params
            after the forward and gather them again in the backward.
    """
    if not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise ValueError(f"training_policy: checkpoint_every: expected an int >= 0, got {checkpoint_every!r}")
    inner = gather_policy(mp_policy, reshard_after_forward=reshard_after_forward) if sharded else default_policy
    if checkpoint_every == 0:
        return inner
    return compose(checkpoint_policy(checkpoint_every, offset), inner)
