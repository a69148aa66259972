"""BatchNorm: torch.nn.BatchNorm{1,2,3}d parity in train and eval (outputs and running stats over
several steps), explicit state, vmap (each slice its own batch), grad, compile, shells."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.func import vmap

from checks import assert_close, check_compile, check_spec, check_vmap, copy_into
from polymodal import nn as pnn
from polymodal.core import random as pr
from polymodal.core.layers import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d

seeds = st.integers(0, 2**32)
REF = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}


def x_of(seed, *shape):
    return pr.normal(pr.key(seed), shape) * 2.0 + 0.5


def shape_for(dims, b, c, extra):
    return {1: (b, c) + ((3,) if extra else ()), 2: (b, c, 3, 2), 3: (b, c, 2, 3, 2)}[dims]


def params_of(seed, c):
    return {"weight": x_of(seed, c), "bias": x_of(seed + 1, c)}


@given(st.sampled_from([1, 2, 3]), st.integers(2, 4), st.integers(1, 5), st.booleans(),
       st.sampled_from([0.1, 0.3, None]), st.booleans(), seeds)
def test_matches_torch_over_steps(dims, b, c, extra, momentum, affine, seed):
    spec = BatchNorm(c, momentum=momentum, affine=affine, dims=dims)
    ref = REF[dims](c, momentum=momentum, affine=affine)
    p = params_of(seed, c) if affine else {}
    if affine:
        copy_into(ref, p)
    state = spec.init_state()
    ref.train()
    for step in range(3):
        x = x_of(seed + 10 + step, *shape_for(dims, b, c, extra))
        before = {k: v.clone() for k, v in state.items()}
        y, new_state = spec(p, x, state, training=True)
        torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
        assert all(torch.equal(state[k], before[k]) for k in before)  # the input state is never modified
        state = new_state
        assert_close(state, {k: v for k, v in ref.state_dict().items() if k in state}, msg=f"step {step}")
    ref.eval()
    x = x_of(seed + 99, *shape_for(dims, b, c, extra))
    y, same = spec(p, x, state, training=False)
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    assert same is state


def test_stats_hand_computed():
    x = torch.tensor([[1.0], [3.0]])  # (B=2, C=1): mean 2, biased var 1, unbiased var 2
    y, s = BatchNorm(1, eps=1e-12, dims=1)({"weight": torch.ones(1), "bias": torch.zeros(1)}, x, training=True)
    torch.testing.assert_close(y, torch.tensor([[-1.0], [1.0]]))
    torch.testing.assert_close(s["running_mean"], torch.tensor([0.2]))
    torch.testing.assert_close(s["running_var"], torch.tensor([0.9 + 0.1 * 2.0]))
    assert s["num_batches_tracked"].dtype == torch.int64 and int(s["num_batches_tracked"]) == 1


@given(st.sampled_from([1, 2, 3]), st.integers(2, 3), st.integers(1, 4), seeds)
def test_generic_checks_eval_and_train(dims, b, c, seed):
    spec = BatchNorm(c, dims=dims)
    p = params_of(seed, c)
    trained = {"running_mean": x_of(seed + 2, c), "running_var": x_of(seed + 3, c).abs() + 0.1,
               "num_batches_tracked": torch.tensor(5)}
    x = x_of(seed + 4, *shape_for(dims, b, c, True))
    vx = x_of(seed + 5, 3, *shape_for(dims, b, c, True))  # 3 mapped batches
    check_spec(spec, p, [x], vmap_inputs=[vx], compile=seed % 2 == 0, atol=1e-5)
    check_spec(spec, p, [x], {"training": True}, vmap_inputs=[vx], compile=seed % 2 == 1, atol=1e-5)
    # eval with trained running stats (the shell holds its own buffers, so no shell check here)
    check_vmap(spec, p, [vx], {"state": trained}, atol=1e-5)
    check_compile(spec, p, [x], {"state": trained}, atol=1e-5)


def test_vmap_each_slice_its_own_batch_and_state():
    spec, c = BatchNorm(3), 3
    p, s = params_of(0, c), spec.init_state()
    xs = x_of(1, 4, 2, c, 3, 3)
    ys, states = vmap(lambda x: spec(p, x, s, training=True))(xs)
    for i in range(4):
        y, st_i = spec(p, xs[i], s, training=True)
        torch.testing.assert_close(ys[i], y, rtol=1e-5, atol=1e-5)
        assert_close({k: v[i] for k, v in states.items()}, st_i)
    assert not torch.allclose(states["running_mean"][0], states["running_mean"][1])


def test_frozen_ignores_training_and_matches_tmm_frozen_batchnorm():
    from torchmultimodal.models.mdetr.image_encoder import FrozenBatchNorm2d

    c = 4
    spec = BatchNorm(c, frozen=True)
    p = params_of(0, c)
    state = {"running_mean": x_of(2, c), "running_var": x_of(3, c).abs() + 0.1, "num_batches_tracked": torch.tensor(7)}
    ref = FrozenBatchNorm2d(c)
    ref.load_state_dict({**p, "running_mean": state["running_mean"], "running_var": state["running_var"]})
    x = x_of(4, 2, c, 5, 5)
    y, s2 = spec(p, x, state, training=True)
    torch.testing.assert_close(y, ref(x), rtol=1e-5, atol=1e-5)
    assert s2 is state
    # grads still reach the affine params (freeze them in the optimizer if wanted), not the stats
    g = torch.func.grad(lambda q: spec(q, x, state, training=True)[0].pow(2).sum())(p)
    assert g["weight"].abs().sum() > 0
    check_compile(spec, p, [x], {"state": state, "training": True})


def test_grad_through_training_matches_torch():
    c = 3
    spec, ref = BatchNorm(c), torch.nn.BatchNorm2d(c)
    p = params_of(0, c)
    copy_into(ref, p)
    x = x_of(1, 4, c, 3, 3)
    xr = x.clone().requires_grad_()
    w = torch.cos(torch.arange(x.numel(), dtype=x.dtype)).reshape(x.shape)
    (ref(xr) * w).sum().backward()
    gp, gx = torch.func.grad(lambda q, xi: (spec(q, xi, training=True)[0] * w).sum(), argnums=(0, 1))(p, x)
    torch.testing.assert_close(gx, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gp["weight"], ref.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gp["bias"], ref.bias.grad, rtol=1e-4, atol=1e-5)


def test_shells_match_torch_modules_and_load_their_state_dicts():
    for cls, ref_cls, shape in [(pnn.BatchNorm1d, torch.nn.BatchNorm1d, (4, 3, 5)), (pnn.BatchNorm2d, torch.nn.BatchNorm2d, (4, 3, 2, 2)),
                                (pnn.BatchNorm3d, torch.nn.BatchNorm3d, (4, 3, 2, 2, 2))]:
        m, ref = cls(3), ref_cls(3)
        assert list(m.state_dict()) == list(ref.state_dict())
        m.load_state_dict(ref.state_dict())
        m.train(), ref.train()
        for step in range(3):
            x = x_of(step, *shape)
            torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
        assert_close(dict(m.state_dict()), dict(ref.state_dict()))
        m.eval(), ref.eval()
        x = x_of(9, *shape)
        torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
        assert int(m.num_batches_tracked) == 3  # eval calls do not advance the state
    assert pnn.BatchNorm(3, dims=3).spec == BatchNorm(3, dims=3)
    assert BatchNorm3d(3).dims == 3 and BatchNorm1d(3).dims == 1 and BatchNorm2d(3) == BatchNorm2d(3)


def test_errors():
    with pytest.raises(ValueError, match=r"BatchNorm: x: expected shape \(B, 3, H, W\), got \(2, 4, 5, 5\)"):
        BatchNorm(3)({}, torch.ones(2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"BatchNorm1d: x: expected shape \(B, 3\) or \(B, 3, L\), got \(2, 3, 4, 4\)"):
        BatchNorm1d(3)({}, torch.ones(2, 3, 4, 4))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchNorm(3, dims=1)({}, torch.ones(1, 3), training=True)
    with pytest.raises(ValueError, match="dims must be 1, 2 or 3"):
        BatchNorm(3, dims=4)
    with pytest.raises(TypeError, match="floating-point"):
        BatchNorm(3)({}, torch.ones(2, 3, 2, 2, dtype=torch.int64))
