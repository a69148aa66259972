"""per_sample_grads (vmap path) == a per-example loop of torch.func.grad, for every layer kind."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polymodal.core import pytree
from polymodal.core import random as pr
from polymodal.core.layers import Linear
from polymodal.train.dp.per_sample import batch_size, per_sample_grad_norms, per_sample_grads, trainable_names
from test_dp_models import CASES, loop_grads

TOL = dict(rtol=1e-4, atol=1e-5)


def _close(got: dict, ref: dict) -> None:
    assert sorted(got) == sorted(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], **TOL, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("name", sorted(CASES))
@settings(max_examples=3, deadline=None)
@given(n=st.integers(1, 5), seed=st.integers(0, 1000))
def test_per_sample_grads_equal_loop(name, n, seed):
    case = CASES[name]
    batch = case.batch(n, seed)
    key = pr.key(seed) if case.uses_key else None
    out = per_sample_grads(case.loss, case.params, batch, key=key, has_aux=case.has_aux)
    grads = out[0] if case.has_aux else out
    _close(pytree.flatten(grads), loop_grads(case, batch, key))


@pytest.mark.parametrize("name", ["vit", "attention", "conv", "embedding"])
def test_chunking_changes_nothing(name):
    case = CASES[name]
    batch = case.batch(5, 3)
    key = pr.key(1) if case.uses_key else None
    whole = pytree.flatten(per_sample_grads(case.loss, case.params, batch, key=key))
    chunked = pytree.flatten(per_sample_grads(case.loss, case.params, batch, key=key, chunk_size=2))
    _close(chunked, whole)
    norms = per_sample_grad_norms(case.loss, case.params, batch, key=key, chunk_size=2, method="vmap")
    ref = torch.stack([v.reshape(v.shape[0], -1).pow(2).sum(1) for v in whole.values()]).sum(0).sqrt()
    torch.testing.assert_close(norms, ref, **TOL)


def test_dropout_keys_are_per_example():
    case = CASES["mlp_dropout"]
    batch = case.batch(4, 0)
    g = pytree.flatten(per_sample_grads(case.loss, case.params, batch, key=pr.key(5)))
    same = pytree.tree_map(lambda t: t[:1].expand(4, *t.shape[1:]), batch)  # one example, four times
    g_same = pytree.flatten(per_sample_grads(case.loss, case.params, same, key=pr.key(5)))
    w = "layers.0.weight"
    assert not torch.allclose(g_same[w][0], g_same[w][1])  # different masks per example
    torch.testing.assert_close(g_same[w][0], g[w][0])  # example 0 keeps fold_in(key, 0) whatever the rest
    assert not torch.equal(g[w][0], pytree.flatten(per_sample_grads(case.loss, case.params, batch, key=pr.key(6)))[w][0])


@pytest.mark.parametrize("trainable", ["head", ["head", "encoder.layers.1"], {"head": True, "embed": {"cls_token": True}},
                                       lambda k: k.endswith("bias")])
def test_frozen_subtrees(trainable):
    case = CASES["vit"]
    batch = case.batch(3, 2)
    names = trainable_names(case.params, trainable)
    grads = per_sample_grads(case.loss, case.params, batch, trainable=trainable)
    flat = pytree.flatten(grads)
    assert sorted(flat) == sorted(names)
    ref = loop_grads(case, batch)
    _close(flat, {k: ref[k] for k in names})
    # the tree keeps the params' structure, None at frozen leaves
    assert len(grads["encoder"]["layers"]) == 2
    assert (grads["head"]["weight"] is None) == ("head.weight" not in names)


def test_aux_state_is_stacked_per_example():
    case = CASES["batchnorm_eval"]
    batch = case.batch(3, 0)
    grads, state = per_sample_grads(case.loss, case.params, batch, has_aux=True)
    assert state["running_mean"].shape == (3, 4) and state["num_batches_tracked"].shape == (3,)
    _close(pytree.flatten(grads), loop_grads(case, batch))


def test_trainable_and_batch_errors():
    p = Linear(2, 2).init(key=pr.key(0))
    with pytest.raises(ValueError, match="prefix 'nope' matches no parameter"):
        trainable_names(p, "nope")
    with pytest.raises(ValueError, match="no floating-point parameter"):
        trainable_names(p, lambda k: False)
    with pytest.raises(ValueError, match="mask names 'w'"):
        trainable_names(p, {"w": True})
    with pytest.raises(ValueError, match=r"leading sizes \{0: 3, 1: 2\}"):
        batch_size((torch.zeros(3, 1), torch.zeros(2)))
    loss = lambda p, b: (Linear(2, 2)(p, b) ** 2).sum()  # noqa: E731  (a scalar, not per example)
    with pytest.raises(ValueError, match="one loss per example"):
        per_sample_grads(lambda p, b: (Linear(2, 2)(p, b) ** 2).sum(-1).mean(0, keepdim=True).expand(2), p,
                         torch.zeros(3, 2))
    with pytest.raises(ValueError, match="method must be"):
        per_sample_grad_norms(loss, p, torch.zeros(3, 2), method="hooks")
    with pytest.raises(ValueError, match="chunk_size"):
        per_sample_grads(lambda p, b: (Linear(2, 2)(p, b) ** 2).sum(-1), p, torch.zeros(3, 2), chunk_size=0)


def test_vmap_under_activation_checkpointing_explains():
    from polymodal.core.layers.seam import checkpoint_policy, use_policy

    case = CASES["transformer"]
    with use_policy(checkpoint_policy()), pytest.raises(RuntimeError, match="use method='trace'"):
        per_sample_grads(case.loss, case.params, case.batch(2, 0))
