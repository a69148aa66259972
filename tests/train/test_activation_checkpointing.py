"""Activation checkpointing at the block seam: same gradients, recomputation, fewer saved activations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polymodal.core import random as pr
from polymodal.core.layers import MLP
from polymodal.core.layers.seam import compose, run_layers, use_policy
from polymodal.core.layers.transformer import TransformerEncoder, TransformerEncoderLayer
from polymodal.core.pytree import leaves, tree_map
from polymodal.nn.shell import Shell
from polymodal.train.policy import checkpoint_policy, training_policy


def _encoder(depth: int) -> TransformerEncoder:
    # dropout, attention dropout and drop-path: the recomputation must redraw the same masks from the keys
    layer = TransformerEncoderLayer(8, 2, 12, dropout=0.1, attn_dropout=0.1, activation="gelu", norm_first=True)
    return TransformerEncoder(layer, depth, final_norm=True, drop_path_max=0.2)


def _grads(spec, params, x, policy, key):
    params = tree_map(lambda t: t.detach().clone().requires_grad_(), params)
    with use_policy(policy):
        y = spec(params, x, key=key).last_hidden_state
    loss = (y * torch.linspace(-1, 1, y.shape[-1])).sum()
    loss.backward()
    return loss.detach(), [p.grad for p in leaves(params)]


@settings(max_examples=6, deadline=None)
@given(depth=st.integers(1, 4), every=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_checkpointed_gradients_equal_plain(depth, every, seed):
    spec = _encoder(depth)
    params = spec.init(key=pr.key(seed))
    x = pr.normal(pr.key(seed + 1), (2, 5, 8))
    key = pr.key(seed + 2)
    loss0, g0 = _grads(spec, params, x, checkpoint_policy(0), key)
    for policy in (checkpoint_policy(every), training_policy(sharded=False, checkpoint_every=every)):
        loss, g = _grads(spec, params, x, policy, key)
        assert torch.equal(loss, loss0)
        for a, b in zip(g, g0):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_every_kth_block_is_recomputed():
    calls = []
    mlp = MLP(4, 4, hidden_dims=(6,))
    blocks = [mlp.init(key=k) for k in pr.split(pr.key(0), 5)]

    def block(i, p, h, k, e):
        calls.append(i)
        return torch.tanh(mlp(p, h)), None

    x = torch.randn(3, 4, requires_grad=True)
    for every, recomputed in [(0, []), (1, [4, 3, 2, 1, 0]), (2, [4, 2, 0]), (3, [3, 0])]:
        calls.clear()
        with use_policy(checkpoint_policy(every)):
            y, _ = run_layers(block, blocks, x)
        assert calls == [0, 1, 2, 3, 4]
        y.sum().backward()
        assert calls[5:] == recomputed, every


def test_checkpoint_outside_recomputes_the_inner_policy():
    """compose(checkpoint, inner): the inner policy (e.g. a parameter gather) runs again in the backward."""
    seen = []

    def inner(call, i, p, x, k, e):
        seen.append(i)
        return call(tree_map(lambda t: t * 1.0, p), x, k, e)  # stands for the gather

    blocks = [{"w": torch.tensor(1.5, requires_grad=True)} for _ in range(3)]
    with use_policy(compose(checkpoint_policy(1), inner)):
        y, _ = run_layers(lambda i, p, x, k, e: (torch.sin(x * p["w"]), None), blocks, torch.ones(()))
    assert seen == [0, 1, 2]
    y.backward()
    assert seen == [0, 1, 2, 2, 1, 0]


def _saved_bytes(spec, params, x, policy):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), use_policy(policy):
        y = spec(params, x).last_hidden_state
    return total[0], y


def test_checkpointing_keeps_far_fewer_activations():
    spec = TransformerEncoder(TransformerEncoderLayer(16, 2, 64, norm_first=True), 4)
    params = tree_map(lambda t: t.requires_grad_(), spec.init(key=pr.key(0)))
    x = torch.randn(2, 32, 16)
    plain, y0 = _saved_bytes(spec, params, x, checkpoint_policy(0))
    every, y1 = _saved_bytes(spec, params, x, checkpoint_policy(1))
    half, _ = _saved_bytes(spec, params, x, checkpoint_policy(2))
    assert torch.equal(y0, y1)
    # checkpointed blocks keep only their input (saved through the same hooks), not their activations
    assert every == 4 * x.numel() * x.element_size()
    assert every < plain / 20
    assert half == pytest.approx((plain + every) / 2, rel=0.01)


def test_shell_under_checkpoint_policy_matches():
    spec = _encoder(3)
    x = torch.randn(2, 4, 8)
    grads = []
    for policy in (checkpoint_policy(0), checkpoint_policy(1)):
        shell = Shell(spec, spec.init(key=pr.key(3))).eval()
        with use_policy(policy):
            shell(x).last_hidden_state.square().sum().backward()
        grads.append([p.grad for p in shell.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_training_policy_validates():
    with pytest.raises(ValueError, match="checkpoint_every: expected an int >= 0, got -1"):
        training_policy(checkpoint_every=-1)
