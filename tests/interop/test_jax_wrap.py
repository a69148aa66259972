"""``from_jax_function``: a JAX loss and optax's update used from torch, against torch references
(torch's own cross-entropy and ``torch.optim.AdamW``)."""

from __future__ import annotations

import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")

import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from jax_testing import clip_loss_jax  # noqa: E402
from polymodal.core import pytree  # noqa: E402
from polymodal.core import random as pr  # noqa: E402
from polymodal.core.layers import MLP  # noqa: E402
from polymodal.interop.jax import from_jax_function, tree_to_torch  # noqa: E402


def test_jax_loss_on_clip_outputs_under_torch_func_grad(clip_tiny):
    clip, params, images, tokens, _, want = clip_tiny
    jloss = from_jax_function(clip_loss_jax)
    got = torch.func.grad(lambda p: jloss(clip(p, images, tokens)))(params)
    for k, v in pytree.flatten(want).items():
        torch.testing.assert_close(pytree.flatten(got)[k], v, atol=1e-5, rtol=1e-5)
    p = pytree.tree_map(lambda t: t.clone().requires_grad_(), params)  # plain autograd too
    jloss(clip(p, images, tokens)).backward()
    torch.testing.assert_close(p["logit_scale"].grad, want["logit_scale"], atol=1e-5, rtol=1e-5)


def test_integer_inputs_and_outputs_are_not_differentiated():
    f = from_jax_function(lambda x, labels: (optax.softmax_cross_entropy_with_integer_labels(x, labels).mean(),
                                             jnp.argmax(x, -1)))
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 3, 2, 4], dtype=torch.int32)
    loss, pred = f(x, labels)
    assert pred.dtype == torch.int32 and torch.equal(pred, x.argmax(-1).int())
    want = torch.func.grad(lambda x: F.cross_entropy(x, labels.long()))(x)
    torch.testing.assert_close(torch.func.grad(lambda x: f(x, labels)[0])(x), want, atol=1e-6, rtol=1e-5)


def test_per_sample_gradients_through_a_jax_function():
    mlp = MLP(6, 1, hidden_dims=(8,), activation="tanh")
    params = mlp.init(key=pr.key(1))
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    jsq = from_jax_function(lambda y: jnp.sum(y ** 2))
    per = torch.func.vmap(torch.func.grad(lambda p, x: jsq(mlp(p, x))), in_dims=(None, 0))(params, x)
    want = torch.func.vmap(torch.func.grad(lambda p, x: mlp(p, x).square().sum()), in_dims=(None, 0))(params, x)
    for k, v in pytree.flatten(want).items():
        torch.testing.assert_close(pytree.flatten(per)[k], v, atol=1e-6, rtol=1e-5)


def test_optax_adamw_update_on_polymodal_params_equals_torch_adamw():
    mlp = MLP(6, 3, hidden_dims=(8,), activation="gelu")
    params = mlp.init(key=pr.key(2))
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(3))
    loss = lambda p: mlp(p, x).square().mean()  # noqa: E731
    lr, wd = 1e-2, 0.1
    opt = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=wd)

    def step(grads, state, params):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    jstep = from_jax_function(step)
    state = tree_to_torch(opt.init(pytree.to_jax(params)))  # optax's state (NamedTuples) as tensors
    ref = pytree.tree_map(lambda t: t.clone().requires_grad_(), params)
    torch_opt = torch.optim.AdamW(pytree.leaves(ref), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    p = params
    for _ in range(3):
        p, state = jstep(torch.func.grad(loss)(p), state, p)
        torch_opt.zero_grad()
        loss(ref).backward()
        torch_opt.step()
    for k, v in pytree.flatten(ref).items():
        torch.testing.assert_close(pytree.flatten(p)[k], v.detach(), atol=1e-6, rtol=1e-5)
