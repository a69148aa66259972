"""Batch normalisation with running statistics as explicit state.

``y, new_state = BatchNorm(C)(params, x, state, training=...)``: in training the batch
statistics normalise ``x`` and the running statistics in ``new_state`` advance exactly as
``torch.nn.BatchNorm{1,2,3}d`` would advance its buffers; in eval (and always when
``frozen=True``, TorchMultimodal/MDETR's ``FrozenBatchNorm2d``) the running statistics
normalise and the state comes back unchanged. The input state is never modified.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from ..pytree import Params
from ..spec import Spec, check_floating, check_tensor

__all__ = ["BatchNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

_SHAPES = {1: ("(B, C) or (B, C, L)", (2, 3)), 2: ("(B, C, H, W)", (4,)), 3: ("(B, C, T, H, W)", (5,))}


def outside_func_transforms() -> bool:
    """No torch.func transform (vmap, grad, jvp) is active around this call: tensors are plain,
    so in-place updates of fresh tensors and memory formats mean what they say."""
    return torch._C._functorch.maybe_current_level() is None


@dataclass(frozen=True)
class BatchNorm(Spec):
    """Normalise each channel (axis 1) over the batch and spatial axes.

    Params ``weight``/``bias`` of ``(C,)`` (when ``affine``); state ``running_mean (C,)``,
    ``running_var (C,)``, ``num_batches_tracked ()`` int64 — together exactly the
    ``state_dict`` keys of ``torch.nn.BatchNorm2d``.

    Input ``(B, C)`` / ``(B, C, L)`` for ``dims=1``, ``(B, C, H, W)`` for ``dims=2``,
    ``(B, C, T, H, W)`` for ``dims=3``; output has the same shape. Under ``vmap`` each mapped
    slice is its own batch (its own statistics and its own updated state).

    >>> import torch
    >>> bn = BatchNorm(3)
    >>> p, s = bn.init(key=None), bn.init_state()
    >>> y, s2 = bn(p, torch.randn(4, 3, 5, 5), s, training=True)
    >>> y.shape, int(s2["num_batches_tracked"]), int(s["num_batches_tracked"])
    (torch.Size([4, 3, 5, 5]), 1, 0)
    """

    num_features: int  # C, the channel axis (axis 1)
    eps: float = 1e-5  # added to the variance
    momentum: float | None = 0.1  # running-stat update factor; None = cumulative average (as torch)
    affine: bool = True  # learn per-channel weight and bias
    dims: int = 2  # spatial rank: 1 for (B, C[, L]), 2 for (B, C, H, W), 3 for (B, C, T, H, W)
    frozen: bool = False  # always normalise with the running stats and never update them

    def __post_init__(self) -> None:
        if self.dims not in _SHAPES:
            raise ValueError(f"{type(self).__name__}: dims must be 1, 2 or 3, got {self.dims}")
        if self.momentum is not None and not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"{type(self).__name__}: momentum must be in [0, 1] or None, got {self.momentum}")

    def init(self, *, key: Tensor | None = None) -> Params:
        if not self.affine:
            return {}
        return {"weight": torch.ones(self.num_features), "bias": torch.zeros(self.num_features)}

    def init_state(self) -> Params:
        return {
            "running_mean": torch.zeros(self.num_features),
            "running_var": torch.ones(self.num_features),
            "num_batches_tracked": torch.zeros((), dtype=torch.int64),
        }

    def _check(self, x: Tensor) -> None:
        check_floating(x, "x", self)
        doc, ranks = _SHAPES[self.dims]
        doc = doc.replace("C", str(self.num_features))
        if x.dim() not in ranks or x.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}: x: expected shape {doc}, got {tuple(x.shape)}")

    def __call__(
        self, params: Params, x: Tensor, state: Params | None = None, *, training: bool = False
    ) -> tuple[Tensor, Params]:
        """Args: ``x`` as above; ``state`` from :meth:`init_state` (None = fresh statistics);
        ``training`` selects batch statistics and the state update.
        Returns ``(y, new_state)`` with ``y`` shaped like ``x``."""
        self._check(x)
        if state is None:
            state = {k: v.to(x.device) for k, v in self.init_state().items()}
        for k in ("running_mean", "running_var", "num_batches_tracked"):
            check_tensor(state.get(k), f"state[{k!r}]", self)
        w, b = params.get("weight"), params.get("bias")
        rm, rv, nbt = state["running_mean"], state["running_var"], state["num_batches_tracked"]
        if not training or self.frozen:
            return F.batch_norm(x, rm, rv, w, b, False, 0.0, self.eps), state
        axes = [0] + list(range(2, x.dim()))
        n = x.numel() // x.shape[1]
        if n < 2:
            raise ValueError(
                f"{type(self).__name__}: expected more than 1 value per channel when training, got input {tuple(x.shape)}"
            )
        if self.momentum is not None and outside_func_transforms() and rm.dtype == rv.dtype == x.dtype:
            # One pass: batch_norm updates fresh copies of the running statistics in place
            # (outside autograd, as torch does its buffers); the input state stays untouched.
            rm, rv = rm.detach().clone(), rv.detach().clone()
            y = F.batch_norm(x, rm, rv, w, b, True, self.momentum, self.eps)
            # autograd keeps rm / rv for the backward: hand out copies, free to be modified
            return y, {"running_mean": rm.clone(), "running_var": rv.clone(), "num_batches_tracked": nbt + 1}
        # Under vmap / grad transforms (the statistics would be batched while the copies are
        # not), with cumulative averaging or mixed dtypes: compute the statistics separately.
        y = F.batch_norm(x, None, None, w, b, True, 0.0, self.eps)
        # torch updates its buffers outside autograd: the statistics carry no gradient.
        var, mean = torch.var_mean(x.detach(), dim=axes, correction=1)
        nbt = nbt + 1
        m = 1.0 / nbt.to(rm.dtype) if self.momentum is None else self.momentum
        new_state = {
            "running_mean": (1 - m) * rm.detach() + m * mean.to(rm.dtype),
            "running_var": (1 - m) * rv.detach() + m * var.to(rv.dtype),
            "num_batches_tracked": nbt,
        }
        return y, new_state


@dataclass(frozen=True)
class BatchNorm1d(BatchNorm):
    """:class:`BatchNorm` over ``(B, C)`` or ``(B, C, L)`` (``torch.nn.BatchNorm1d``)."""

    dims: int = field(default=1, init=False)  # preset


@dataclass(frozen=True)
class BatchNorm2d(BatchNorm):
    """:class:`BatchNorm` over ``(B, C, H, W)`` (``torch.nn.BatchNorm2d``)."""

    dims: int = field(default=2, init=False)  # preset


@dataclass(frozen=True)
class BatchNorm3d(BatchNorm):
    """:class:`BatchNorm` over ``(B, C, T, H, W)`` (``torch.nn.BatchNorm3d``)."""

    dims: int = field(default=3, init=False)  # preset
