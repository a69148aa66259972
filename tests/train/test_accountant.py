"""Privacy accountants: parity with Opacus, exact references, properties, state, and errors."""

import itertools
import math
import warnings

import mpmath as mp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant as OpacusPRV
from opacus.accountants import RDPAccountant as OpacusRDP
from opacus.accountants.analysis import rdp as opacus_rdp
from opacus.accountants.utils import get_noise_multiplier
from scipy.optimize import brentq
from scipy.stats import norm

from polymodal.train.dp import (
    DEFAULT_ORDERS,
    PRVAccountant,
    RDPAccountant,
    compute_rdp,
    epsilon,
    make_accountant,
    noise_multiplier_for_epsilon,
    rdp_to_epsilon,
)
from polymodal.train.dp import rdp as rdp_mod

pytestmark = pytest.mark.filterwarnings("ignore:(the best RDP order|Optimal order):UserWarning")

NOISES = [0.5, 0.8, 1.0, 2.0, 5.0]
RATES = [1e-4, 1e-3, 1e-2, 0.1, 0.5, 1.0]
STEPS = [1, 10, 1000, 100_000]
DELTAS = [1e-5, 1e-6, 1e-8]


def test_orders_are_opacus_orders():
    assert list(DEFAULT_ORDERS) == [float(a) for a in OpacusRDP.DEFAULT_ALPHAS]


@pytest.mark.parametrize("sigma,q", list(itertools.product(NOISES, RATES)))
def test_rdp_epsilon_equals_opacus_on_grid(sigma, q):
    rdp_one = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=OpacusRDP.DEFAULT_ALPHAS)
    for steps, delta in itertools.product(STEPS, DELTAS):
        ours = RDPAccountant()
        ours.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
        eps, order = ours.get_privacy_spent(delta)
        ref_eps, ref_order = opacus_rdp.get_privacy_spent(
            orders=OpacusRDP.DEFAULT_ALPHAS, rdp=rdp_one * steps, delta=delta
        )
        assert eps == pytest.approx(ref_eps, rel=1e-6), (steps, delta)
        assert order == ref_order
        assert epsilon(sigma, q, steps, delta) == eps


def _rdp_mpmath(q, sigma, alpha):
    """log(A_alpha)/(alpha - 1) by 40-digit quadrature of E_z[(1 + q expm1((2z-1)/(2 sigma^2)))^alpha]."""
    mp.mp.dps = 40
    q, s, a = mp.mpf(q), mp.mpf(sigma), mp.mpf(alpha)

    def f(z):
        x = q * mp.expm1((2 * z - 1) / (2 * s**2))
        return ((1 + x) ** a - 1 - a * x) * mp.npdf(z, 0, s)

    # the integrand has a bump at z = 0 and one at z = alpha (where the q * exp(...) ** alpha term peaks)
    pts = [-mp.inf, -10 * s, 0, 0.5, 1, a, a + 20 * s, mp.inf]
    return float(mp.log1p(mp.quad(f, sorted(set(pts)))) / (a - 1))


@pytest.mark.parametrize(
    "sigma,q,alpha",
    [(5.0, 1e-4, 1.2), (0.5, 1e-4, 1.1), (2.0, 1e-4, 1.3), (5.0, 1e-8, 1.5), (0.5, 0.5, 10.5), (1.0, 0.01, 2.5),
     (0.1, 0.01, 9.9), (50.0, 1e-3, 2.7), (1.0, 0.1, 30.0)],
)
def test_rdp_per_order_matches_high_precision_reference(sigma, q, alpha):
    # Where Opacus's log(sum of O(1) terms) keeps few digits (small q, large sigma) ours stays exact.
    assert compute_rdp(sigma, q, 1, orders=[alpha])[0] == pytest.approx(_rdp_mpmath(q, sigma, alpha), rel=1e-11)


@pytest.mark.parametrize("sigma,q", [(0.5, 0.5), (1.0, 1e-4), (5.0, 0.01), (0.8, 0.3), (2.0, 0.999)])
def test_fractional_quadrature_equals_exact_sum_at_integer_orders(sigma, q):
    for alpha in (2, 3, 7, 20, 63):
        quad = rdp_mod._log_a_minus_1_frac(q, sigma, float(alpha))
        exact = rdp_mod._log_a_minus_1_int(q, sigma, alpha)
        assert quad == pytest.approx(exact, rel=1e-12, abs=1e-12)


def test_rdp_of_the_plain_gaussian_is_alpha_over_two_sigma_squared():
    r = compute_rdp(2.0, 1.0, 3, orders=[1.5, 2.0, 10.0])
    np.testing.assert_allclose(r, 3 * np.array([1.5, 2.0, 10.0]) / 8, rtol=1e-15)


def test_changing_schedule_equals_opacus_history_and_epsilon():
    schedule = [(1.0, 0.01, 300), (2.0, 0.02, 200), (1.0, 0.01, 100), (0.7, 0.001, 1000), (0.7, 0.001, 5)]
    ours, ref = RDPAccountant(), OpacusRDP()
    for sigma, q, n in schedule:
        ours.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)
        for _ in range(n):
            ref.step(noise_multiplier=sigma, sample_rate=q)
    assert ours.history == ref.history == [(1.0, 0.01, 300), (2.0, 0.02, 200), (1.0, 0.01, 100), (0.7, 0.001, 1005)]
    assert ours.num_steps == 1605
    for delta in DELTAS:
        assert ours.get_epsilon(delta) == pytest.approx(ref.get_epsilon(delta), rel=1e-6)


def test_state_dict_resume_and_opacus_interop():
    full = RDPAccountant()
    first = RDPAccountant()
    for acc in (full, first):
        acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=500)
    state = first.state_dict()
    assert state == {"mechanism": "rdp", "history": [(1.0, 0.01, 500)]}
    resumed = RDPAccountant()
    resumed.load_state_dict(state)
    for acc in (full, resumed):
        acc.step(noise_multiplier=1.5, sample_rate=0.02, num_steps=100)
    assert resumed.history == full.history and resumed.get_epsilon(1e-5) == full.get_epsilon(1e-5)
    # Opacus state dicts load here, and ours load there.
    ref = OpacusRDP()
    ref.load_state_dict(full.state_dict())
    assert ref.get_epsilon(1e-5) == pytest.approx(full.get_epsilon(1e-5), rel=1e-6)
    back = RDPAccountant()
    back.load_state_dict(dict(ref.state_dict()))
    assert back.history == full.history
    prv = PRVAccountant()
    prv.load_state_dict({"mechanism": "prv", "history": [[1.0, 0.01, 5]]})
    assert prv.history == [(1.0, 0.01, 5)]


def test_load_state_dict_errors_name_the_problem():
    acc = RDPAccountant()
    with pytest.raises(ValueError, match=r"expected mechanism 'rdp', got 'prv'"):
        acc.load_state_dict({"mechanism": "prv", "history": []})
    with pytest.raises(ValueError, match=r"missing keys \['history'\]"):
        acc.load_state_dict({"mechanism": "rdp"})
    with pytest.raises(ValueError, match=r"history\[1\]: sample_rate must be in \(0, 1\], got 2.0"):
        acc.load_state_dict({"mechanism": "rdp", "history": [(1.0, 0.1, 3), (1.0, 2.0, 3)]})
    assert acc.history == []  # a failed load leaves the accountant untouched


def test_empty_and_noiseless_and_zero_steps():
    assert RDPAccountant().get_epsilon(1e-5) == 0.0
    assert PRVAccountant().get_epsilon(1e-5) == 0.0
    assert epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    assert epsilon(0.0, 0.1, 10, 1e-5) == math.inf
    assert epsilon(0.0, 0.1, 10, 1e-5, accountant="prv") == math.inf


@pytest.mark.parametrize(
    "target,delta,q,steps",
    [(1.0, 1e-5, 0.01, 1000), (2.0, 1e-5, 0.01, 1000), (8.0, 1e-5, 0.004, 3000), (0.5, 1e-6, 0.001, 100_000),
     (3.0, 1e-8, 0.1, 100), (4.0, 1e-5, 0.2, 20)],
)
def test_noise_multiplier_search_equals_opacus(target, delta, q, steps):
    ref = get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps)
    ours = noise_multiplier_for_epsilon(target, delta, q, steps)
    assert ours == ref
    assert target - 0.01 <= epsilon(ours, q, steps, delta) <= target


@pytest.mark.parametrize("target,delta,q,steps", [(1.0, 1e-6, 0.1, 50)])
def test_noise_multiplier_search_equals_opacus_prv(target, delta, q, steps):
    ref = get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps, accountant="prv")
    ours = noise_multiplier_for_epsilon(target, delta, q, steps, accountant="prv")
    assert ours == pytest.approx(ref, rel=1e-9)
    assert epsilon(ours, q, steps, delta, accountant="prv") <= target


def test_noise_multiplier_search_unreachable_budget():
    with pytest.raises(ValueError, match=r"target_epsilon=1e-09 .* out of reach"):
        noise_multiplier_for_epsilon(1e-9, 1e-5, 0.5, 1000)


# PRV: Opacus's algorithm with tail masses from survival functions and an exact mean;
# the remaining differences (<= 1e-4 relative, well inside eps_error = 0.01) come from
# Opacus's `1 - cdf` tails and its quad-based mean, see test_prv_gaussian_exact.
PRV_GRID = [
    (1.0, 0.01, 1000, 1e-5), (0.5, 0.5, 10, 1e-5), (5.0, 1e-4, 100_000, 1e-8), (2.0, 0.1, 1, 1e-6),
    (1.0, 1e-4, 1, 1e-5), (1.0, 0.5, 100, 1e-5), (3.0, 1.0, 50, 1e-5), (0.8, 1e-3, 10_000, 1e-6),
    (2.0, 1e-2, 10_000, 1e-8),
]


@pytest.mark.parametrize("sigma,q,steps,delta", PRV_GRID)
def test_prv_epsilon_equals_opacus(sigma, q, steps, delta):
    ref = OpacusPRV()
    ref.history = [(sigma, q, steps)]
    ours = PRVAccountant()
    ours.step(noise_multiplier=sigma, sample_rate=q, num_steps=steps)
    assert ours.get_epsilon(delta) == pytest.approx(ref.get_epsilon(delta), rel=1e-4)


def test_prv_changing_schedule_equals_opacus():
    ours, ref = PRVAccountant(), OpacusPRV()
    for sigma, q, n in [(1.0, 0.01, 300), (2.0, 0.02, 200), (1.0, 0.01, 100)]:
        ours.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)
        ref.history.append((sigma, q, n))
    assert ours.get_epsilon(1e-6) == pytest.approx(ref.get_epsilon(1e-6), rel=1e-6)


def _gaussian_exact_epsilon(sigma, steps, delta):
    """n plain Gaussian steps = one with sigma / sqrt(n); its exact (eps, delta) curve (Balle & Wang 2018)."""
    mu = math.sqrt(steps) / sigma
    f = lambda e: norm.cdf(-e / mu + mu / 2) - math.exp(e) * norm.cdf(-e / mu - mu / 2) - delta  # noqa: E731
    return brentq(f, 0, 500, xtol=1e-14)


@pytest.mark.parametrize("sigma,steps,delta", [(1.0, 1, 1e-5), (3.0, 50, 1e-5), (5.0, 1000, 1e-8), (0.8, 10, 1e-6)])
def test_prv_gaussian_exact(sigma, steps, delta):
    acc = PRVAccountant()
    acc.step(noise_multiplier=sigma, sample_rate=1.0, num_steps=steps)
    lower, estimate, upper = acc.get_epsilon_bounds(delta)
    exact = _gaussian_exact_epsilon(sigma, steps, delta)
    assert lower <= exact <= upper
    assert estimate == pytest.approx(exact, abs=1e-5)


@pytest.mark.parametrize("sigma,q,steps", [(1.0, 0.01, 1000), (0.8, 0.004, 3000), (2.0, 0.1, 100)])
def test_prv_is_tighter_than_rdp(sigma, q, steps):
    assert epsilon(sigma, q, steps, 1e-5, accountant="prv") < epsilon(sigma, q, steps, 1e-5)


sigmas = st.floats(0.5, 5.0)
rates = st.floats(1e-4, 0.5)
steps_ = st.integers(1, 100_000)
deltas = st.sampled_from(DELTAS)


@settings(max_examples=20, deadline=None)
@given(sigmas, rates, steps_, st.integers(1, 10_000), deltas)
def test_epsilon_grows_with_steps(sigma, q, steps, more, delta):
    assert epsilon(sigma, q, steps + more, delta) > epsilon(sigma, q, steps, delta)


@settings(max_examples=20, deadline=None)
@given(sigmas, rates, st.floats(1.01, 2.0), steps_, deltas)
def test_epsilon_grows_with_sample_rate(sigma, q, factor, steps, delta):
    assert epsilon(sigma, min(1.0, q * factor), steps, delta) > epsilon(sigma, q, steps, delta)


@settings(max_examples=20, deadline=None)
@given(sigmas, st.floats(1.01, 2.0), rates, steps_, deltas)
def test_epsilon_falls_with_noise(sigma, factor, q, steps, delta):
    assert epsilon(sigma * factor, q, steps, delta) < epsilon(sigma, q, steps, delta)


@settings(max_examples=10, deadline=None)
@given(st.lists(st.tuples(sigmas, rates, st.integers(1, 1000)), min_size=1, max_size=4), deltas)
def test_composition_is_order_free_and_split_free(schedule, delta):
    forward, backward, unit = RDPAccountant(), RDPAccountant(), RDPAccountant()
    for sigma, q, n in schedule:
        forward.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)
    for sigma, q, n in reversed(schedule):
        backward.step(noise_multiplier=sigma, sample_rate=q, num_steps=n)
    for sigma, q, n in schedule:
        for part in (n // 2, n - n // 2):
            unit.step(noise_multiplier=sigma, sample_rate=q, num_steps=part)
    e = forward.get_epsilon(delta)
    assert backward.get_epsilon(delta) == pytest.approx(e, rel=1e-12)
    assert unit.get_epsilon(delta) == pytest.approx(e, rel=1e-12)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"noise_multiplier": -1.0}, r"noise_multiplier must be finite and >= 0, got -1.0"),
        ({"noise_multiplier": float("nan")}, r"noise_multiplier must be a number, got nan"),
        ({"sample_rate": 0.0}, r"sample_rate must be in \(0, 1\], got 0.0"),
        ({"sample_rate": 1.5}, r"sample_rate must be in \(0, 1\], got 1.5"),
        ({"sample_rate": -0.1}, r"sample_rate must be in \(0, 1\], got -0.1"),
        ({"num_steps": -3}, r"num_steps must be >= 0, got -3"),
    ],
)
@pytest.mark.parametrize("cls", [RDPAccountant, PRVAccountant])
def test_step_rejects_bad_inputs(cls, kwargs, match):
    acc = cls()
    args = {"noise_multiplier": 1.0, "sample_rate": 0.1, "num_steps": 1, **kwargs}
    with pytest.raises(ValueError, match=f"{cls.__name__}.step: {match}"):
        acc.step(**args)
    assert acc.history == []


def test_type_errors_and_function_errors():
    with pytest.raises(TypeError, match=r"num_steps must be an int, got float 1.5"):
        RDPAccountant().step(noise_multiplier=1.0, sample_rate=0.1, num_steps=1.5)
    with pytest.raises(TypeError, match=r"noise_multiplier must be a real number, got str '1'"):
        RDPAccountant().step(noise_multiplier="1", sample_rate=0.1)
    with pytest.raises(ValueError, match=r"epsilon: sample_rate must be in \(0, 1\], got 2"):
        epsilon(1.0, 2, 10, 1e-5)
    with pytest.raises(ValueError, match=r"epsilon: noise_multiplier must be finite and >= 0, got -0.5"):
        epsilon(-0.5, 0.1, 10, 1e-5)
    for bad in (0.0, 1.0, -1e-5):
        with pytest.raises(ValueError, match=rf"delta must be in \(0, 1\), got {bad}"):
            RDPAccountant().get_epsilon(bad)
    with pytest.raises(ValueError, match=r"target_epsilon must be a finite number > 0, got -1"):
        noise_multiplier_for_epsilon(-1, 1e-5, 0.1, 10)
    with pytest.raises(ValueError, match=r"noise_multiplier_for_epsilon: sample_rate must be in \(0, 1\], got 0"):
        noise_multiplier_for_epsilon(1.0, 1e-5, 0, 10)
    with pytest.raises(ValueError, match=r"steps must be >= 1, got 0"):
        noise_multiplier_for_epsilon(1.0, 1e-5, 0.1, 0)
    with pytest.raises(ValueError, match=r"accountant must be one of \['prv', 'rdp'\], got 'gdp'"):
        make_accountant("gdp")
    with pytest.raises(ValueError, match=r"orders must be a non-empty sequence of numbers > 1, got \[0.5\]"):
        RDPAccountant(orders=[0.5])
    with pytest.raises(ValueError, match=r"rdp and orders must be 1-d of equal length"):
        rdp_to_epsilon([1.0], [2.0, 3.0], 1e-5)


def test_rdp_warns_when_best_order_is_at_the_edge():
    acc = RDPAccountant()
    acc.step(noise_multiplier=20.0, sample_rate=1e-4, num_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        acc.get_epsilon(1e-5)
    assert any("largest one (63.0)" in str(w.message) for w in caught)
