"""The layer-spec contract and input checks shared by every spec.

A spec is a frozen dataclass of static hyperparameters (hashable, no tensors) with

* ``init(*, key) -> Params``: fresh parameters, split from ``key`` per sub-parameter;
* ``__call__(params, *inputs, ...)``: the pure forward.

Randomness at call time (dropout, drop-path, masking) takes a keyword ``key``;
``key=None`` means deterministic inference. A stateful spec (``init_state()`` is not
``None``: running statistics, codebooks, caches) takes ``state`` (``None``: a fresh
``init_state()``) and always returns ``(out, new_state)``, whatever the mode; a stateless
spec returns ``out`` alone. A model spec holds its sub-specs as fields (built once by a
builder function), so traced code rarely builds specs.

>>> from dataclasses import dataclass
>>> import torch
>>> @dataclass(frozen=True)
... class Scale(Spec):
...     dim: int  # size of the last axis
...     def init(self, *, key):
...         return {"weight": torch.ones(self.dim)}
...     def __call__(self, params, x):
...         return x * params["weight"]
>>> s = Scale(3)
>>> s(s.init(key=None), torch.ones(2, 3)).shape
torch.Size([2, 3])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from .pytree import Params

__all__ = ["Spec", "check_tensor", "check_last_dim", "check_ndim", "check_floating", "check_dtype"]


class Spec:
    """Base class of layer specs (subclasses are ``@dataclass(frozen=True)``)."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "__hash__" not in cls.__dict__:  # placed before @dataclass runs, which then keeps it
            cls.__hash__ = Spec._field_hash

    def _field_hash(self) -> int:
        """The hash ``@dataclass(frozen=True)`` would give (the compared fields), except that a spec
        whose fields are not all set yet raises ``TypeError`` ("unhashable"), not ``AttributeError``.

        Why: torch.compile up to at least 2.11 hashes a spec that the traced code builds (``self.conv()``)
        before its fields exist, to ask whether it is a random function, and is prepared only for
        ``TypeError``; with the generated hash every such call failed to compile (InternalTorchDynamoError).
        torch 2.14 compiles those calls with the generated hash too; layers still build their helper
        specs in traced code (``LayerNorm(...)``, ``layer_at(i)``), so this stays while 2.11 is supported.
        """
        if not dataclasses.is_dataclass(self):
            return object.__hash__(self)
        try:
            values = tuple(getattr(self, f.name) for f in dataclasses.fields(self)
                           if (f.compare if f.hash is None else f.hash))
        except AttributeError as e:
            raise TypeError(f"{type(self).__name__} is not hashable before its fields are set ({e})") from None
        return hash(values)

    def init(self, *, key: Tensor) -> Params:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.init")

    def init_state(self) -> Params | None:
        """Initial mutable state (running statistics, caches), or ``None`` if stateless."""
        return None

    def block_stacks(self) -> list[str]:
        """Flat-key paths, in this spec's params, of the block lists its call runs through the seam
        (``core.layers.seam.run_layers``): what sharded training gathers block by block.

        Default: the stacks of the fields that are specs, under the field's name (a field
        ``encoder: TransformerEncoder`` declares ``"encoder.layers"``). A spec that runs a stack
        itself, or builds its sub-specs in methods, overrides this; ``seam.record_stacks`` checks
        a declaration against what a call actually runs.
        """
        if not dataclasses.is_dataclass(self):
            return []
        return [f"{f.name}.{s}" for f in dataclasses.fields(self) if isinstance(getattr(self, f.name, None), Spec)
                for s in getattr(self, f.name).block_stacks()]

    def __call__(self, params: Params, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__}.__call__")


def _where(name: str, spec: object | None) -> str:
    return f"{type(spec).__name__}: {name}" if spec is not None else name


def check_tensor(x: object, name: str, spec: object | None = None) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{_where(name, spec)} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_floating(x: Tensor, name: str, spec: object | None = None) -> Tensor:
    check_tensor(x, name, spec)
    if not (x.is_floating_point() or x.is_complex()):
        raise TypeError(f"{_where(name, spec)} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_ndim(x: Tensor, name: str, ndims: int | Sequence[int], shape_doc: str, spec: object | None = None) -> Tensor:
    """``x.dim()`` must be one of ``ndims``; the error quotes ``shape_doc`` (e.g. ``"(B, C, H, W)"``)."""
    check_tensor(x, name, spec)
    allowed = (ndims,) if isinstance(ndims, int) else tuple(ndims)
    if x.dim() not in allowed:
        raise ValueError(f"{_where(name, spec)}: expected shape {shape_doc}, got {tuple(x.shape)}")
    return x


def check_last_dim(x: Tensor, name: str, size: int, spec: object | None = None, min_ndim: int = 1) -> Tensor:
    """``x`` must end in an axis of ``size`` (e.g. features of a Linear)."""
    check_tensor(x, name, spec)
    if x.dim() < min_ndim or x.shape[-1] != size:
        raise ValueError(f"{_where(name, spec)}: expected shape (..., {size}), got {tuple(x.shape)}")
    return x


def check_dtype(x: Tensor, name: str, dtypes: Sequence[torch.dtype], spec: object | None = None) -> Tensor:
    check_tensor(x, name, spec)
    if x.dtype not in dtypes:
        raise TypeError(f"{_where(name, spec)}: expected dtype in {[str(d) for d in dtypes]}, got {x.dtype}")
    return x
