"""Tasks with a per-example loss, trainable with or without DP-SGD on the one loop.

A classification fine-tune (CLIP's image tower, a BERT classifier, ...) needs the same DP
machinery whatever the model: the DP flags (:class:`DPOptions`), the noise multiplier (given, or
searched for a target epsilon), the task's own gradient step (:class:`~polymodal.train.dp.DPSGD`:
per-example clipping, noise from the run's key, the accountant), Poisson-sampled batches under DP
and uniformly drawn ones without, and the accountant saved in the checkpoint so that a DP run
resumes exactly. :class:`PerExampleTask` holds it once; a task subclasses it, defines
``per_example(params, state, batch) -> losses (B,)`` and calls :meth:`PerExampleTask.setup`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...core import random as pr
from ...core.pytree import Params
from ..task import LossOutput, option
from .checks import check_dp_flags

__all__ = ["DPOptions", "PerExampleTask"]

_DP = "differential privacy"


@dataclass
class DPOptions:
    """The DP-SGD flags of a task's options (a base dataclass: the task's options subclass it)."""

    dp: bool = option(False, "DP-SGD (Poisson sampling, per-example clipping, noise)", group=_DP)
    max_grad_norm: float = option(1.0, "per-example clipping bound C", group=_DP)
    noise_multiplier: float | None = option(None, "Gaussian noise std / C", group=_DP)
    target_epsilon: float | None = option(None, "pick the noise for this epsilon", group=_DP)
    delta: float = option(1e-5, "delta of the (epsilon, delta) guarantee", group=_DP)

    def __post_init__(self) -> None:
        check_dp_flags(dp=self.dp, noise_multiplier=self.noise_multiplier, target_epsilon=self.target_epsilon,
                       delta=self.delta, max_grad_norm=self.max_grad_norm)


class PerExampleTask:
    """Loss, DP step, batches, optimizer and resumable accountant of a per-example-loss task.

    A subclass sets ``self.options`` (a :class:`DPOptions`), ``self.loop``, ``self.root`` (the run's
    key), ``self.steps`` and ``self.num_samples``, calls :meth:`setup`, and defines
    ``per_example(params, state, batch) -> (B,)`` and ``batch(indices) -> batch``.
    """

    step = None  # the loop's hook: set to the DP step when options.dp

    def setup(self) -> None:
        """The sample rate and, under DP, the noise multiplier (searched for ``target_epsilon``)."""
        o = self.options
        self.sample_rate = min(1.0, self.loop.batch_size / self.num_samples)
        self.noise_multiplier, self._dp, self._dp_state = None, None, None
        if o.dp:
            from .dpsgd import noise_multiplier_for

            self.noise_multiplier = o.noise_multiplier
            if o.target_epsilon is not None:
                self.noise_multiplier = noise_multiplier_for(o.target_epsilon, delta=o.delta,
                                                             sample_rate=self.sample_rate, steps=self.steps)
            self.step = self._dp_step

    def per_example(self, params: Params, state: Params | None, batch: Any) -> Tensor:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__}.per_example")

    def batch(self, indices: list[int]) -> Any:  # pragma: no cover
        raise NotImplementedError(f"{type(self).__name__}.batch")

    def loss(self, params: Params, state: Params | None, batch: dict, key: Tensor) -> LossOutput:
        losses = self.per_example(params, state, batch)
        return LossOutput(losses.mean(), {"batch": len(losses)}, state)

    def _dp_step(self, params: Params, state: Params | None, batch: dict, key: Tensor, *, step: int,
                 optimizer: torch.optim.Optimizer) -> LossOutput:
        from .dpsgd import DPSGD

        if self._dp is None:  # params' leaves are the optimizer's, the same every step
            o = self.options
            self._dp = DPSGD(lambda p, b: self.per_example(p, state, b), params, optimizer,
                             max_grad_norm=o.max_grad_norm, sample_rate=self.sample_rate,
                             num_samples=self.num_samples, delta=o.delta, key=pr.fold_in(self.root, 3),
                             noise_multiplier=self.noise_multiplier)
            if self._dp_state is not None:
                self._dp.load_state_dict(self._dp_state)
        res = self._dp.step(batch)
        return LossOutput(res.loss, {"epsilon": res.epsilon, "clipped": res.clipped,
                                     "batch": len(batch["labels"])}, state)

    def state_dict(self) -> dict:
        if self._dp is not None:
            return {"dp": self._dp.state_dict()}
        return {"dp": self._dp_state} if self._dp_state is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._dp_state = state.get("dp")

    def train_batches(self, start_step: int, rank: int, world: int) -> Iterator[Any]:
        """Poisson-sampled batches under DP (the accountant's assumption), else ``batch_size``
        indices drawn uniformly per step; both a pure function of the run's key and the step."""
        if world > 1:
            raise ValueError(f"the {self.name} task trains on one process (--nproc 1)")
        if self.options.dp:
            from .sampling import PoissonBatchSampler

            sampler = PoissonBatchSampler(self.num_samples, self.sample_rate, self.steps, key=pr.fold_in(self.root, 4))
            return (self.batch(sampler.batch(s)) for s in range(start_step, self.steps))
        return (self.batch(pr.randint(pr.fold_in(self.root, 5 + s), (self.loop.batch_size,), 0,
                                      self.num_samples).tolist())
                for s in range(start_step, self.steps))

    def optimizer(self, leaves: dict[str, Tensor], loop: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(list(leaves.values()), lr=loop.lr, weight_decay=loop.weight_decay)

    def dp_metrics(self) -> dict:
        """``epsilon`` spent so far and the noise multiplier (DP runs), for ``evaluate``."""
        if not self.options.dp:
            return {}
        return {"epsilon": self._dp.epsilon if self._dp is not None else 0.0, "noise_multiplier": self.noise_multiplier}
