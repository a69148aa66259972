"""DP-SGD over any polymodal model: per-example clipping, Gaussian noise from a key, accounting.

One step (Abadi et al. 2016, with Poisson sampling as the accountants assume)::

    g = (sum_i c_i g_i + sigma * C * xi) / expected_batch_size,   c_i = min(1, C / ||g_i||),   xi ~ N(0, I)

``dp_train_step`` computes ``g`` (by the norm-only ghost step of :mod:`.ghost` or, with
``method="vmap"``, from full per-example gradients), and, given a torch optimizer over the
parameter leaves, writes ``g`` into each leaf's ``.grad`` and calls ``optimizer.step()``.
:class:`DPSGD` keeps the step counter and a privacy accountant and reports epsilon after
each step; ``noise_multiplier_for`` picks the noise for a target epsilon.

Noise: step ``s`` draws from ``fold_in(key, s)`` (one sub-key per parameter leaf), so the same
key gives the same noise and a resumed run continues the same sequence. ``noise="generator"``
(default) seeds torch's generator of the leaf's device from that sub-key (fast; the same on
any machine with the same device type); ``noise="portable"`` uses ``core.random.normal``
(identical on every device, but ~200 ns per parameter on CPU). Neither is a cryptographic
generator (Opacus's ``secure_mode`` is out of scope).

>>> import torch
>>> from polymodal.core import pytree, random as pr
>>> from polymodal.core.layers import Linear
>>> lin = Linear(3, 2)
>>> params = lin.init(key=pr.key(0))
>>> loss = lambda p, b: ((lin(p, b["x"]) - b["y"]) ** 2).sum(-1)
>>> opt = torch.optim.SGD(pytree.leaves(params), lr=0.1)
>>> dp = DPSGD(loss, params, opt, max_grad_norm=1.0, noise_multiplier=1.0, sample_rate=0.01,
...            num_samples=1000, delta=1e-5, key=pr.key(1))
>>> out = dp.step({"x": torch.randn(10, 3), "y": torch.randn(10, 2)})
>>> out.step, out.epsilon > 0, params["weight"].grad.shape
(1, True, torch.Size([2, 3]))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from polymodal.core import pytree
from polymodal.core import random as pr
from polymodal.core.pytree import Params

from .ghost import clip_factors, ghost_clip
from .per_sample import Trainable, cat_aux, iter_chunks, batch_size, grads_tree, sq_norms_of, trainable_names
from .accounting import make_accountant, noise_multiplier_for_epsilon

__all__ = ["dp_train_step", "DPSGD", "DPStepOutput", "gaussian_noise", "noise_multiplier_for"]


class DPStepOutput(NamedTuple):
    """What :func:`dp_train_step` and :meth:`DPSGD.step` return."""

    grads: Any  # the noisy averaged gradient, shaped like params (None at frozen leaves)
    loss: Tensor  # mean loss over the real (unmasked) examples, detached
    norms: Tensor  # (B,) per-example gradient norms before clipping
    clipped: float  # fraction of real examples whose gradient was scaled down
    aux: Any  # loss_fn's aux (has_aux)
    step: int  # the step number used for the noise (DPSGD: steps taken so far)
    epsilon: float | None = None  # DPSGD: epsilon spent so far at its delta
    fallback: tuple[str, ...] = ()  # parameters computed by vmap (method="ghost")
    nonfinite: int = 0  # real examples left out because their gradient was not finite (NaN / inf)


def gaussian_noise(key: Tensor, like: Params, std: float, *, noise: str = "generator") -> Params:
    """Independent ``N(0, std^2)`` noise for every leaf of ``like`` (``None`` leaves stay ``None``).

    >>> from polymodal.core import random as pr
    >>> a = gaussian_noise(pr.key(0), {"w": torch.zeros(3), "b": None}, 1.0)
    >>> bool((a["w"] == gaussian_noise(pr.key(0), {"w": torch.zeros(3), "b": None}, 1.0)["w"]).all()), a["b"]
    (True, None)
    """
    if noise not in ("generator", "portable"):
        raise ValueError(f"gaussian_noise: noise must be 'generator' or 'portable', got {noise!r}")
    flat = pytree.flatten(like)
    draws = _draws(key, list(flat.values()), noise)
    return grads_tree(like, {name: z.mul_(std) for name, z in zip(flat, draws)})


def _draws(key: Tensor, likes: list[Tensor], noise: str):
    """One standard normal tensor shaped like each of ``likes``, each from its own sub-key of ``key``
    (generated lazily, one at a time)."""
    n = max(len(likes), 1)
    if noise == "portable":
        for k, t in zip(pr.split(key, n), likes):
            yield pr.normal(k.to(t.device), t.shape, dtype=t.dtype)
        return
    for (w0, w1), t in zip(pr.bits(key, (n, 2)).tolist(), likes):  # one 64-bit seed per leaf
        gen = torch.Generator(device=t.device).manual_seed((w0 << 32 | w1) & ((1 << 63) - 1))
        yield torch.randn(t.shape, generator=gen, device=t.device, dtype=t.dtype)


def _add_noise(sums: Any, key: Tensor, std: float, noise: str) -> Any:
    """``sums + N(0, std^2)`` in place, with :func:`gaussian_noise`'s draws."""
    flat = list(pytree.flatten(sums).values())
    if std > 0:
        for s, z in zip(flat, _draws(key, flat, noise)):
            s.add_(z, alpha=std)
    return sums


def _vmap_clip(loss_fn, params, batch, max_grad_norm, trainable, key, mask, chunk_size, has_aux, scale):
    """The reference path: full per-example gradients (chunked vmap), then clip and sum."""
    names = trainable_names(params, trainable)
    parts = list(iter_chunks(loss_fn, params, names, batch, key, chunk_size, has_aux))
    flat = parts[0][0] if len(parts) == 1 else {k: torch.cat([g[k] for g, _, _ in parts]) for k in names}
    norms = torch.stack([sq_norms_of(v) for v in flat.values()]).sum(0).sqrt()
    c = clip_factors(norms, max_grad_norm, mask) * scale  # 0 for non-finite norms
    bad = ~torch.isfinite(norms)
    if bool(bad.any()):  # left out: 0 * inf would be nan
        flat = {k: v.masked_fill(bad.reshape((-1,) + (1,) * (v.dim() - 1)), 0.0) for k, v in flat.items()}
    sums = {k: torch.tensordot(c.to(v.dtype), v, dims=1) for k, v in flat.items()}
    losses = torch.cat([l for _, l, _ in parts])
    return grads_tree(params, sums), norms, losses, cat_aux([a for _, _, a in parts]), ()


def dp_train_step(loss_fn: Callable, params: Params, batch: Any, *, max_grad_norm: float, noise_multiplier: float,
                  expected_batch_size: float, key: Tensor, step: int = 0, optimizer: torch.optim.Optimizer | None = None,
                  mask: Tensor | None = None, loss_key: Tensor | None = None, method: str = "ghost",
                  trainable: Trainable = None, chunk_size: int | None = None, has_aux: bool = False,
                  noise: str = "generator", nonfinite: str = "skip") -> DPStepOutput:
    """One DP-SGD gradient (and optimizer step): clip per example, sum, add noise, average.

    Non-finite per-example gradients (a NaN input, an overflow): such an example has no
    direction to clip to. With ``nonfinite="skip"`` (default) it is left out of the sum (it
    contributes 0, within the clipping bound the privacy analysis assumes), counted in
    ``DPStepOutput.nonfinite`` and left out of the reported loss; the other examples and the
    noise update the parameters as usual. With ``nonfinite="raise"`` a ``FloatingPointError``
    naming the examples is raised before any parameter is updated (and, in :class:`DPSGD`,
    before the accountant advances).

    Args:
        loss_fn: ``(params, batch[, key=]) -> losses (B,)`` (see :mod:`.per_sample`).
        params: the parameter tree; with ``optimizer``, its leaves are the optimizer's tensors.
        batch: pytree of tensors with a leading example axis ``B`` (a Poisson batch, maybe padded).
        max_grad_norm: the clipping bound ``C > 0``.
        noise_multiplier: ``sigma >= 0``; the noise std is ``sigma * C``.
        expected_batch_size: ``sample_rate * num_samples``, the divisor under Poisson sampling.
        key: noise key; step ``step`` draws from ``fold_in(key, step)``.
        optimizer: if given, ``leaf.grad`` is set for trainable leaves and ``optimizer.step()`` runs.
        mask: ``(B,)`` bool, False for padding rows (they add nothing).
        loss_key: dropout key; the loss gets ``fold_in(loss_key, step)`` (``None``: no key).
        method: ``"ghost"`` (norm-only, book-keeping) or ``"vmap"`` (full per-example gradients).
        trainable, chunk_size, has_aux: as in :func:`.per_sample.per_sample_grads`.
        noise: ``"generator"`` or ``"portable"`` (see the module docstring).
        nonfinite: ``"skip"`` or ``"raise"`` (above).

    Returns:
        :class:`DPStepOutput`.
    """
    if not max_grad_norm > 0:
        raise ValueError(f"dp_train_step: max_grad_norm must be > 0, got {max_grad_norm!r}")
    if not noise_multiplier >= 0:
        raise ValueError(f"dp_train_step: noise_multiplier must be >= 0, got {noise_multiplier!r}")
    if not expected_batch_size > 0:
        raise ValueError(f"dp_train_step: expected_batch_size must be > 0, got {expected_batch_size!r}")
    if noise not in ("generator", "portable"):
        raise ValueError(f"dp_train_step: noise must be 'generator' or 'portable', got {noise!r}")
    if nonfinite not in ("skip", "raise"):
        raise ValueError(f"dp_train_step: nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
    n = batch_size(batch)
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.shape != (n,) or mask.dtype != torch.bool:
            raise ValueError(f"dp_train_step: mask: expected a ({n},) bool tensor, got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
    lk = None if loss_key is None else pr.fold_in(loss_key, step)
    if method == "ghost":
        res = ghost_clip(loss_fn, params, batch, max_grad_norm=max_grad_norm, trainable=trainable, key=lk, mask=mask,
                         chunk_size=chunk_size, has_aux=has_aux, scale=1.0 / expected_batch_size)
        sums, norms, losses, aux, fallback = res.grads, res.norms, res.losses, res.aux, res.fallback
    elif method == "vmap":
        sums, norms, losses, aux, fallback = _vmap_clip(loss_fn, params, batch, max_grad_norm, trainable, lk, mask,
                                                        chunk_size, has_aux, 1.0 / expected_batch_size)
    else:
        raise ValueError(f"dp_train_step: method must be 'ghost' or 'vmap', got {method!r}")
    real = torch.ones(n, dtype=torch.bool, device=norms.device) if mask is None else mask.to(norms.device)
    bad = ~torch.isfinite(norms) & real
    n_bad = int(bad.sum())
    if n_bad and nonfinite == "raise":
        idx = bad.nonzero().flatten().tolist()
        raise FloatingPointError(
            f"dp_train_step: expected finite per-example gradients, got NaN/inf for {n_bad} example(s) "
            f"(batch rows {idx[:10]}{' ...' if n_bad > 10 else ''}); nothing was updated. "
            "nonfinite='skip' leaves such examples out instead")
    # the sums come divided by the expected batch size (folded into the clip factors)
    grads = _add_noise(sums, pr.fold_in(key, step), noise_multiplier * max_grad_norm / expected_batch_size, noise)
    count = max(int(real.sum()), 1)
    good = real & ~bad
    loss = torch.where(good.to(losses.device), losses, losses.new_zeros(())).sum() / max(count - n_bad, 1)
    clipped = float(((norms > max_grad_norm) & good).sum()) / count
    if optimizer is not None:
        leaves = pytree.flatten(params)
        for name, g in pytree.flatten(grads).items():
            leaves[name].grad = g.to(leaves[name].dtype)
        optimizer.step()
    return DPStepOutput(grads, loss, norms, clipped, aux, step, None, fallback, n_bad)


def noise_multiplier_for(target_epsilon: float, *, delta: float, sample_rate: float, steps: int | None = None,
                         epochs: float | None = None, accountant: str = "rdp", tol: float = 0.01) -> float:
    """The smallest noise multiplier whose epsilon after ``steps`` (or ``epochs / sample_rate``
    steps) stays within ``target_epsilon``.

    >>> round(noise_multiplier_for(8.0, delta=1e-5, sample_rate=256 / 50_000, epochs=10), 2)
    0.56
    """
    if (steps is None) == (epochs is None):
        raise ValueError("noise_multiplier_for: give exactly one of steps or epochs")
    if steps is None:
        if not epochs > 0:
            raise ValueError(f"noise_multiplier_for: epochs must be > 0, got {epochs!r}")
        steps = max(1, int(round(epochs / sample_rate)))
    return noise_multiplier_for_epsilon(target_epsilon, delta, sample_rate, steps, accountant=accountant, tol=tol)


class DPSGD:
    """DP-SGD over a torch optimizer: :func:`dp_train_step` plus a step counter and an accountant.

    Args:
        loss_fn: ``(params, batch[, key=]) -> losses (B,)``.
        params: the parameter tree whose leaves ``optimizer`` updates in place.
        optimizer: any ``torch.optim`` optimizer over (some of) the leaves, or None to only
            compute ``DPStepOutput.grads``.
        max_grad_norm: clipping bound ``C``.
        noise_multiplier: ``sigma``; or leave None and give ``target_epsilon`` with ``steps`` or
            ``epochs`` to pick the smallest ``sigma`` that stays within the budget.
        sample_rate: Poisson sampling rate ``q`` (``PoissonBatchSampler``'s).
        num_samples: data set size ``N``; the gradient is divided by ``q * N``.
        delta: the delta epsilon is reported at.
        key: noise key (step ``s`` uses ``fold_in(key, s)``). loss_key: dropout key, or None.
        accountant: ``"rdp"`` or ``"prv"``.
        method, trainable, chunk_size, has_aux, noise, nonfinite: as in :func:`dp_train_step`.

    ``noise_multiplier=0`` is refused: it trains with epsilon = inf, i.e. no privacy at all (for
    clipping without noise, call :func:`dp_train_step` directly).

    ``step(batch, mask=None)`` takes one step and returns :class:`DPStepOutput` with the epsilon
    spent so far; ``state_dict()`` / ``load_state_dict()`` save the step and the accountant (the
    optimizer saves its own state), so a resumed run draws the same noise.
    """

    def __init__(self, loss_fn: Callable, params: Params, optimizer: torch.optim.Optimizer | None = None, *,
                 max_grad_norm: float, sample_rate: float, num_samples: int, delta: float, key: Tensor,
                 noise_multiplier: float | None = None, target_epsilon: float | None = None,
                 steps: int | None = None, epochs: float | None = None, loss_key: Tensor | None = None,
                 accountant: str = "rdp", method: str = "ghost", trainable: Trainable = None,
                 chunk_size: int | None = None, has_aux: bool = False, noise: str = "generator",
                 nonfinite: str = "skip") -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"DPSGD: sample_rate must be in (0, 1], got {sample_rate!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"DPSGD: num_samples must be an int >= 1, got {num_samples!r}")
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ValueError("DPSGD: give exactly one of noise_multiplier or target_epsilon (with steps or epochs)")
        if target_epsilon is not None:
            noise_multiplier = noise_multiplier_for(target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps,
                                                    epochs=epochs, accountant=accountant)
        try:
            sigma = float(noise_multiplier)
        except (TypeError, ValueError):
            sigma = float("nan")
        if isinstance(noise_multiplier, bool) or not 0 < sigma < float("inf"):
            raise ValueError(
                f"DPSGD: noise_multiplier must be a finite number > 0, got {noise_multiplier!r}"
                + (": without noise epsilon is infinite (no privacy); for clipping alone call dp_train_step"
                   if noise_multiplier == 0 else ""))
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"DPSGD: nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        self.loss_fn, self.params, self.optimizer = loss_fn, params, optimizer
        self.max_grad_norm, self.noise_multiplier = float(max_grad_norm), float(noise_multiplier)
        self.sample_rate, self.num_samples, self.delta = float(sample_rate), num_samples, float(delta)
        self.key, self.loss_key = key, loss_key
        self.accountant = make_accountant(accountant)
        self.options = dict(method=method, trainable=trainable, chunk_size=chunk_size, has_aux=has_aux, noise=noise,
                            nonfinite=nonfinite)
        self.steps_taken = 0

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.num_samples

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (0 before the first step)."""
        return self.accountant.get_epsilon(self.delta) if self.accountant.history else 0.0

    def step(self, batch: Any, mask: Tensor | None = None) -> DPStepOutput:
        out = dp_train_step(self.loss_fn, self.params, batch, max_grad_norm=self.max_grad_norm,
                            noise_multiplier=self.noise_multiplier, expected_batch_size=self.expected_batch_size,
                            key=self.key, step=self.steps_taken, optimizer=self.optimizer, mask=mask,
                            loss_key=self.loss_key, **self.options)
        self.steps_taken += 1
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return out._replace(step=self.steps_taken, epsilon=self.epsilon)

    def state_dict(self) -> dict[str, Any]:
        return {"steps_taken": self.steps_taken, "accountant": self.accountant.state_dict(),
                "noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm,
                "sample_rate": self.sample_rate}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("noise_multiplier", "max_grad_norm", "sample_rate"):
            if k in state and float(state[k]) != getattr(self, k):
                raise ValueError(f"DPSGD.load_state_dict: {k} was {state[k]}, this run uses {getattr(self, k)}")
        self.steps_taken = int(state["steps_taken"])
        self.accountant.load_state_dict(state["accountant"])
