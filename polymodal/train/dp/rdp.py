"""Rényi DP of the Poisson-subsampled Gaussian mechanism (the RDP accountant of DP-SGD).

One step of DP-SGD with noise multiplier ``sigma`` and sample rate ``q`` is
``(alpha, rdp(alpha))``-RDP at every order ``alpha > 1``, with
``rdp(alpha) = log(A_alpha) / (alpha - 1)`` and (Mironov, Talwar, Zhang 2019,
"Rényi Differential Privacy of the Sampled Gaussian Mechanism", Sec. 3.3)

    A_alpha = E_{z ~ N(0, sigma^2)} [ (1 - q + q * exp((2z - 1) / (2 sigma^2)))^alpha ].

RDP adds up over steps; the total converts to ``(epsilon, delta)``-DP with
Balle et al. 2020 ("Hypothesis testing interpretations and Rényi DP", Thm. 21),
minimised over the orders. Orders and conversion are Opacus's
(``opacus.accountants.RDPAccountant``), so the numbers agree with it.

Numerics. ``A_alpha`` is ``1 + O(q^2)``: for small ``q`` and large ``sigma`` its
logarithm is tiny and computing it as ``log(sum of O(1) terms)`` leaves only a
few correct digits. Here ``A_alpha - 1`` is computed directly, as a sum of
positive terms, and kept in log space:

* integer ``alpha`` (binomial expansion, the two first terms cancel exactly):
  ``A - 1 = sum_{i=2}^{alpha} C(alpha, i) q^i (1-q)^(alpha-i) expm1((i^2 - i) / (2 sigma^2))``;
* fractional ``alpha``: with ``x = q * expm1((2z - 1) / (2 sigma^2))`` (which has
  mean 0 under ``z``), ``A - 1 = E[g(x)]`` with ``g(x) = (1+x)^alpha - 1 - alpha x >= 0``.
  The integrand is smooth and decays like a Gaussian at both ends, so the
  trapezoidal rule on a uniform grid converges exponentially; the grid covers
  ``z/sigma`` in ``[-14, alpha/sigma + 14]`` (the two bumps, at ``0`` and at
  ``alpha/sigma``) and is extended until both ends are ``e^-60`` below the peak.

>>> acc = RDPAccountant()
>>> acc.step(noise_multiplier=1.1, sample_rate=256 / 60000, num_steps=60 * 235)
>>> round(acc.get_epsilon(delta=1e-5), 3)
2.6
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import numpy as np

from .accountant import Accountant, check_delta, check_noise_multiplier, check_sample_rate, check_steps

__all__ = ["DEFAULT_ORDERS", "RDPAccountant", "compute_rdp", "rdp_to_epsilon"]

#: Opacus's ``RDPAccountant.DEFAULT_ALPHAS``: 1.1, 1.2, ..., 10.9, then 12, 13, ..., 63.
DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)])

_TAIL = 14.0  # grid half-width around the bumps, in units of sigma (e^-98 of the peak)
_CUTOFF = 60.0  # the grid ends must be this far (in log) below the peak
_SERIES_TERMS = 30


def _logsumexp(a: np.ndarray) -> float:
    m = float(np.max(a))
    if m == -math.inf or m == math.inf:
        return m
    return m + math.log(float(np.sum(np.exp(a - m))))


def _log_expm1(y: np.ndarray) -> np.ndarray:
    """``log(exp(y) - 1)`` for ``y > 0`` without overflow or cancellation."""
    y = np.asarray(y, dtype=np.float64)
    big = y > 30.0
    small = np.log(np.expm1(np.where(big, 1.0, y)))
    return np.where(big, y + np.log1p(-np.exp(-np.where(big, y, 31.0))), small)


def _softplus(x: float) -> float:
    """``log(1 + exp(x))``: turns ``log(A - 1)`` into ``log(A)``."""
    return x + math.log1p(math.exp(-x)) if x > 0 else math.log1p(math.exp(x))


def _log_a_minus_1_int(q: float, sigma: float, alpha: int) -> float:
    i = np.arange(2, alpha + 1, dtype=np.float64)
    log_binom = math.lgamma(alpha + 1) - np.array([math.lgamma(k + 1) + math.lgamma(alpha - k + 1) for k in i])
    log_terms = log_binom + i * math.log(q) + (alpha - i) * math.log1p(-q) + _log_expm1((i * i - i) / (2 * sigma**2))
    return _logsumexp(log_terms)


def _log_g(w: np.ndarray, q: float, alpha: float) -> np.ndarray:
    """``log(g(x))``, ``g(x) = (1+x)^alpha - 1 - alpha*x``, at ``x = q * expm1(w)``, for tiny and huge ``x``."""
    with np.errstate(over="ignore"):
        x = q * np.expm1(w)  # may overflow to inf where w is large; only the log branch uses it there
    series = np.abs(alpha * x) <= 0.5
    # small |x|: g = x^2 * sum_k C(alpha, k) x^(k-2), summed by Horner from the tail
    xs = np.where(series, x, 0.0)
    coef = [1.0]
    for k in range(1, _SERIES_TERMS + 1):
        coef.append(coef[-1] * (alpha - k + 1) / k)
    s = np.zeros_like(xs)
    for k in range(_SERIES_TERMS, 1, -1):
        s = s * xs + coef[k]
    with np.errstate(divide="ignore"):
        log_series = 2 * np.log(np.abs(xs)) + np.log(s)
    # large positive x: g = e^u (1 - (1 + alpha x) e^-u), u = alpha log1p(x), all from log x
    pos = ~series & (x > 0)
    log_x = math.log(q) + _log_expm1(np.where(pos, w, 1.0))
    u = alpha * np.logaddexp(0.0, log_x)
    log_pos = u + np.log(-np.expm1(np.logaddexp(0.0, math.log(alpha) + log_x) - u))
    # large negative x (|x| > 0.5/alpha): everything is O(1), plain arithmetic
    xn = np.where(~series & (x <= 0), x, -0.5)
    with np.errstate(divide="ignore"):
        log_neg = np.log(np.expm1(alpha * np.log1p(xn)) - alpha * xn)
    return np.where(series, log_series, np.where(pos, log_pos, log_neg))


def _log_a_minus_1_frac(q: float, sigma: float, alpha: float) -> float:
    h = min(0.1, sigma / 4)  # the integrand is analytic in a strip of half-width pi*sigma
    lo, hi = -_TAIL, alpha / sigma + _TAIL
    while True:
        t = np.arange(lo, hi + h, h)
        f = _log_g(t / sigma - 1 / (2 * sigma**2), q, alpha) - t * t / 2
        peak = float(np.max(f))
        if f[0] > peak - _CUTOFF:
            lo -= _TAIL
        elif f[-1] > peak - _CUTOFF:
            hi += _TAIL
        else:
            return _logsumexp(f) + math.log(h) - 0.5 * math.log(2 * math.pi)


@functools.lru_cache(maxsize=4096)
def _rdp_one_step(q: float, sigma: float, orders: tuple[float, ...]) -> tuple[float, ...]:
    if sigma == 0:
        return (math.inf,) * len(orders)
    if q == 1.0:  # no subsampling: the Gaussian mechanism itself
        return tuple(a / (2 * sigma**2) for a in orders)
    out = []
    for a in orders:
        if a == math.inf:
            out.append(math.inf)
            continue
        if float(a).is_integer():
            log_am1 = _log_a_minus_1_int(q, sigma, int(a))
        else:
            log_am1 = _log_a_minus_1_frac(q, sigma, a)
        out.append(_softplus(log_am1) / (a - 1))
    return tuple(out)


def _check_orders(orders: Sequence[float] | None, where: str) -> tuple[float, ...]:
    if orders is None:
        return DEFAULT_ORDERS
    out = tuple(float(a) for a in orders)
    bad = [a for a in out if not a > 1]
    if not out or bad:
        raise ValueError(f"{where}: orders must be a non-empty sequence of numbers > 1, got {list(orders)!r}")
    return out


def compute_rdp(
    noise_multiplier: float, sample_rate: float, steps: int, orders: Sequence[float] | None = None
) -> np.ndarray:
    """RDP of ``steps`` steps of the subsampled Gaussian mechanism at each order.

    Args:
        noise_multiplier: noise std / clipping norm (``>= 0``; ``0`` gives ``inf``).
        sample_rate: Poisson sample rate in ``(0, 1]``.
        steps: number of steps (``>= 0``).
        orders: Rényi orders (``> 1``); default ``DEFAULT_ORDERS``.

    Returns:
        ``(len(orders),)`` float64 array of RDP values (``opacus ... rdp.compute_rdp``).

    >>> float(compute_rdp(1.0, 1.0, 1, orders=[2.0])[0])  # the plain Gaussian: alpha / (2 sigma^2)
    1.0
    """
    sigma = check_noise_multiplier(noise_multiplier, "compute_rdp")
    q = check_sample_rate(sample_rate, "compute_rdp")
    n = check_steps(steps, "compute_rdp", "steps")
    orders = _check_orders(orders, "compute_rdp")
    if n == 0:
        return np.zeros(len(orders))
    return np.asarray(_rdp_one_step(q, sigma, orders)) * n


def rdp_to_epsilon(rdp: Sequence[float], orders: Sequence[float], delta: float) -> tuple[float, float]:
    """Best ``epsilon`` over the orders, and the order attaining it (Balle et al. 2020, Thm. 21).

    ``eps(a) = rdp(a) - (log(delta) + log(a)) / (a - 1) + log((a - 1) / a)``, the
    conversion Opacus uses. Warns when the best order is the first or the last one.

    >>> eps, order = rdp_to_epsilon([0.1, 0.2, 5.0], [2.0, 3.0, 4.0], delta=1e-5)
    >>> round(eps, 3), order
    (5.002, 3.0)
    """
    delta = check_delta(delta, "rdp_to_epsilon")
    a = np.asarray(orders, dtype=np.float64)
    r = np.asarray(rdp, dtype=np.float64)
    if a.shape != r.shape or a.ndim != 1:
        raise ValueError(f"rdp_to_epsilon: rdp and orders must be 1-d of equal length, got {r.shape} and {a.shape}")
    with np.errstate(invalid="ignore"):
        eps = r - (math.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a)
    if np.isnan(eps).all():
        return math.inf, math.nan
    i = int(np.nanargmin(eps))
    if len(eps) > 1 and i in (0, len(eps) - 1) and math.isfinite(eps[i]):
        which = "smallest" if i == 0 else "largest"
        warnings.warn(
            f"the best RDP order is the {which} one ({a[i]}); a wider range of orders may give a smaller epsilon",
            stacklevel=2,
        )
    return float(eps[i]), float(a[i])


class RDPAccountant(Accountant):
    """Rényi-DP accountant for DP-SGD with Poisson sampling (matches Opacus's ``RDPAccountant``).

    Args:
        orders: Rényi orders to optimise over; default ``DEFAULT_ORDERS`` (Opacus's).

    >>> acc = RDPAccountant()
    >>> acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=1000)
    >>> eps, order = acc.get_privacy_spent(delta=1e-5)
    >>> round(eps, 4), order
    (2.1014, 7.8)
    """

    mechanism = "rdp"

    def __init__(self, orders: Sequence[float] | None = None) -> None:
        super().__init__()
        self.orders = _check_orders(orders, "RDPAccountant")

    def rdp(self) -> np.ndarray:
        """Total RDP of the history at each of ``self.orders``."""
        total = np.zeros(len(self.orders))
        for sigma, q, n in self.history:
            total = total + np.asarray(_rdp_one_step(q, sigma, self.orders)) * n
        return total

    def get_privacy_spent(self, delta: float) -> tuple[float, float]:
        """``(epsilon, best_order)`` spent so far at ``delta``; ``(0.0, nan)`` before any step."""
        check_delta(delta, "RDPAccountant.get_privacy_spent")
        if not self.history:
            return 0.0, math.nan
        return rdp_to_epsilon(self.rdp(), self.orders, delta)

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (``inf`` if a step had no noise)."""
        return self.get_privacy_spent(delta)[0]
