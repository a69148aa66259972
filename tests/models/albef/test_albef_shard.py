"""ALBEF under sharded training (one gloo rank in this process): params as DTensors, gathered block by
block at the seam (``gather_rest`` for the rest, as the loop's ``--shard``), momentum copies stored sharded
like the params. Two training steps equal the plain single-process ones: loss, gradients, updated params,
momentum copies, queues (the VQA task: loss, gradients, params, momentum copies). Activation checkpointing
(``--checkpointing``) changes nothing either. The two-rank numerics through the command line are in
``test_albef_distributed.py`` (slow)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from polymodal.core import pytree
from polymodal.core import random as pr
from polymodal.core.layers.seam import use_policy
from polymodal.models.albef.momentum import momentum_like, momentum_update, shard_momentum
from polymodal.train.distributed.sharding import full_params, gather_rest, shard_params
from polymodal.train.loop import LoopConfig
from polymodal.train.policy import training_policy
from polymodal.train.task import make_task

LR = 0.05


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    store = tmp_path_factory.mktemp("albef_shard") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_momentum_update_takes_the_sharded_params_placement(mesh):
    from torch.distributed.tensor import DTensor, Shard

    mom = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), "b": torch.tensor([0.0, 10.0])}
    par = {"w": torch.full((3, 2), 2.0), "b": torch.tensor([4.0, 0.0])}
    by_hand = {"w": [[1.1, 2.0], [2.9, 3.8], [4.7, 5.6]], "b": [0.4, 9.0]}  # 0.9 * mom + 0.1 * par
    sharded = shard_params(par, mesh)
    for got in (momentum_update(mom, sharded, 0.9),  # plain copies, sharded params
                momentum_update(shard_momentum(mom, mesh), par, 0.9),  # sharded copies, gathered params
                momentum_update(shard_momentum(mom, mesh), sharded, 0.9)):
        for k, v in got.items():
            assert isinstance(v, DTensor) and v.placements == (Shard(0),) and not v.requires_grad, k
            torch.testing.assert_close(v.full_tensor(), torch.tensor(by_hand[k]))
    # momentum_like: the form of each param (sharded where it is, a full plain tensor where it is not)
    mixed = momentum_like(shard_momentum(mom, mesh), {"w": sharded["w"], "b": par["b"]})
    assert isinstance(mixed["w"], DTensor) and type(mixed["b"]) is torch.Tensor
    assert torch.equal(mixed["b"], mom["b"]) and torch.equal(mixed["w"].full_tensor(), mom["w"])


def _task(family="albef", batch_size=8):
    loop = LoopConfig(steps=2, batch_size=batch_size, progress=False)
    return make_task(family, "tiny", {"train_size": 16, "eval_size": 8}, loop)


def _steps(task, params, state, sharded, checkpoint_every, mesh):
    """Two SGD steps of the task's loss on the first two global batches; returns (losses, grads of step 1,
    params, state), all gathered to plain tensors."""
    leaves = pytree.flatten(shard_params(params, mesh) if sharded else params)
    if not sharded:
        leaves = {k: v.detach().clone().requires_grad_() for k, v in leaves.items()}
    opt = torch.optim.SGD(list(leaves.values()), lr=LR, foreach=False)
    losses, grads = [], None
    policy = training_policy(sharded=sharded, checkpoint_every=checkpoint_every)
    for step, batch in enumerate(task.train_batches(0, 0, 1)):
        opt.zero_grad(set_to_none=True)
        p = pytree.unflatten(leaves)
        if sharded:
            p = gather_rest(p, stacks=task.model)
            # the loop's form: block stacks sharded (gathered at the seam), the rest gathered
            assert type(p["model"]["text"]["encoder"]["layers"][0]["self_attn"]["in_proj_weight"]).__name__ == "DTensor"
            assert type(p["model"]["text"]["embeddings"]["word_embeddings"]["weight"]) is torch.Tensor
        with use_policy(policy):
            res = task.loss(p, state, batch, pr.fold_in(pr.key(7), step))
        res.loss.backward()
        opt.step()
        losses.append(float(res.loss.detach()))
        state = pytree.tree_map(lambda t: t.detach(), res.state)
        if sharded:
            kinds = {type(t).__name__ for t in pytree.leaves(state["momentum"])}
            assert kinds == {"DTensor"}, kinds  # stored sharded, every copy
        if grads is None:
            grads = full_params({k: v.grad for k, v in leaves.items() if v.grad is not None})
    return losses, grads, pytree.flatten(full_params(pytree.unflatten(leaves))), pytree.flatten(full_params(state))


@pytest.fixture(scope="module")
def plain(mesh):
    task = _task()
    params, state = task.init(pr.key(0))
    return task, params, state, _steps(task, params, state, False, 0, mesh)


@pytest.mark.distributed
@pytest.mark.parametrize("sharded,every", [(True, 0), (True, 1), (False, 1)], ids=["shard", "shard_ckpt", "ckpt"])
def test_sharded_and_checkpointed_steps_equal_plain(mesh, plain, sharded, every):
    task, params, state, (ref_losses, ref_grads, ref_params, ref_state) = plain
    losses, grads, new_params, new_state = _steps(task, params, state, sharded, every, mesh)
    assert losses == pytest.approx(ref_losses, abs=1e-5, rel=0)
    assert grads.keys() == ref_grads.keys() and len(grads) > 50
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-5, rtol=1e-5, msg=lambda m: f"grad {k}: {m}")
    for got, ref, what in ((new_params, ref_params, "param"), (new_state, ref_state, "state")):
        assert got.keys() == ref.keys()
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=1e-5, msg=lambda m: f"{what} {k}: {m}")
    assert new_state["queue_ptr"].tolist() == [16]  # two global batches of 8 enqueued
    # the step moved the copies off the params (0.995 EMA of params that changed)
    assert not torch.equal(new_state["momentum.text_proj.weight"], new_params["text_proj.weight"])


@pytest.mark.distributed
def test_vqa_sharded_checkpointed_steps_equal_plain(mesh):
    task = _task("albef-vqa")
    params, state = task.init(pr.key(0))
    ref = _steps(task, params, state, False, 0, mesh)
    got = _steps(task, params, state, True, 1, mesh)
    assert got[0] == pytest.approx(ref[0], abs=1e-5, rel=0)
    for a, b, what in zip(got[1:], ref[1:], ("grad", "param", "state")):
        assert a.keys() == b.keys()
        for k in b:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5, msg=lambda m: f"{what} {k}: {m}")
    k = "momentum.model.text.encoder.layers.0.self_attn.in_proj_weight"
    assert not torch.equal(got[3][k], got[2][k.removeprefix("momentum.")])
