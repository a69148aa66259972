"""DP-SGD: clipping + noise + averaging, the optimizer hook, the accountant, resumption."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polymodal.core import pytree
from polymodal.core import random as pr
from polymodal.train.dp import DPSGD, dp_train_step, gaussian_noise, noise_multiplier_for
from polymodal.train.dp.ghost import clip_factors
from polymodal.train.dp import epsilon
from test_dp_models import CASES, loop_grads

TOL = dict(rtol=1e-4, atol=1e-6)


def _clipped_mean(per: dict, C: float, divisor: float, mask=None) -> dict:
    norms = torch.stack([v.reshape(v.shape[0], -1).pow(2).sum(1) for v in per.values()]).sum(0).sqrt()
    c = clip_factors(norms, C, mask)
    return {k: torch.tensordot(c, v, dims=1) / divisor for k, v in per.items()}


@pytest.mark.parametrize("method", ["ghost", "vmap"])
@pytest.mark.parametrize("name", ["vit", "conv", "tied_embedding", "mixed", "batchnorm_eval"])
@settings(max_examples=2, deadline=None)
@given(n=st.integers(1, 5))
def test_zero_noise_step_is_the_mean_of_clipped_gradients(method, name, n):
    case = CASES[name]
    batch = case.batch(n, n)
    ref = _clipped_mean(loop_grads(case, batch), 0.7, 4.0)
    out = dp_train_step(case.loss, case.params, batch, max_grad_norm=0.7, noise_multiplier=0.0,
                        expected_batch_size=4.0, key=pr.key(0), method=method, has_aux=case.has_aux)
    got = pytree.flatten(out.grads)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], **TOL, msg=lambda m: f"{k}: {m}")
    assert 0.0 <= out.clipped <= 1.0 and out.norms.shape == (n,)


def test_noise_same_key_same_noise_and_its_scale():
    case = CASES["linear"]
    batch = case.batch(3, 0)
    kw = dict(max_grad_norm=1.0, noise_multiplier=2.0, expected_batch_size=3.0, key=pr.key(7))
    a = dp_train_step(case.loss, case.params, batch, step=5, **kw).grads
    b = dp_train_step(case.loss, case.params, batch, step=5, **kw).grads
    c = dp_train_step(case.loss, case.params, batch, step=6, **kw).grads
    assert torch.equal(a["weight"], b["weight"]) and not torch.equal(a["weight"], c["weight"])
    for noise in ("generator", "portable"):
        z = gaussian_noise(pr.key(3), {"w": torch.zeros(200_000), "v": torch.zeros(10)}, 1.5, noise=noise)
        assert abs(float(z["w"].std()) - 1.5) < 0.02 and abs(float(z["w"].mean())) < 0.02
        assert not torch.equal(z["w"][:10], z["v"])  # one sub-key per leaf
        assert torch.equal(z["w"], gaussian_noise(pr.key(3), {"w": torch.zeros(200_000), "v": torch.zeros(10)}, 1.5,
                                                  noise=noise)["w"])
    # noise = (noisy - clean) * expected batch size has std sigma * C
    clean = dp_train_step(case.loss, case.params, batch, step=5, **(kw | {"noise_multiplier": 0.0})).grads
    torch.testing.assert_close((a["weight"] - clean["weight"]) * 3.0,
                               gaussian_noise(pr.fold_in(pr.key(7), 5), clean, 2.0)["weight"], **TOL)


def test_padding_mask_and_optimizer_update():
    case = CASES["embedding"]
    batch = case.batch(5, 1)
    mask = torch.tensor([True, True, False, True, False])
    real = pytree.tree_map(lambda t: t[mask], batch)
    ref = _clipped_mean({k: v for k, v in loop_grads(case, real).items() if k.startswith("emb")}, 0.5, 2.5)
    params = pytree.tree_map(lambda t: t.clone(), case.params)
    opt = torch.optim.SGD(pytree.leaves(params), lr=0.1)
    out = dp_train_step(case.loss, params, batch, max_grad_norm=0.5, noise_multiplier=0.0, expected_batch_size=2.5,
                        key=pr.key(0), mask=mask, optimizer=opt, trainable="emb")
    torch.testing.assert_close(out.grads["emb"]["weight"], ref["emb.weight"], **TOL)
    torch.testing.assert_close(params["emb"]["weight"], case.params["emb"]["weight"] - 0.1 * ref["emb.weight"], **TOL)
    assert params["head"]["weight"].grad is None and torch.equal(params["head"]["weight"], case.params["head"]["weight"])
    torch.testing.assert_close(out.loss, case.loss(case.params, real).mean(), **TOL)


def test_dpsgd_accounts_and_resumes():
    case = CASES["mlp_dropout"]
    batches = [case.batch(4, s) for s in range(4)]

    def run(start=None, n=4):
        params = pytree.tree_map(lambda t: t.clone(), case.params)
        opt = torch.optim.SGD(pytree.leaves(params), lr=0.05)
        dp = DPSGD(case.loss, params, opt, max_grad_norm=1.0, noise_multiplier=1.1, sample_rate=0.04,
                   num_samples=100, delta=1e-5, key=pr.key(1), loss_key=pr.key(2))
        if start is not None:
            p0, o0, s0 = start
            for t, v in zip(pytree.leaves(params), pytree.leaves(p0)):
                t.data.copy_(v)
            opt.load_state_dict(o0)
            dp.load_state_dict(s0)
        outs = [dp.step(b) for b in batches[dp.steps_taken:n]]
        return params, opt, dp, outs

    params, _, dp, outs = run()
    assert [o.step for o in outs] == [1, 2, 3, 4]
    for o in outs:
        assert math.isclose(o.epsilon, epsilon(1.1, 0.04, o.step, 1e-5), rel_tol=1e-9)
    assert outs[0].epsilon < outs[-1].epsilon
    p2, o2, dp2, _ = run(n=2)
    snapshot = (pytree.tree_map(lambda t: t.clone(), p2), o2.state_dict(), dp2.state_dict())
    resumed, _, dp3, _ = run(start=snapshot)
    assert dp3.steps_taken == 4 and math.isclose(dp3.epsilon, dp.epsilon)
    for a, b in zip(pytree.leaves(resumed), pytree.leaves(params)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_noise_for_target_epsilon():
    sigma = noise_multiplier_for(3.0, delta=1e-5, sample_rate=0.01, epochs=2)
    assert epsilon(sigma, 0.01, 200, 1e-5) <= 3.0 < epsilon(sigma * 0.95, 0.01, 200, 1e-5)
    case = CASES["linear"]
    dp = DPSGD(case.loss, case.params, None, max_grad_norm=1.0, target_epsilon=3.0, steps=200, sample_rate=0.01,
               num_samples=500, delta=1e-5, key=pr.key(0))
    assert dp.noise_multiplier == sigma and dp.epsilon == 0.0
    out = dp.step(case.batch(5, 0))
    assert out.grads["weight"].shape == (3, 5) and case.params["weight"].grad is None  # no optimizer: no .grad


def test_errors():
    case = CASES["linear"]
    b = case.batch(3, 0)
    kw = dict(max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=3.0, key=pr.key(0))
    with pytest.raises(ValueError, match="method must be"):
        dp_train_step(case.loss, case.params, b, method="hooks", **kw)
    with pytest.raises(ValueError, match=r"mask: expected a \(3,\) bool tensor"):
        dp_train_step(case.loss, case.params, b, mask=torch.ones(3), **kw)
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        dp_train_step(case.loss, case.params, b, **(kw | {"max_grad_norm": -1.0}))
    with pytest.raises(ValueError, match="exactly one of noise_multiplier or target_epsilon"):
        DPSGD(case.loss, case.params, max_grad_norm=1.0, sample_rate=0.1, num_samples=10, delta=1e-5, key=pr.key(0))
    with pytest.raises(ValueError, match="noise must be"):
        gaussian_noise(pr.key(0), {"w": torch.zeros(2)}, 1.0, noise="urandom")
    with pytest.raises(ValueError, match="exactly one of steps or epochs"):
        noise_multiplier_for(1.0, delta=1e-5, sample_rate=0.1)


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_norms_equal_opacus_on_the_same_vit():
    """Our per-example norms (norm-only path) and gradients (vmap) equal Opacus's GradSampleModule
    on the same ViT built from torch.nn layers, weights copied. (Attention is nn.Linear layers
    around SDPA: opacus 1.6's DPMultiheadAttention(batch_first=True) views its (B*H, T, Dh)
    output as (B, T, D), mixing heads and positions, and its sequence-first form feeds (T, B, D)
    to Linear layers that GradSampleModule then reads batch-first.)"""
    opacus = pytest.importorskip("opacus")
    from torch import nn

    from polymodal.train.dp.per_sample import per_sample_grad_norms, per_sample_grads
    from test_dp_models import vit_init, vit_loss, vit_parts

    parts = vit_parts(image=16, patch=4, width=8, depth=2, heads=2, classes=3)
    params, loss = vit_init(parts, pr.key(0)), vit_loss(parts)
    d = 8

    class ClsPos(nn.Module):
        def __init__(self):
            super().__init__()
            self.cls = nn.Parameter(params["embed"]["cls_token"].clone())
            self.pos = nn.Parameter(params["embed"]["position_embeddings"].clone())

        def forward(self, x):
            return torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos

    class Attention(nn.Module):  # what opacus supports: nn.Linear layers around a parameter-free kernel
        def __init__(self, p):
            super().__init__()
            self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.qkv.load_state_dict({"weight": p["in_proj_weight"], "bias": p["in_proj_bias"]})
            self.out.load_state_dict(p["out_proj"])

        def forward(self, x):
            q, k, v = (t.unflatten(-1, (2, d // 2)).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
            return self.out(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))

    class Block(nn.Module):
        def __init__(self, p):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.attn = Attention(p["self_attn"])
            self.fc1, self.fc2 = nn.Linear(d, 16), nn.Linear(16, d)
            for mod, name in ((self.ln1, "norm1"), (self.ln2, "norm2"), (self.fc1, "linear1"), (self.fc2, "linear2")):
                mod.load_state_dict(p[name])

        def forward(self, x):
            x = x + self.attn(self.ln1(x))
            return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, d, 4, 4)
            self.patch.load_state_dict(params["embed"]["conv_projection"])
            self.clspos = ClsPos()
            self.blocks = nn.Sequential(*[Block(p) for p in params["encoder"]["layers"]])
            self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 3)
            self.norm.load_state_dict(params["encoder"]["norm"])
            self.head.load_state_dict(params["head"])

        def forward(self, x):
            return self.head(self.norm(self.blocks(self.clspos(self.patch(x).flatten(2).transpose(1, 2))))[:, 0])

    batch = CASES["vit"].batch(4, 3)
    gsm = opacus.GradSampleModule(ViT(), loss_reduction="sum")
    theirs = nn.functional.cross_entropy(gsm(batch["image"]), batch["label"], reduction="none")
    torch.testing.assert_close(theirs, loss(params, batch), **TOL)
    theirs.sum().backward()
    ref = torch.cat([p.grad_sample.reshape(4, -1) for p in gsm.parameters()], 1).norm(dim=1)
    torch.testing.assert_close(per_sample_grad_norms(loss, params, batch), ref, **TOL)
    ours = per_sample_grads(loss, params, batch)
    torch.testing.assert_close(ours["head"]["weight"], gsm._module.head.weight.grad_sample, **TOL)
    torch.testing.assert_close(ours["embed"]["position_embeddings"], gsm._module.clspos.pos.grad_sample, **TOL)


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_empty_poisson_batch_is_pure_noise(method):
    case = CASES["vit"]
    empty = case.batch(0, 0)
    kw = dict(max_grad_norm=1.0, expected_batch_size=4.0, key=pr.key(3), step=2, method=method)
    out = dp_train_step(case.loss, case.params, empty, noise_multiplier=1.5, **kw)
    zero = dp_train_step(case.loss, case.params, empty, noise_multiplier=0.0, **kw)
    assert out.norms.shape == (0,) and float(out.loss) == 0.0
    noise = gaussian_noise(pr.fold_in(pr.key(3), 2), zero.grads, 1.5 / 4.0)
    for k, v in pytree.flatten(out.grads).items():
        assert not pytree.flatten(zero.grads)[k].any()
        torch.testing.assert_close(v, pytree.flatten(noise)[k], **TOL)
