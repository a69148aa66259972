"""Privacy accounting for DP-SGD (Poisson-subsampled Gaussian mechanism).

* ``RDPAccountant``: Rényi DP, the orders and epsilon conversion of Opacus's
  ``RDPAccountant`` (agrees with it to ~1e-9 relative; more accurate per order).
* ``PRVAccountant``: privacy random variables (Gopi et al. 2021), as Opacus's
  ``PRVAccountant``; tighter, returns an upper bound within ``eps_error``.
* ``epsilon(...)`` and ``noise_multiplier_for_epsilon(...)``: pure functions.

Accountants record ``step(noise_multiplier=..., sample_rate=..., num_steps=...)``
(the schedule may change over training) and save/restore with
``state_dict()`` / ``load_state_dict()``. See ``docs/privacy.md`` for what the
numbers mean, and for why contrastive losses need more than per-example clipping.

>>> from polymodal.train.privacy import RDPAccountant, epsilon
>>> acc = RDPAccountant()
>>> acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=1000)
>>> acc.get_epsilon(delta=1e-5) == epsilon(1.0, 0.01, 1000, delta=1e-5)
True
"""

from .accountant import Accountant
from .functional import ACCOUNTANTS, epsilon, make_accountant, noise_multiplier_for_epsilon
from .prv import PRVAccountant
from .rdp import DEFAULT_ORDERS, RDPAccountant, compute_rdp, rdp_to_epsilon

__all__ = [
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
