"""The affine kernel ``act(x @ w.T + b)``, on oneDNN for CPU inference.

``F.linear`` on a float32 CPU tensor runs MKL's GEMM, and an activation after it is one more pass
over the output. Where no gradient is recorded, :func:`linear` runs oneDNN's linear instead
(``torch.ops.mkldnn._linear_pointwise``, what inductor's CPU freezing pass emits) with the
activation fused into it as a post-op: 5-10 % faster on the GEMMs of a Swin or ViT block on one
core, more with the activation. :func:`pack` goes further for weights that are read many times
with few rows each (autoregressive decoding): it reorders a weight once into oneDNN's blocked
layout, and a GEMV over it then streams the weight at about twice MKL's rate.

The fast path is taken only where it computes the same function as the fallback and nothing can
tell the difference but float rounding: float32, CPU, oneDNN present and enabled, plain tensors
(no subclass, no ``vmap`` / ``grad`` transform active), no input requiring a gradient while grad
mode is on, no CPU autocast (it casts ``F.linear``'s inputs, not oneDNN's), and not while
``torch.compile`` or ``torch.jit.trace`` traces (inductor makes its own choice; a traced graph, e.g. for
the legacy ONNX exporter, must hold portable ops). Anywhere else it is ``F.linear``
followed by the activation, so autograd, ``torch.func`` transforms, autocast and compilation see
exactly the ops they always did. :func:`fast_path` says which one a call takes.

oneDNN's GEMM wants the weight in a blocked layout, and with a dense weight it reorders the whole
matrix at every call: a read and a write of the weight besides the GEMM's own read, 10-25 % of a
call where the rows are few (a Swin's last stages, small batches). Inside :func:`frozen_weights`
each weight is reordered once, at its second call, and the blocked copy serves every later call in
the scope. The scope is a promise that the weights stay as they are; changes made through the tensor
(an optimizer step, ``copy_``, ``load_state_dict``) are still seen, through its version counter.

>>> import torch
>>> x, w, b = torch.randn(5, 3), torch.randn(4, 3), torch.randn(4)
>>> torch.allclose(linear(x, w, b, "gelu"), F.gelu(F.linear(x, w, b)), atol=1e-6)
True
"""

from __future__ import annotations

import threading
import weakref
from contextvars import ContextVar
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .activation import activation as get_activation

__all__ = ["Packed", "available", "fast_path", "frozen_weights", "linear", "pack", "FUSED_ACTIVATIONS", "MIN_MACS",
           "MIN_PACK"]

# activation name -> (oneDNN post-op, its algorithm); off the fast path the registry's function applies
_POST_OPS = {
    None: ("none", ""),
    "gelu": ("gelu", "none"),
    "gelu_tanh": ("gelu", "tanh"),
    "relu": ("relu", ""),
    "silu": ("swish", ""),
    "tanh": ("tanh", ""),
}
FUSED_ACTIVATIONS = frozenset(k for k in _POST_OPS if k is not None)


class Packed(NamedTuple):
    """A weight reordered for oneDNN (:func:`pack`) together with the dense original, which every
    path that is not oneDNN's (gradients, transforms, another device) uses instead."""

    packed: Tensor  # oneDNN-layout (mkldnn) tensor
    weight: Tensor  # the dense (out, in) weight it was made from


def _has_ops() -> bool:
    try:
        return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
    except (AttributeError, RuntimeError):  # a build without the mkldnn op namespace
        return False


_HAS_OPS = _has_ops()


def available() -> bool:
    """oneDNN's linear is in this build and ``torch.backends.mkldnn`` is enabled."""
    return _HAS_OPS and torch.backends.mkldnn.enabled


def _transforms_active() -> bool:
    check = getattr(torch._C, "_are_functorch_transforms_active", None)
    return True if check is None else check()


# tensors without a __torch_function__ of their own (nn.Parameter disables it: the shells' weights)
_PLAIN = (torch.Tensor, torch.nn.Parameter)

# oneDNN's linear costs ~10 us more per call than MKL's GEMM, and gains 5-10 % on the GEMM itself: dense
# weights take it from this many multiply-adds up (one core: ~0.1 ms of GEMM); packed weights always.
MIN_MACS = 1 << 23
# pack() keeps weights under this many elements (512 KiB of float32) dense: they sit in cache, and a
# GEMV over them is over before oneDNN's per-call cost is paid back.
MIN_PACK = 1 << 17


def fast_path(x: Tensor, w: Tensor | Packed, b: Tensor | None = None) -> bool:
    """Whether :func:`linear` runs ``x``, ``w``, ``b`` on oneDNN (else ``F.linear``)."""
    packed = isinstance(w, Packed)
    dense = w.weight if packed else w
    if not (_HAS_OPS and type(x) in _PLAIN and x.device.type == "cpu" and x.dtype == torch.float32
            and x.dim() >= 2 and dense.dim() == 2 and x.shape[-1] == dense.shape[1]):
        return False
    if not packed and x.numel() * dense.shape[0] < MIN_MACS:
        return False
    if type(dense) not in _PLAIN or dense.device.type != "cpu" or dense.dtype != torch.float32:
        return False
    if b is not None and (type(b) not in _PLAIN or b.dtype != torch.float32 or b.dim() != 1
                          or not b.is_contiguous()):  # oneDNN reads a strided bias as if it were dense
        return False
    if torch.is_grad_enabled() and (x.requires_grad or dense.requires_grad or (b is not None and b.requires_grad)):
        return False
    return (torch.backends.mkldnn.enabled and (packed or dense.is_contiguous()) and not torch.compiler.is_compiling()
            and not _transforms_active() and not torch.is_autocast_enabled("cpu")  # autocast casts F.linear only
            and not torch.jit.is_tracing())  # a traced graph (the legacy ONNX exporter) records portable ops


# The blocked copies of the outermost frozen_weights scope entered, by _key (the dense weight's id, or its base's
# and its place there; pack's with its row count): (a weak reference to the weight or base, its version and data
# pointer when reordered, the oneDNN tensor or None); None outside every scope.
_FROZEN: ContextVar[dict[object, tuple] | None] = ContextVar("polymodal_frozen_weights", default=None)


class frozen_weights:
    """A scope within which :func:`linear` reorders each weight it runs on oneDNN once, at its second call,
    and reuses that copy for every later call: CPU inference with the same weights over many calls
    (evaluation, classification, a benchmark) skips oneDNN's per-call reorder, 10-25 % of a GEMM with
    few rows. The copies belong to this object: entering it again reuses them, and they go with it (they
    hold as much memory as the weights they stand for). Inside another scope, the outer one's copies
    serve. Nothing changes where :func:`linear` takes ``F.linear`` (gradients, transforms, compile,
    other devices).

    A weight changed in place through the tensor itself (``copy_``, an optimizer step,
    ``load_state_dict``) bumps its version counter and is reordered again. A change the counter does
    not see, through ``.data`` or memory shared with NumPy, is not: don't make one while the copies live.

    >>> import torch
    >>> x, w = torch.randn(64, 512), torch.randn(512, 512)
    >>> with torch.no_grad(), frozen_weights():
    ...     all(torch.allclose(linear(x, w), x @ w.T, atol=1e-4) for _ in range(3))
    True
    """

    def __init__(self) -> None:
        self._cache: dict[object, tuple] = {}
        self._local = threading.local()  # each thread's stack of entries into this object

    def __enter__(self) -> "frozen_weights":
        tokens = self._local.__dict__.setdefault("tokens", [])
        # an outer scope's copies serve (the token None: nothing to reset)
        tokens.append(_FROZEN.set(self._cache) if _FROZEN.get() is None else None)
        return self

    def __exit__(self, *exc) -> None:
        token = self._local.tokens.pop()
        if token is not None:
            _FROZEN.reset(token)

    def clear(self) -> None:
        """Drop the copies made so far."""
        self._cache.clear()


def _key(w: Tensor, *tag) -> tuple[Tensor, object]:
    """The tensor a copy of ``w`` lives and dies with, and the copy's key in a scope's cache: ``w`` itself, or
    for a view (a weight sliced anew at every call, e.g. the output vocabulary's rows of a logit matrix) its
    base, with the view's place in it."""
    base = w._base
    if base is None:
        return w, ((id(w), *tag) if tag else id(w))
    return base, (id(base), w.storage_offset(), tuple(w.shape), tuple(w.stride()), *tag)


def _entry(cache: dict, key: object, owner: Tensor) -> tuple | None:
    """``cache[key]`` if it was made from ``owner`` as it is now (same tensor, version counter, data pointer)."""
    entry = cache.get(key)
    if entry is not None and entry[0]() is owner and entry[1] == owner._version and entry[2] == owner.data_ptr():
        return entry
    return None


def _note(cache: dict, key: object, owner: Tensor, packed: Tensor | None) -> None:
    # the entry holds no strong reference to the weight: it goes when the weight does
    cache[key] = (weakref.ref(owner, lambda _: cache.pop(key, None)), owner._version, owner.data_ptr(), packed)


def _frozen(cache: dict, w: Tensor, rows: int) -> Tensor | Packed:
    """``w``'s blocked copy from ``cache``. The first call with ``w`` (or with ``w`` changed) only notes it and
    runs dense; the second makes the copy. A weight made anew at every call (a product) is so never reordered
    separately, which would cost more than oneDNN's own reorder inside a dense call. An inference tensor
    (made under ``torch.inference_mode``) has no version counter to tell a change by: it stays dense."""
    owner, key = _key(w)
    if owner.is_inference():
        return w
    entry = _entry(cache, key, owner)
    if entry is None:
        _note(cache, key, owner, None)
        return w
    if entry[3] is None:
        with torch.no_grad():  # any row count from 4 up gives a layout that serves every batch size alike
            packed = torch.ops.mkldnn._reorder_linear_weight(w, max(rows, 4))
        _note(cache, key, owner, packed)
        return Packed(packed, w)
    return Packed(entry[3], w)


def linear(x: Tensor, w: Tensor | Packed, b: Tensor | None = None, activation: str | None = None) -> Tensor:
    """``activation(x @ w.T + b)`` over the last axis: ``x (*, in)``, ``w (out, in)`` or :class:`Packed`,
    ``b (out,)`` or None; ``activation`` a name of :data:`~.activation.ACTIVATIONS` or None. Those in
    :data:`FUSED_ACTIVATIONS` are fused into oneDNN's GEMM where it runs; the others follow the GEMM."""
    fn = None if activation is None else get_activation(activation)  # the registry's (its error for unknown names)
    packed = type(w) is Packed
    # the common small case first, in as few operations as possible (this runs for every Linear); no size
    # test while torch.compile traces (it would become a guard on the shapes)
    if not torch.compiler.is_compiling() and (packed or x.numel() * w.shape[0] >= MIN_MACS) and fast_path(x, w, b):
        attr, algorithm = _POST_OPS.get(activation, ("none", ""))  # one oneDNN cannot fuse follows the GEMM
        cache = None if packed else _FROZEN.get()
        if cache is not None:
            w = _frozen(cache, w, x.numel() // x.shape[-1])
            packed = type(w) is Packed
        y = torch.ops.mkldnn._linear_pointwise(x, w.packed if packed else w, b, attr, [], algorithm)
        return y if activation in _POST_OPS else fn(y)
    y = F.linear(x, w.weight if packed else w, b)
    return y if fn is None else fn(y)


def pack(w: Tensor, rows: int) -> Tensor | Packed:
    """``w (out, in)`` reordered once for oneDNN GEMMs of about ``rows`` rows, as a :class:`Packed`; ``w`` itself
    where the fast path would not take it or it is under :data:`MIN_PACK` elements (then :func:`linear` is
    ``F.linear`` either way). Inference only: the packed copy does not follow later changes to ``w``. Inside
    :class:`frozen_weights` the scope keeps the copy, and a later ``pack`` of the same, unchanged ``w`` (version
    counter, data pointer) with the same ``rows`` returns it again."""
    if not (available() and type(w) in _PLAIN and w.device.type == "cpu" and w.dtype == torch.float32
            and w.dim() == 2 and w.numel() >= MIN_PACK and not _transforms_active()
            and not torch.compiler.is_compiling()):
        return w
    rows = max(int(rows), 1)
    cache = _FROZEN.get()
    owner, key = _key(w, "pack", rows)
    if cache is not None and owner.is_inference():  # no version counter to tell a change by: not kept
        cache = None
    entry = None if cache is None else _entry(cache, key, owner)
    if entry is not None:
        return Packed(entry[3], w)
    with torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows)
    if cache is not None:
        _note(cache, key, owner, packed)
    return Packed(packed, w)
