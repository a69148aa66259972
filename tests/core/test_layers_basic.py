"""Linear, Embedding, norms, activations, dropout, drop-path, MLP: generic checks + torch.nn parity."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given
from hypothesis import strategies as st

from checks import check_spec, copy_into
from polymodal import nn as pnn
from polymodal.core import random as pr
from polymodal.core.layers import (
    MLP, DropPath, Dropout, Embedding, GroupNorm, LayerNorm, Linear, RMSNorm, activation, drop_path, dropout,
)

dims = st.integers(1, 12)
batch = st.integers(1, 4)
seeds = st.integers(0, 2**32)
lead = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)


def x_of(seed, *shape, dtype=torch.float32):
    return pr.normal(pr.key(seed), shape).to(dtype)


@given(dims, dims, st.booleans(), batch, lead, seeds, st.sampled_from(["torch", "trunc_normal", "xavier_uniform"]))
def test_linear(i, o, bias, b, rest, seed, init):
    spec = Linear(i, o, bias=bias, weight_init=init)
    p = spec.init(key=pr.key(seed))
    x = x_of(seed + 1, b, *rest, i)
    check_spec(spec, p, [x], compile=b == 1)
    ref = torch.nn.Linear(i, o, bias=bias)
    copy_into(ref, p)
    torch.testing.assert_close(spec(p, x), ref(x), rtol=0, atol=0)


def test_linear_torch_init_bounds_and_errors():
    p = Linear(64, 8).init(key=pr.key(0))
    assert p["weight"].abs().max() <= 1 / 8 and p["bias"].abs().max() <= 1 / 8
    assert p["weight"].std() > 0.05  # not degenerate
    with pytest.raises(ValueError, match=r"Linear: x: expected shape \(\.\.\., 64\), got \(3, 4\)"):
        Linear(64, 8)(p, torch.ones(3, 4))
    with pytest.raises(TypeError, match="floating-point"):
        Linear(64, 8)(p, torch.ones(3, 64, dtype=torch.int64))
    with pytest.raises(ValueError, match="unknown init"):
        Linear(2, 2, weight_init="nope").init(key=pr.key(0))


@given(st.integers(2, 20), dims, st.sampled_from([None, 0, 1]), batch, seeds)
def test_embedding(n, d, pad, b, seed):
    spec = Embedding(n, d, padding_idx=pad)
    p = spec.init(key=pr.key(seed))
    ids = pr.randint(pr.key(seed + 1), (b, 5), 0, n)
    check_spec(spec, p, [ids], compile=b == 1)
    ref = torch.nn.Embedding(n, d, padding_idx=pad)
    copy_into(ref, p)
    torch.testing.assert_close(spec(p, ids), ref(ids), rtol=0, atol=0)
    if pad is not None:
        assert torch.all(p["weight"][pad] == 0)
    with pytest.raises(TypeError, match="expected dtype"):
        spec(p, ids.float())


@given(dims, st.booleans(), batch, seeds)
def test_layer_norm(d, affine, b, seed):
    spec = LayerNorm(d, affine=affine)
    p = spec.init(key=pr.key(seed))
    if affine:  # non-trivial affine params
        p = {"weight": x_of(seed, d), "bias": x_of(seed + 2, d)}
    x = x_of(seed + 1, b, 3, d)
    check_spec(spec, p, [x], compile=b == 1, atol=1e-5)
    ref = torch.nn.LayerNorm(d, elementwise_affine=affine)
    if affine:
        copy_into(ref, p)
    torch.testing.assert_close(spec(p, x), ref(x), rtol=0, atol=0)


def test_fp32_layer_norm_in_bf16():
    spec = LayerNorm(8, fp32=True)
    p = {"weight": x_of(0, 8).bfloat16(), "bias": x_of(1, 8).bfloat16()}
    x = x_of(2, 4, 8).bfloat16()
    y = spec(p, x)
    assert y.dtype == torch.bfloat16
    ref = F.layer_norm(x.float(), (8,), p["weight"].float(), p["bias"].float()).bfloat16()
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


@given(dims, batch, seeds)
def test_rms_norm(d, b, seed):
    spec = RMSNorm(d)
    p = {"weight": x_of(seed, d)}
    x = x_of(seed + 1, b, 3, d)
    check_spec(spec, p, [x], compile=b == 1, atol=1e-5)
    ref = torch.nn.RMSNorm(d, eps=1e-6)
    copy_into(ref, p)
    torch.testing.assert_close(spec(p, x), ref(x))


@given(st.sampled_from([(1, 4), (2, 4), (4, 8), (3, 6)]), batch, seeds, st.integers(0, 2))
def test_group_norm(gc, b, seed, extra):
    g, c = gc
    spec = GroupNorm(g, c)
    p = {"weight": x_of(seed, c), "bias": x_of(seed + 2, c)}
    x = x_of(seed + 1, b, c, *([3] * extra))
    check_spec(spec, p, [x], compile=b == 1, atol=1e-5, vmap_inputs=[x_of(seed + 3, 2, b, c, *([3] * extra))])
    ref = torch.nn.GroupNorm(g, c)
    copy_into(ref, p)
    torch.testing.assert_close(spec(p, x), ref(x), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        GroupNorm(3, 4)
    with pytest.raises(ValueError, match=rf"expected shape \(B, {c}, \*\)"):
        spec(p, torch.ones(2, c + 1, 3))


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "quick_gelu", "silu", "relu", "tanh", "geglu"])
def test_activations(name):
    x = x_of(0, 5, 8)
    ref = {
        "gelu": torch.nn.GELU()(x), "gelu_tanh": torch.nn.GELU("tanh")(x), "quick_gelu": x * torch.sigmoid(1.702 * x),
        "silu": torch.nn.SiLU()(x), "relu": torch.relu(x), "tanh": torch.tanh(x),
        "geglu": x[..., :4] * F.gelu(x[..., 4:]),
    }[name]
    torch.testing.assert_close(activation(name)(x), ref)
    with pytest.raises(ValueError, match="unknown activation"):
        activation("swishy")


@given(st.floats(0.0, 0.9), seeds)
def test_dropout_statistics_and_determinism(rate, seed):
    x = torch.ones(20_000)
    k = pr.key(seed)
    y = dropout(x, rate, key=k)
    assert torch.equal(y, dropout(x, rate, key=k))
    kept = (y != 0).float().mean()
    assert abs(kept - (1 - rate)) < 0.03
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / (1 - rate)))
    assert torch.equal(dropout(x, rate, key=None), x)
    assert torch.equal(Dropout(rate)({}, x), x)


def test_dropout_vmap_per_example_keys():
    keys = pr.split(pr.key(0), 3)
    x = torch.ones(3, 100)
    out = torch.func.vmap(lambda xi, k: dropout(xi, 0.5, key=k))(x, keys)
    loop = torch.stack([dropout(x[i], 0.5, key=keys[i]) for i in range(3)])
    assert torch.equal(out, loop) and not torch.equal(out[0], out[1])
    with pytest.raises(ValueError, match=r"rate in \[0, 1\)"):
        Dropout(1.0)


@given(st.floats(0.0, 0.9), seeds)
def test_drop_path_matches_torchvision_keep_probability_and_scaling(rate, seed):
    x = torch.ones(4000, 3, 2)
    y = drop_path(x, rate, key=pr.key(seed))
    per_row = y.reshape(4000, -1)
    assert torch.all((per_row == per_row[:, :1]))  # whole rows dropped or kept
    kept = (per_row[:, 0] != 0).float().mean()
    assert abs(kept - (1 - rate)) < 0.04
    # torchvision's stochastic_depth scales survivors identically
    torch.manual_seed(seed % 1000)
    ref = torchvision.ops.stochastic_depth(x, rate, "row", training=True)
    scale = torch.tensor(1 / (1 - rate))
    assert torch.allclose(ref[ref != 0], scale) and torch.allclose(y[y != 0], scale)
    assert abs((ref.reshape(4000, -1)[:, 0] != 0).float().mean() - kept) < 0.06
    assert torch.equal(DropPath(0.0)({}, x, key=pr.key(seed)), x)  # rate 0 is the identity


@given(dims, dims, st.lists(st.integers(1, 8), max_size=2).map(tuple), st.sampled_from(["relu", "gelu", "geglu"]),
       st.sampled_from([None, "layer_norm"]), batch, seeds)
def test_mlp(i, o, hidden, act, norm, b, seed):
    spec = MLP(i, o, hidden_dims=hidden, activation=act, norm=norm, dropout=0.1)
    p = spec.init(key=pr.key(seed))
    x = x_of(seed + 1, b, 2, i)
    check_spec(spec, p, [x], compile=b == 1, atol=1e-5)
    if act != "geglu" and norm is None:
        mods = []
        dims_ = (i,) + hidden
        for h_in, h in zip(dims_, hidden):
            mods += [torch.nn.Linear(h_in, h), torch.nn.ReLU() if act == "relu" else torch.nn.GELU()]
        mods.append(torch.nn.Linear(dims_[-1], o))
        ref = torch.nn.Sequential(*mods)
        lin_idx = [j for j, m in enumerate(mods) if isinstance(m, torch.nn.Linear)]
        copy_into(ref, p, lambda k: f"{lin_idx[int(k.split('.')[1])]}.{k.split('.')[2]}")
        torch.testing.assert_close(spec(p, x), ref(x))
    k = pr.key(seed + 3)
    assert torch.equal(spec(p, x, key=k), spec(p, x, key=k))


def test_shells_constructors_and_training_keys():
    lin = pnn.Linear(8, 4, bias=False)
    assert list(lin.state_dict()) == ["weight"] and lin.weight.shape == (4, 8)
    m = pnn.MLP(4, 2, hidden_dims=(16,), dropout=0.5)
    x = torch.ones(3, 4)
    m.train()
    a, b = m(x), m(x)
    assert not torch.equal(a, b)  # a fresh dropout key per training call
    m.eval()
    torch.testing.assert_close(m(x), m.spec(m.params, x))
    torch.manual_seed(0)
    l1 = pnn.Linear(3, 3)
    torch.manual_seed(0)
    l2 = pnn.Linear(3, 3)
    assert torch.equal(l1.weight, l2.weight)  # shells follow torch.manual_seed like torch.nn
    out = torch.func.functional_call(lin, {"weight": torch.zeros(4, 8)}, (torch.ones(2, 8),))
    assert torch.equal(out, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="missing keys"):
        pnn.Shell.from_params(Linear(2, 2), {"weight": torch.ones(2, 2)})
    lin16 = pnn.Linear(8, 4, dtype=torch.bfloat16)
    assert lin16.weight.dtype == torch.bfloat16
