"""Differential privacy and per-sample gradients: one package for the machinery DP-SGD needs.

* ``per_sample``: per-example gradients and their norms of any pure loss (vmap, chunked);
* ``ghost`` / ``ghost_ops`` / ``ghost_trace``: norm-only ("ghost") clipping from a trace of the
  layers' inputs and output gradients, no per-example gradient materialised;
* ``dpsgd``: the DP-SGD step (:class:`DPSGD`, :func:`dp_train_step`);
* ``sampling``: Poisson batch sampling and bucketed collation;
* accounting, below.

Privacy accounting for DP-SGD (Poisson-subsampled Gaussian mechanism).

* ``RDPAccountant``: Rényi DP, the orders and epsilon conversion of Opacus's
  ``RDPAccountant`` (agrees with it to ~1e-9 relative; more accurate per order).
* ``PRVAccountant``: privacy random variables (Gopi et al. 2021), as Opacus's
  ``PRVAccountant``; tighter, returns an upper bound within ``eps_error``.
* ``epsilon(...)`` and ``noise_multiplier_for_epsilon(...)``: pure functions.

Accountants record ``step(noise_multiplier=..., sample_rate=..., num_steps=...)``
(the schedule may change over training) and save/restore with
``state_dict()`` / ``load_state_dict()``. See ``docs/privacy.md`` for what the
numbers mean, and for why contrastive losses need more than per-example clipping.

>>> from polymodal.train.dp import RDPAccountant, epsilon
>>> acc = RDPAccountant()
>>> acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=1000)
>>> acc.get_epsilon(delta=1e-5) == epsilon(1.0, 0.01, 1000, delta=1e-5)
True
"""

from .accountant import Accountant
from .dpsgd import DPSGD, DPStepOutput, dp_train_step, gaussian_noise, noise_multiplier_for
from .accounting import ACCOUNTANTS, epsilon, make_accountant, noise_multiplier_for_epsilon
from .prv import PRVAccountant
from .rdp import DEFAULT_ORDERS, RDPAccountant, compute_rdp, rdp_to_epsilon

__all__ = [
    "DPSGD",
    "DPStepOutput",
    "dp_train_step",
    "gaussian_noise",
    "noise_multiplier_for",
    "Accountant",
    "RDPAccountant",
    "PRVAccountant",
    "ACCOUNTANTS",
    "DEFAULT_ORDERS",
    "make_accountant",
    "epsilon",
    "noise_multiplier_for_epsilon",
    "compute_rdp",
    "rdp_to_epsilon",
]
