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
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .pytree import Params

__all__ = [
    "Spec", "check_tensor", "check_last_dim", "check_ndim", "check_floating", "check_dtype", "check_ids",
    "take_params", "check_param_dtype", "check_sizes", "reading_values_ok",
]


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


def reading_values_ok(*tensors: Tensor) -> bool:
    """Neither ``torch.compile`` tracing nor a ``torch.func`` transform (vmap, grad) is active and
    none of ``tensors`` is a fake tensor (shape inference), so a check may read their values
    (``int(ids.max())``) without breaking a graph or a transform."""
    if torch.compiler.is_compiling() or torch._C._functorch.maybe_current_level() is not None:
        return False
    return not any(_is_fake(t) for t in tensors)


def _is_fake(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def check_ids(ids: Tensor, name: str, vocab_size: int, spec: object | None = None) -> Tensor:
    """Integer ids in ``[0, vocab_size)``.

    The dtype is always checked. The values only on CPU and outside ``torch.compile`` / ``torch.func``
    transforms (:func:`reading_values_ok`): there an out-of-range id would otherwise be an unclear
    ``IndexError``, and reading the min / max costs no device sync (about 5 us per call). On
    accelerators the check would
    stall the device queue on every call, so it is left to the kernel (a device-side assert on CUDA):
    validate ids on the host (the tokenizers' ids always fit their vocabulary).
    """
    check_dtype(ids, name, (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8), spec)
    if ids.device.type == "cpu" and ids.numel() and reading_values_ok(ids):
        lo, hi = (int(t) for t in torch.aminmax(ids))
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{_where(name, spec)}: expected ids in [0, {vocab_size}) (the vocabulary size is "
                             f"{vocab_size}), got ids from {lo} to {hi}")
    return ids


def take_params(params: Params, spec: object, **wanted: bool) -> tuple:
    """The entries a spec uses from its ``params``: each ``name=True`` must be present, each
    ``name=False`` absent (or ``None``: returned as ``None``), so a missing bias is an error, not
    silently a layer without one. One dict lookup per name: cheap on the hot path.

    >>> take_params({"weight": 1, "bias": 2}, None, weight=True, bias=True)
    (1, 2)
    """
    try:  # the fast path: one lookup per name
        got = tuple([params.get(k) for k in wanted])
    except AttributeError:
        raise TypeError(f"{_where('params', spec)}: expected a dict of tensors, got {type(params).__name__}") from None
    for v, need in zip(got, wanted.values()):
        if (v is None) == need:
            missing = [k for k, need in wanted.items() if need and params.get(k) is None]
            extra = [k for k, need in wanted.items() if not need and params.get(k) is not None]
            expected = sorted(k for k, need in wanted.items() if need)
            raise ValueError(f"{_where('params', spec)}: expected keys {expected}, got {sorted(params)}"
                             + (f" (missing {missing})" if missing else "")
                             + (f" ({extra} given, but the spec was built without them)" if extra else ""))
    return got


def check_param_dtype(x: Tensor, name: str, param: Tensor, spec: object | None = None) -> Tensor:
    """``x`` in the floating dtype of the params it meets (``param``), unless autocast is on.

    A float64 or bfloat16 input against float32 params is an error naming both dtypes (torch's own
    message names neither layer nor fix). Under ``torch.autocast`` for ``x``'s device the kernels cast
    their inputs themselves, so mixed dtypes are what is intended and pass.
    """
    if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(f"{_where(name, spec)}: expected dtype {param.dtype} (the params' dtype), got {x.dtype}: "
                        f"cast the input (x.to({param.dtype})) or the params (pytree.cast), or run under "
                        "torch.autocast")
    return x


def check_sizes(spec: object, **sizes: object) -> None:
    """Each size (a layer's width, count, ...) is an int ``>= 0``; for ``__post_init__``."""
    for name, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{_where(name, spec)}: expected an int >= 0, got {v!r}")
