"""Pure functions over the accountants: epsilon of a fixed schedule, and the noise for a budget.

>>> round(epsilon(1.0, 0.01, 1000, 1e-5), 4)
2.1014
>>> noise_multiplier_for_epsilon(2.0, 1e-5, 0.01, 1000)  # the smallest sigma (to tol) with epsilon <= 2
1.02294921875
"""

from __future__ import annotations

import math
import warnings

from .accountant import Accountant, check_delta, check_noise_multiplier, check_sample_rate, check_steps
from .prv import PRVAccountant
from .rdp import RDPAccountant

__all__ = ["ACCOUNTANTS", "MIN_SEARCH_SIGMA", "make_accountant", "epsilon", "noise_multiplier_for_epsilon"]

#: accountant classes by mechanism name
ACCOUNTANTS: dict[str, type[Accountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}

_MAX_SIGMA = 1e6  # as Opacus: a budget that needs more noise than this is treated as unreachable
# The search never goes below this noise multiplier: epsilon is in the thousands there for any
# ordinary schedule (no meaningful privacy), and the accountants' cost grows without bound as
# sigma -> 0 (RDP's fractional orders integrate on a grid of ~alpha / sigma^2 points; PRV's FFT
# domain grows with epsilon), so a huge budget (1e9) made the bisection hang.
MIN_SEARCH_SIGMA = 0.1
_MAX_BISECTIONS = 100


def make_accountant(accountant: str = "rdp") -> Accountant:
    """A fresh accountant by name: ``"rdp"`` or ``"prv"``.

    >>> make_accountant("prv").mechanism
    'prv'
    """
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {sorted(ACCOUNTANTS)}, got {accountant!r}")
    return ACCOUNTANTS[accountant]()


def epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp", **kwargs
) -> float:
    """Epsilon after ``steps`` DP-SGD steps with a fixed noise multiplier and sample rate.

    Args:
        noise_multiplier: noise std / clipping norm, ``>= 0``.
        sample_rate: Poisson sample rate in ``(0, 1]`` (expected batch size / data set size).
        steps: number of steps, ``>= 0``.
        delta: target delta in ``(0, 1)``.
        accountant: ``"rdp"`` (Opacus's default) or ``"prv"`` (tighter; an upper bound).
        **kwargs: passed to ``get_epsilon`` (``eps_error``, ``delta_error`` for PRV).

    >>> epsilon(1.0, 0.01, 0, 1e-5)
    0.0
    """
    acc = make_accountant(accountant)
    where = "epsilon"
    acc.step(
        noise_multiplier=check_noise_multiplier(noise_multiplier, where),
        sample_rate=check_sample_rate(sample_rate, where),
        num_steps=check_steps(steps, where, "steps"),
    )
    return acc.get_epsilon(check_delta(delta, where), **kwargs)


def noise_multiplier_for_epsilon(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    tol: float = 0.01,
    **kwargs,
) -> float:
    """Smallest noise multiplier (found by bisection) whose epsilon is at most ``target_epsilon``.

    The search is Opacus's ``get_noise_multiplier``: double ``sigma`` from 10 until the
    budget holds, then bisect from ``[0, sigma]`` until the epsilon reached is within ``tol``
    below the target (or the interval stops shrinking, at most 100 halvings); the returned
    ``sigma`` always satisfies the budget. No sigma below ``MIN_SEARCH_SIGMA`` (0.1) is ever
    evaluated: when that noise already stays within the budget (by the RDP bound: fast to
    compute, and a valid upper bound for either accountant), ``MIN_SEARCH_SIGMA`` is returned
    with a warning, so a huge budget (``1e9``) answers at once instead of hanging. (PRV's
    epsilon costs seconds for sigma below ~0.3: budgets in the hundreds search slowly with it.)

    Args:
        target_epsilon: the epsilon budget, ``> 0``.
        delta: target delta in ``(0, 1)``.
        sample_rate: Poisson sample rate in ``(0, 1]``.
        steps: number of steps, ``>= 1``.
        accountant: ``"rdp"`` or ``"prv"``.
        tol: stop when ``target_epsilon - epsilon(sigma) <= tol``.
        **kwargs: passed to the accountant's ``get_epsilon``.

    Raises:
        ValueError: if the budget needs a noise multiplier above 1e6.

    >>> noise_multiplier_for_epsilon(8.0, 1e-5, 0.004, 3000, tol=0.1) < 1.0
    True
    """
    where = "noise_multiplier_for_epsilon"
    is_number = isinstance(target_epsilon, (int, float)) and not isinstance(target_epsilon, bool)
    target = float(target_epsilon) if is_number else math.nan
    if not 0 < target < math.inf:
        raise ValueError(f"{where}: target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise ValueError(f"{where}: tol must be a number > 0, got {tol!r}")
    delta = check_delta(delta, where)
    q = check_sample_rate(sample_rate, where)
    n = check_steps(steps, where, "steps")
    if n == 0:
        raise ValueError(f"{where}: steps must be >= 1, got {steps!r}")
    make_accountant(accountant)  # validate the name before any work

    def eps(sigma: float) -> float:
        with warnings.catch_warnings():  # "best order at the edge" is expected for far-off trial sigmas
            warnings.simplefilter("ignore")
            return epsilon(sigma, q, n, delta, accountant, **kwargs)

    sigma_low, sigma_high, eps_high = 0.0, 10.0, math.inf
    while eps_high > target:
        sigma_high *= 2
        eps_high = eps(sigma_high)
        if sigma_high > _MAX_SIGMA:
            raise ValueError(
                f"{where}: target_epsilon={target_epsilon} at delta={delta} is out of reach with "
                f"sample_rate={sample_rate} and steps={steps} (noise_multiplier would exceed {_MAX_SIGMA:g})"
            )
    if target - eps_high > tol:  # bisection ahead: is the floor already within budget?
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eps_floor = epsilon(MIN_SEARCH_SIGMA, q, n, delta, "rdp")
        if eps_floor <= target:
            warnings.warn(
                f"{where}: target_epsilon={target_epsilon} is so large that noise_multiplier="
                f"{MIN_SEARCH_SIGMA} (the smallest searched) already gives epsilon {eps_floor:.4g}; using it. "
                "Such a budget gives no meaningful privacy guarantee", UserWarning, stacklevel=2)
            return MIN_SEARCH_SIGMA
    for _ in range(_MAX_BISECTIONS):
        if not target - eps_high > tol or sigma_high - sigma_low <= 1e-12 * sigma_high:
            break
        sigma = (sigma_low + sigma_high) / 2
        if sigma < MIN_SEARCH_SIGMA:  # epsilon there exceeds eps_floor > target: not evaluated
            sigma_low = sigma
            continue
        e = eps(sigma)
        if e < target:
            sigma_high, eps_high = sigma, e
        else:
            sigma_low = sigma
    return sigma_high
