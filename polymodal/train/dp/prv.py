"""Privacy random variables (PRV): numerical composition of the subsampled Gaussian mechanism.

The privacy loss of one DP-SGD step is a random variable ``Y``; composing steps
adds independent copies, and ``delta(eps) = E[(1 - e^(eps - Y))_+]`` of the sum
gives the tightest ``(eps, delta)`` pair. Gopi, Lee, Wutschitz 2021 ("Numerical
Composition of Differential Privacy") discretise ``Y`` on a uniform grid, add
copies with FFTs, and bound the error; this is that algorithm with the same
grid, truncation and error budget as Opacus's ``PRVAccountant`` (so the
results agree with it), but with tail probabilities taken from survival
functions instead of ``1 - cdf`` and the mean of ``Y`` by Gauss-Legendre.

For the Poisson-subsampled Gaussian with rate ``q`` and noise ``sigma``,
``Y = log(1 - q + q exp((2w - 1) / (2 sigma^2)))`` with
``w ~ (1 - q) N(0, sigma^2) + q N(1, sigma^2)`` (the loss seen by an
adversary when the example is in the data set, Gopi et al. Prop. B.1/B.4).

``get_epsilon`` returns the upper bound ``eps_estimate + eps_error`` (a
guarantee, as Opacus does); ``get_epsilon_bounds`` gives all three numbers.

>>> acc = PRVAccountant()
>>> acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=1000)
>>> round(acc.get_epsilon(delta=1e-5), 2)
1.84
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .accountant import Accountant, check_delta
from .rdp import RDPAccountant

__all__ = ["PRVAccountant"]

_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(16)
_W_TAIL = 40.0  # w beyond 40 sigma of both Gaussians carries mass below e^-800


def _erfc(x: np.ndarray) -> np.ndarray:
    return torch.special.erfc(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))).numpy()


def _threshold(t: np.ndarray, q: float, sigma: float) -> np.ndarray:
    """``c(t)``: ``Y <= t`` iff ``w <= c(t)`` (``-inf`` where ``t <= log(1 - q)``)."""
    t = np.asarray(t, dtype=np.float64)
    if q == 1.0:
        z = t
    else:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            arg = np.expm1(t) + q  # e^t - (1 - q), without cancelling 1 - q
            z = np.where(arg > 0, np.log(np.where(arg > 0, arg, 1.0)) - math.log(q), -math.inf)
    return sigma**2 * z + 0.5


def _cdf_sf(t: np.ndarray, q: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """``P(Y <= t)`` and ``P(Y > t)``, each with full relative precision in its own tail."""
    c = _threshold(t, q, sigma)
    s = math.sqrt(2) * sigma
    cdf = 0.5 * ((1 - q) * _erfc(-c / s) + q * _erfc((1 - c) / s))
    sf = 0.5 * ((1 - q) * _erfc(c / s) + q * _erfc((c - 1) / s))
    return cdf, sf


def _privacy_loss(w: np.ndarray, q: float, sigma: float) -> np.ndarray:
    v = (2 * w - 1) / (2 * sigma**2)
    small = np.log1p(q * np.expm1(np.minimum(v, 30.0)))
    large = np.logaddexp(math.log1p(-q) if q < 1 else -math.inf, math.log(q) + v)
    return np.where(v < 30.0, small, large)


def _truncated_mean(q: float, sigma: float, t_min: float, t_max: float, mass: float) -> float:
    """``E[Y | t_min < Y <= t_max]`` by composite Gauss-Legendre over ``w``."""
    c_lo, c_hi = _threshold(np.array([t_min, t_max]), q, sigma)
    lo, hi = max(c_lo, -_W_TAIL * sigma), min(c_hi, 1 + _W_TAIL * sigma)
    if not lo < hi:
        return 0.5 * (t_min + t_max)
    width = min(sigma, math.pi * sigma**2)  # Y(w) is analytic within pi*sigma^2 of the real axis
    panels = max(1, math.ceil((hi - lo) / width))
    edges = np.linspace(lo, hi, panels + 1)
    half = np.diff(edges)[:, None] / 2
    w = (edges[:-1, None] + half + half * _GL_NODES[None, :]).ravel()
    weights = (half * _GL_WEIGHTS[None, :]).ravel()
    density = ((1 - q) * np.exp(-0.5 * (w / sigma) ** 2) + q * np.exp(-0.5 * ((w - 1) / sigma) ** 2)) / (
        sigma * math.sqrt(2 * math.pi)
    )
    return float(np.sum(weights * density * _privacy_loss(w, q, sigma))) / mass


def _discretize(q: float, sigma: float, m: int, dt: float) -> tuple[np.ndarray, float]:
    """PMF of ``Y`` truncated to ``[-m dt, (m+1) dt]`` on the grid ``(k - m) dt``; and the mean shift."""
    n = 2 * m + 2
    t_min, t_max = -m * dt, (m + 1) * dt
    ts = (np.arange(n) - m) * dt
    edges = np.clip(np.concatenate([ts - dt / 2, [ts[-1] + dt / 2]]), t_min, t_max)
    cdf, sf = _cdf_sf(edges, q, sigma)
    # take each bin's mass from whichever of cdf / sf is small there, so tail bins keep their digits
    pmf = np.where(cdf[1:] <= 0.5, cdf[1:] - cdf[:-1], sf[:-1] - sf[1:])
    mass = 1.0 - cdf[0] - sf[-1]
    pmf = pmf / mass
    shift = _truncated_mean(q, sigma, t_min, t_max, mass) - float(np.dot(ts, pmf))
    if abs(shift) >= dt / 2:
        raise RuntimeError(
            f"PRVAccountant: the discretised mean differs from the true mean by {shift:.3g} >= dt/2 = {dt / 2:.3g} "
            f"(noise_multiplier={sigma}, sample_rate={q}); the grid is too coarse for this mechanism"
        )
    return pmf, shift


def _self_compose(pmf: np.ndarray, times: int) -> np.ndarray:
    """``times``-fold self-convolution, wrapped back onto the same centred grid."""
    n = len(pmf)
    out = np.fft.irfft(np.fft.rfft(pmf) ** times, n)
    # a sum of `times` grid values (k_i - m) dt sits at index sum(k_i) - (times - 1) m, mod n = 2m + 2
    roll = times - 1 + (n // 2 if times % 2 == 0 else 0)
    return np.roll(out, roll)


def _compose_two(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Linear convolution of two PMFs on the centred grid, cut back to the grid."""
    n = len(a)
    size = 1 << (2 * n - 1).bit_length()
    full = np.fft.irfft(np.fft.rfft(a, size) * np.fft.rfft(b, size), size)
    m = (n - 1) // 2
    return full[m : m + n]


class PRVAccountant(Accountant):
    """PRV accountant for DP-SGD with Poisson sampling (matches Opacus's ``PRVAccountant``).

    Tighter than RDP for many steps; the answer is an upper bound within
    ``eps_error`` of the true epsilon (up to ``delta_error`` in delta).

    >>> acc = PRVAccountant()
    >>> acc.step(noise_multiplier=2.0, sample_rate=0.1, num_steps=100)
    >>> lower, estimate, upper = acc.get_epsilon_bounds(delta=1e-6)
    >>> lower < estimate < upper
    True
    """

    mechanism = "prv"

    def get_epsilon_bounds(
        self, delta: float, *, eps_error: float = 0.01, delta_error: float | None = None
    ) -> tuple[float, float, float]:
        """``(lower, estimate, upper)`` epsilon at ``delta`` (Opacus's ``DiscretePRV.compute_epsilon``).

        Args:
            delta: target delta in ``(0, 1)``.
            eps_error: allowed error in epsilon; sets the grid spacing.
            delta_error: allowed error in delta; default ``delta / 1000``.
        """
        where = "PRVAccountant.get_epsilon"
        delta = check_delta(delta, where)
        if not (isinstance(eps_error, (int, float)) and eps_error > 0):
            raise ValueError(f"{where}: eps_error must be a number > 0, got {eps_error!r}")
        delta_error = delta / 1000 if delta_error is None else delta_error
        if not (isinstance(delta_error, (int, float)) and 0 < delta_error < delta):
            raise ValueError(f"{where}: delta_error must be in (0, delta={delta}), got {delta_error!r}")
        if not self.history:
            return 0.0, 0.0, 0.0
        if any(sigma == 0 for sigma, _, _ in self.history):
            return math.inf, math.inf, math.inf

        total = self.num_steps
        # Domain size and spacing of Gopi et al. (Remark 5.6), as Opacus computes them.
        rdp = RDPAccountant()
        rdp.history = list(self.history)
        length = rdp.get_epsilon(delta_error / 4)
        for sigma, q, _ in self.history:
            rdp.history = [(sigma, q, 1)]
            length = max(length, rdp.get_epsilon(delta_error / (8 * total)))
        length = max(length, eps_error) + 3
        dt = eps_error / math.sqrt(total * math.log(12 / delta_error) / 2)
        m = math.ceil(length / dt)
        n = 2 * m + 2
        if np.finfo(np.longdouble).eps * n > delta - delta_error:
            raise ValueError(
                f"{where}: delta={delta} is too small for a grid of {n} points (rounding errors would "
                f"dominate); increase delta or eps_error"
            )

        pmf, shift = None, 0.0
        for sigma, q, steps in self.history:
            p, s = _discretize(q, sigma, m, dt)
            p = _self_compose(p, steps)
            pmf = p if pmf is None else _compose_two(pmf, p)
            shift += steps * s

        t = (np.arange(n) - m) * dt + shift
        d1 = np.cumsum(pmf[::-1])[::-1]
        d2 = np.cumsum((pmf * np.exp(-t))[::-1])[::-1]
        neg_delta = np.exp(t) * d2 - d1  # -delta(t_i), increasing in i

        def eps_at(target: float) -> float:
            i = int(np.searchsorted(neg_delta, -target, side="left"))
            if i <= 0:
                raise RuntimeError(f"{where}: cannot compute epsilon for delta={target} on this grid")
            return math.log((d1[i] - target) / d2[i])

        return (eps_at(delta + delta_error) - eps_error, eps_at(delta), eps_at(delta - delta_error) + eps_error)

    def get_epsilon(self, delta: float, *, eps_error: float = 0.01, delta_error: float | None = None) -> float:
        """Upper bound on epsilon spent so far at ``delta`` (``inf`` if a step had no noise)."""
        return self.get_epsilon_bounds(delta, eps_error=eps_error, delta_error=delta_error)[2]
