"""The norm-only path (ghost norms + book-keeping) against full per-example gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import jacrev

from polymodal.core import pytree
from polymodal.core import random as pr
from polymodal.core.layers import BatchNorm2d, Conv, Linear
from polymodal.train.dp.ghost import clip_factors, ghost_clip
from polymodal.train.dp.per_sample import per_sample_grad_norms, per_sample_grads, trainable_names
from test_dp_models import CASES, Case, losses_of, loop_grads

TOL = dict(rtol=1e-4, atol=1e-5)


def _norms(per: dict) -> torch.Tensor:
    return torch.stack([v.reshape(v.shape[0], -1).pow(2).sum(1) for v in per.values()]).sum(0).sqrt()


def _check(case: Case, batch, ref: dict, out, C: float, mask=None) -> None:
    torch.testing.assert_close(out.norms, _norms(ref), **TOL)
    c = clip_factors(_norms(ref), C, mask)
    got = pytree.flatten(out.grads)
    assert sorted(got) == sorted(ref)
    for k, v in ref.items():
        torch.testing.assert_close(got[k], torch.tensordot(c, v, dims=1), **TOL, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("name", sorted(CASES))
@settings(max_examples=3, deadline=None)
@given(n=st.integers(1, 5), seed=st.integers(0, 1000))
def test_ghost_equals_exact(name, n, seed):
    case = CASES[name]
    batch = case.batch(n, seed)
    ref = loop_grads(case, batch)
    C = float(_norms(ref).median())  # some examples clipped, some not
    out = ghost_clip(case.loss, case.params, batch, max_grad_norm=C, has_aux=case.has_aux)
    assert out.fallback == case.fallback
    _check(case, batch, ref, out, C)
    torch.testing.assert_close(out.losses, losses_of(case, case.params, batch).detach(), **TOL)
    norms = per_sample_grad_norms(case.loss, case.params, batch, has_aux=case.has_aux)
    torch.testing.assert_close(norms[0] if case.has_aux else norms, out.norms)


@pytest.mark.parametrize("name", sorted(CASES))
@settings(max_examples=2, deadline=None)
@given(n=st.integers(1, 5), chunk=st.sampled_from([None, 2]))
def test_trace_per_sample_grads_equal_loop(name, n, chunk):
    case = CASES[name]
    batch = case.batch(n, n)
    out = per_sample_grads(case.loss, case.params, batch, method="trace", chunk_size=chunk, has_aux=case.has_aux)
    got = pytree.flatten(out[0] if case.has_aux else out)
    ref = loop_grads(case, batch)
    assert sorted(got) == sorted(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], **TOL, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("name", sorted(n for n, c in CASES.items() if c.uses_key))
def test_ghost_with_dropout_equals_jacobian_of_the_batch(name):
    """With a key the batch pass draws one dropout mask for the batch; the reference is the
    Jacobian of that same batched loss (rows = examples)."""
    case = CASES[name]
    batch, key = case.batch(4, 1), pr.key(9)
    ref = pytree.flatten(jacrev(lambda p: losses_of(case, p, batch, key))(case.params))
    ref = {k: v for k, v in ref.items() if v.is_floating_point()}
    out = ghost_clip(case.loss, case.params, batch, max_grad_norm=1.0, key=key)
    assert out.fallback == ()
    _check(case, batch, ref, out, 1.0)
    no_drop = ghost_clip(case.loss, case.params, batch, max_grad_norm=1.0)
    assert not torch.allclose(no_drop.norms, out.norms)
    traced = pytree.flatten(per_sample_grads(case.loss, case.params, batch, key=key, method="trace"))
    for k in ref:
        torch.testing.assert_close(traced[k], ref[k], **TOL, msg=lambda m: f"{k}: {m}")


def test_mask_zeroes_padding_rows_and_frozen_subtrees():
    case = CASES["vit"]
    batch = case.batch(4, 5)
    mask = torch.tensor([True, False, True, False])
    trainable = ["head", "embed", "encoder.layers.1.norm2"]
    ref = {k: v for k, v in loop_grads(case, batch).items() if k.startswith(("head", "embed", "encoder.layers.1.norm2"))}
    out = ghost_clip(case.loss, case.params, batch, max_grad_norm=0.5, mask=mask, trainable=trainable)
    _check(case, batch, ref, out, 0.5, mask)
    assert out.grads["encoder"]["layers"][0]["linear1"]["weight"] is None


@pytest.mark.parametrize("trainable", [lambda k: k.endswith("bias"), "encoder.layers.1", ["embed.position_embeddings"]])
def test_ghost_frozen_weights(trainable):
    """Bias-only (BitFit), one block, or one broadcast parameter: the rest frozen."""
    case = CASES["vit"]
    batch = case.batch(3, 7)
    names = set(trainable_names(case.params, trainable))
    ref = {k: v for k, v in loop_grads(case, batch).items() if k in names}
    out = ghost_clip(case.loss, case.params, batch, max_grad_norm=0.3, trainable=trainable)
    assert out.fallback == ()
    _check(case, batch, ref, out, 0.3)


def test_shared_weights_and_row_slices():
    """A weight used twice (cross terms of the ghost norm), overlapping row slices (materialised),
    a grouped conv (no recorded form: vmap fallback) and a frozen bias."""
    lin = Linear(4, 4)
    conv = Conv(2, 4, 4, 3, groups=2, padding=1)
    p = {"lin": lin.init(key=pr.key(0)), "w": pr.normal(pr.key(1), (5, 4)), "conv": conv.init(key=pr.key(2)),
         "b": pr.normal(pr.key(3), (3,))}

    def loss(p, b):
        h = lin(p["lin"], torch.tanh(lin(p["lin"], b["x"])))
        h = F.linear(h, p["w"][:3], p["b"]) + F.linear(h, p["w"][1:4]) + F.linear(h, p["w"][4:])
        img = conv(p["conv"], b["img"])
        return (h * b["y"]).flatten(1).sum(1) + img.pow(2).flatten(1).sum(1)

    case = Case("shared", p, loss, lambda n, s: None)
    batch = {"x": pr.normal(pr.key(4), (3, 2, 4)), "y": pr.normal(pr.key(5), (3, 2, 3)),
             "img": pr.normal(pr.key(6), (3, 4, 3, 3))}
    ref = {k: v for k, v in loop_grads(case, batch).items() if k != "b"}
    out = ghost_clip(loss, p, batch, max_grad_norm=1.0, trainable=lambda k: k != "b")
    assert out.fallback == ("conv.weight", "conv.bias")
    _check(case, batch, ref, out, 1.0)


def test_errors():
    bn, lin = BatchNorm2d(2), Linear(2, 1)
    p = {"bn": bn.init(key=None), "lin": lin.init(key=pr.key(0))}

    def train_bn(p, b):
        y, _ = bn(p["bn"], b, None, training=True)
        return lin(p["lin"], y.mean((2, 3)))[:, 0]

    with pytest.raises(ValueError, match="couples the examples"):
        ghost_clip(train_bn, p, torch.randn(3, 2, 2, 2), max_grad_norm=1.0)
    with pytest.raises(ValueError, match=r"one loss per example, shape \(3,\)"):
        ghost_clip(lambda p, b: lin(p["lin"], b).sum(), p, torch.randn(3, 2), max_grad_norm=1.0)
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        ghost_clip(lambda p, b: lin(p["lin"], b)[:, 0], p, torch.randn(3, 2), max_grad_norm=0.0)
    with pytest.raises(ValueError, match=r"mask: expected a \(3,\) tensor"):
        ghost_clip(lambda p, b: lin(p["lin"], b)[:, 0], p, torch.randn(3, 2), max_grad_norm=1.0, mask=torch.ones(2))


@pytest.mark.parametrize("name", ["transformer", "vit"])
def test_activation_checkpointing_at_the_seam(name):
    """Blocks recomputed in backward by the seam's checkpoint policy are traced again."""
    from polymodal.core.layers.seam import checkpoint_policy, use_policy

    case = CASES[name]
    batch = case.batch(3, 4)
    ref = loop_grads(case, batch)
    with use_policy(checkpoint_policy()):
        out = ghost_clip(case.loss, case.params, batch, max_grad_norm=1.0)
        traced = pytree.flatten(per_sample_grads(case.loss, case.params, batch, method="trace"))
    assert out.fallback == ()
    _check(case, batch, ref, out, 1.0)
    for k in ref:
        torch.testing.assert_close(traced[k], ref[k], **TOL, msg=lambda m: f"{k}: {m}")
