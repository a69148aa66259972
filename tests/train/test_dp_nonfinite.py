"""DP-SGD with non-finite per-example gradients, zero noise refused, and a bounded noise search."""

from __future__ import annotations

import math
import time
import warnings

import pytest
import torch
import torch.utils._pytree as tpt

from polymodal.core import pytree
from polymodal.core import random as pr
from polymodal.train.dp import DPSGD, dp_train_step, noise_multiplier_for, noise_multiplier_for_epsilon
from polymodal.train.dp.ghost import clip_factors
from test_dp_models import CASES, loop_grads

TOL = dict(rtol=1e-4, atol=1e-6)
NAMES = ["linear", "linear_seq_ghost", "linear_seq_direct", "embedding", "norms", "conv", "attention", "transformer",
         "vit", "mixed"]


def _poison(batch, row: int, value: float):
    """The batch with every floating entry of example ``row`` set to ``value``."""
    def f(t):
        if not t.is_floating_point():
            return t
        t = t.clone()
        t[row] = value
        return t
    return tpt.tree_map(f, batch)


def _without(batch, row: int):
    return tpt.tree_map(lambda t: torch.cat([t[:row], t[row + 1:]]), batch)


def _expected(case, batch, C: float, divisor: float) -> dict:
    """Hand-computed reference: the clipped mean of the per-example gradients (a loop of grad)."""
    per = loop_grads(case, batch)
    norms = torch.stack([v.reshape(v.shape[0], -1).pow(2).sum(1) for v in per.values()]).sum(0).sqrt()
    c = (C / (norms + 1e-6)).clamp(max=1.0)
    return {k: torch.tensordot(c, v, dims=1) / divisor for k, v in per.items()}


@pytest.mark.parametrize("method", ["ghost", "vmap"])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nonfinite_example_is_left_out_and_counted(method, name, value):
    case = CASES[name]
    clean = case.batch(4, 3)
    bad = _poison(clean, 1, value)
    ref = _expected(case, _without(clean, 1), 0.7, 4.0)
    out = dp_train_step(case.loss, case.params, bad, max_grad_norm=0.7, noise_multiplier=0.0, expected_batch_size=4.0,
                        key=pr.key(0), method=method, has_aux=case.has_aux)
    assert not math.isfinite(float(out.norms[1])) and out.nonfinite == 1
    got = pytree.flatten(out.grads)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], **TOL, msg=lambda m: f"{k}: {m}")
    assert math.isfinite(float(out.loss))


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_infinite_gradient_with_finite_input_is_left_out(method):
    """An overflowing loss (target inf) gives an inf/nan gradient for that example only."""
    case = CASES["linear"]
    clean = case.batch(3, 5)
    bad = {"x": clean["x"], "y": clean["y"].clone()}
    bad["y"][2, 0] = math.inf
    out = dp_train_step(case.loss, case.params, bad, max_grad_norm=0.5, noise_multiplier=0.0, expected_batch_size=3.0,
                        key=pr.key(0), method=method)
    ref = _expected(case, _without(clean, 2), 0.5, 3.0)
    assert out.nonfinite == 1
    for k, v in pytree.flatten(out.grads).items():
        torch.testing.assert_close(v, ref[k], **TOL)
        assert v.norm() <= 0.5 * 2 / 3.0 + 1e-6  # two examples, each within C


def test_clip_factors_zero_for_nonfinite_norms():
    c = clip_factors(torch.tensor([0.5, math.nan, math.inf, 4.0]), 1.0)
    assert c.tolist() == pytest.approx([1.0, 0.0, 0.0, 1.0 / (4.0 + 1e-6)])


def _linear_dpsgd(method: str, **kwargs):
    """The linear case's params (a copy), and a DPSGD over them with an SGD optimizer."""
    case = CASES["linear"]
    params = pytree.tree_map(lambda t: t.clone(), case.params)
    opt = torch.optim.SGD(pytree.leaves(params), lr=0.1)
    dp = DPSGD(case.loss, params, opt, max_grad_norm=1.0, noise_multiplier=1.0, sample_rate=0.1, num_samples=40,
               delta=1e-5, key=pr.key(1), method=method, **kwargs)
    return case, params, dp


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_dpsgd_nan_input_keeps_params_finite(method):
    case, params, dp = _linear_dpsgd(method)
    out = dp.step(_poison(case.batch(4, 0), 0, math.nan))
    assert out.nonfinite == 1 and dp.steps_taken == 1
    assert all(bool(torch.isfinite(t).all()) for t in pytree.leaves(params))


@pytest.mark.parametrize("method", ["ghost", "vmap"])
def test_nonfinite_raise_updates_nothing(method):
    case, params, dp = _linear_dpsgd(method, nonfinite="raise")
    with pytest.raises(FloatingPointError, match=r"expected finite per-example gradients, got NaN/inf for 1 .*\[2\]"):
        dp.step(_poison(case.batch(4, 0), 2, math.nan))
    assert dp.steps_taken == 0 and dp.epsilon == 0.0
    for k, v in pytree.flatten(params).items():
        assert torch.equal(v, pytree.flatten(case.params)[k])
    with pytest.raises(ValueError, match="nonfinite must be 'skip' or 'raise', got 'zero'"):
        dp_train_step(case.loss, params, case.batch(2, 0), max_grad_norm=1.0, noise_multiplier=1.0,
                      expected_batch_size=2.0, key=pr.key(0), nonfinite="zero")


@pytest.mark.parametrize("sigma", [0, 0.0, -1.0, math.nan, math.inf])
def test_dpsgd_refuses_zero_or_invalid_noise(sigma):
    case = CASES["linear"]
    match = "no privacy" if sigma == 0 else "noise_multiplier must be a finite number > 0"
    with pytest.raises(ValueError, match=match):
        DPSGD(case.loss, case.params, None, max_grad_norm=1.0, noise_multiplier=sigma, sample_rate=0.1,
              num_samples=10, delta=1e-5, key=pr.key(0))


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_noise_search_for_a_huge_budget_answers_quickly(accountant):
    t0 = time.perf_counter()
    with pytest.warns(UserWarning, match="no meaningful privacy"):
        sigma = noise_multiplier_for_epsilon(1e9, 1e-5, 0.01, 1000, accountant=accountant)
    assert time.perf_counter() - t0 < 1.0
    assert sigma == 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        assert noise_multiplier_for(1e9, delta=1e-5, sample_rate=0.004, epochs=10) == 0.1
        assert time.perf_counter() - t0 < 1.0
