"""Omnivore's params as DTensors through the seam (one gloo rank in this process): the stages are
gathered block by block, everything else (patch embeddings, patch-merging layers, norm, heads) by
``gather_rest``; with checkpointing on, loss and gradients equal the plain single-process ones.
The two-rank numerics of the same mechanism are ``tests/train/test_sharding.py`` (Swin3D)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from polymodal.core import random as pr
from polymodal.core.layers.seam import use_policy
from polymodal.core.pytree import flatten, tree_map
from polymodal.models.omnivore import omnivore, omnivore_encoder
from polymodal.train.distributed.sharding import full_params, gather_rest, shard_params
from polymodal.train.policy import training_policy

SPEC = omnivore(omnivore_encoder(embed_dim=8, depths=(2, 1), num_heads=(1, 2), window_size=(2, 2, 2),
                                 stochastic_depth_prob=0.0),
                (("image", "image", 5, 0.0), ("video", "video", 4, 0.0), ("rgbd", "rgbd", 3, 0.0)))


@pytest.fixture
def mesh(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("input_type,shape", [("video", (2, 3, 4, 16, 16)), ("rgbd", (2, 4, 16, 16))])
def test_sharded_checkpointed_grads_equal_plain(mesh, input_type, shape):
    params = SPEC.init(key=pr.key(0))
    x, y = pr.normal(pr.key(1), shape), torch.tensor([1, 2])

    plain = tree_map(lambda t: t.clone().requires_grad_(), params)
    loss0 = F.cross_entropy(SPEC(plain, x, input_type).logits, y)
    loss0.backward()

    sharded = shard_params(params, mesh)
    assert all(isinstance(t, DTensor) for t in flatten(sharded).values())
    local = gather_rest(sharded, stacks=SPEC)  # the encoder's stages stay DTensors for the seam to gather
    assert isinstance(local["encoder"]["stages"][0][0]["norm1"]["weight"], DTensor)
    assert not isinstance(local["encoder"]["merges"][0]["reduction"]["weight"], DTensor)
    with use_policy(training_policy(checkpoint_every=1)):
        loss = F.cross_entropy(SPEC(local, x, input_type).logits, y)
    loss.backward()
    torch.testing.assert_close(loss.detach(), loss0.detach())
    grads = {k: (v.grad.full_tensor() if v.grad is not None else None) for k, v in flatten(sharded).items()}
    for k, v in flatten(plain).items():
        if v.grad is None:
            assert grads[k] is None or float(grads[k].abs().max()) == 0, k
        else:
            torch.testing.assert_close(grads[k], v.grad, atol=1e-6, rtol=1e-5, msg=k)
    assert flatten(full_params(sharded)).keys() == flatten(params).keys()
