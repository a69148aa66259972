"""The tracer of the norm-only DP step: a ``TorchFunctionMode`` that records, during one
forward pass over the whole batch, every use of a trainable parameter it knows how to handle
per example, without touching model code.

* ``F.linear`` / ``conv{1,2,3}d`` (groups 1; 3-d only when patchifying) / ``F.embedding`` whose
  weight is a trainable leaf or a row slice of one (``in_proj_weight[:n]``) run through the
  recording functions of :mod:`.ghost_ops` (norms by the ghost identity, sums by book-keeping).
  A weight *derived* from parameters (``w.t()``, ``w.float()``) is recorded too; its
  per-example gradient is materialised and pulled back to the parameters by a batched vjp.
* ``F.layer_norm`` stores per-example affine gradients in backward; ``F.group_norm`` and
  ``F.batch_norm`` (eval: running statistics; batch statistics raise, they couple examples)
  are split into the plain normalisation and a per-example affine.
* A *static* tensor, computed from parameters only (a position embedding, a CLS token
  expanded to the batch, ``logit_scale.exp()``), that meets per-example activations in an
  element-wise op (``+ - * / where``) or a concatenation along a non-batch axis is replaced
  by a *tap*: a leaf with a leading example axis whose gradient is the per-example gradient
  of the static tensor.

Anything else that uses a parameter keeps its autograd edge; the DP step finds those
parameters in the graph and computes them exactly with vmap (the fallback). The one
assumption, shared with every per-sample method, is that axis 0 indexes examples and examples
do not interact.

>>> import torch
>>> from polymodal.core import random as pr
>>> from polymodal.core.layers import LayerNorm, Linear
>>> lin, ln = Linear(3, 2), LayerNorm(2)
>>> p = {"lin": lin.init(key=pr.key(0)), "ln": ln.init(key=None)}
>>> leaves = {"lin.weight": p["lin"]["weight"].requires_grad_(), "ln.weight": p["ln"]["weight"].requires_grad_()}
>>> with Tracer(leaves, batch_size=4) as t:
...     y = ln(p["ln"], lin(p["lin"], torch.randn(4, 5, 3)))
>>> [(target, call.kind) for target, call, _ in t.calls + t.norms]
[(('lin.weight', None), 'linear'), (('ln.weight', None), 'layer_norm')]
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as tpt
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .ghost_ops import Call, ConvFn, EmbeddingFn, LayerNormFn, LinearFn

__all__ = ["Tracer", "Tap", "reachable"]

_ELEMENTWISE = {torch.add, torch.sub, torch.mul, torch.div, torch.where, Tensor.add, Tensor.sub, Tensor.mul,
                Tensor.div, Tensor.__rsub__, Tensor.__rdiv__, Tensor.__rtruediv__}
_CONCAT = {torch.cat: False, torch.concat: False, torch.concatenate: False, torch.stack: True}
_CONV_DIMS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}


class Tap:
    """A per-example stand-in ``q`` for the static tensor ``static`` (``mode``: ``"bcast"`` when
    ``static`` broadcasts over the examples, ``"rows"`` when its axis 0 already indexes them)."""

    __slots__ = ("q", "static", "target", "mode")

    def __init__(self, q: Tensor, static: Tensor, target: Any, mode: str) -> None:
        self.q, self.static, self.target, self.mode = q, static, target, mode

    def per_example(self, g: Tensor) -> Tensor:
        """The static tensor's per-example gradients ``(B, *static.shape)`` from ``q``'s gradient."""
        n = g.shape[0]
        if self.mode == "bcast":
            return g.reshape((n,) + tuple(self.static.shape))
        out = g.new_zeros((n,) + tuple(self.static.shape))
        idx = torch.arange(n, device=g.device)
        out[idx, idx] = g
        return out


def _bind(args: tuple, kwargs: dict, names: tuple[str, ...], defaults: dict) -> dict:
    out = dict(defaults)
    out.update(zip(names, args))
    out.update(kwargs)
    return out


def _tensors(args: Any, kwargs: Mapping) -> list[Tensor]:
    out = []
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(t for t in a if isinstance(t, Tensor))
    return out


def _ntuple(v: Any, n: int) -> tuple[int, ...]:
    return (int(v),) * n if isinstance(v, int) else tuple(int(i) for i in v)


class Tracer(TorchFunctionMode):
    """Records per-example gradient sources for the leaves ``leaves`` ``{name: tensor}`` over a
    batch of ``batch_size`` examples (see the module docstring)."""

    def __init__(self, leaves: Mapping[str, Tensor], batch_size: int) -> None:
        super().__init__()
        self.n = batch_size
        self.leaves = dict(leaves)
        self.names = {id(t): k for k, t in leaves.items()}
        self.static: dict[int, Tensor] = {id(t): t for t in leaves.values()}  # strong refs keep ids unique
        self.data: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # batch-derived, no grad
        self.views: dict[int, tuple[str, tuple[int, int]]] = {}
        self.calls: list[tuple[Any, Call, Any]] = []  # (weight target, call, bias target)
        self.norms: list[tuple[Any, Call, Any]] = []  # layer norms: (weight target, call, bias target)
        self.taps: list[Tap] = []
        device = next(iter(leaves.values())).device if leaves else None
        self.anchor = torch.zeros(0, device=device, requires_grad=True)
        self.depth = 0  # how many times this mode is entered (it must not stack on itself)

    def __enter__(self):
        self.depth += 1
        return super().__enter__()

    def __exit__(self, *exc):
        self.depth -= 1
        return super().__exit__(*exc)

    def seam_policy(self, call, index, params, x, key, extra):
        """A block-seam policy: run the block under this tracer if it is not active (as when
        activation checkpointing recomputes the block during backward)."""
        if self.depth:
            return call(params, x, key, extra)
        with self:
            return call(params, x, key, extra)

    # -- classification --------------------------------------------------------------------

    def add_data(self, batch: Any) -> None:
        """Mark the batch's tensors as per-example data (not constants)."""
        for t in tpt.tree_leaves(batch):
            if isinstance(t, Tensor):
                self.data[id(t)] = t

    def _live(self, t: Tensor) -> bool:
        """Depends on the batch: a non-static tensor that requires grad, or batch data."""
        return id(t) not in self.static and (t.requires_grad or id(t) in self.data)

    def target(self, t: Any) -> Any:
        """``(name, rows)`` for a leaf or a row slice of one, the tensor itself when derived from
        parameters, ``None`` for a constant (or None), ``False`` when it depends on the batch."""
        if t is None or not isinstance(t, Tensor):
            return None
        i = id(t)
        if i in self.names:
            return (self.names[i], None)
        if i in self.views:
            return self.views[i]
        if i in self.static:
            return t
        return False if t.requires_grad else None

    def _batched(self, x: Any, min_dim: int) -> bool:
        return (isinstance(x, Tensor) and id(x) not in self.static and x.dim() >= min_dim
                and x.shape[0] == self.n)

    def _tap(self, s: Tensor, ndim: int) -> tuple[Tensor, str] | None:
        shape = (1,) * (ndim - s.dim()) + tuple(s.shape)
        if shape[0] == 1:
            return s.detach().reshape(shape).expand((self.n,) + shape[1:]), "bcast"
        if shape[0] == self.n and s.dim() == ndim:
            return s.detach(), "rows"
        return None

    def _make_taps(self, plans: list[tuple[Tensor, Tensor, str]]) -> list[Tensor]:
        out = []
        for s, q, mode in plans:
            q = q.requires_grad_()
            self.taps.append(Tap(q, s, self.target(s), mode))
            out.append(q)
        return out

    # -- handlers (return NotImplemented to run the op as is) --------------------------------

    def _linear(self, func, args, kwargs):
        a = _bind(args, kwargs, ("input", "weight", "bias"), {"bias": None})
        x, w, b = a["input"], a["weight"], a["bias"]
        tw, tb = self.target(w), self.target(b)
        if not self._batched(x, 2) or tw is False or tb is False or (tw is None and tb is None):
            return NotImplemented
        call = Call("linear", x)
        self.calls.append((tw, call, tb))
        return LinearFn.apply(self.anchor, x, w.detach(), None if b is None else b.detach(), call, tb is not None)

    def _conv(self, func, args, kwargs):
        dims = _CONV_DIMS[func]
        a = _bind(args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                  {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})
        x, w, b = a["input"], a["weight"], a["bias"]
        tw, tb = self.target(w), self.target(b)
        if (not self._batched(x, dims + 2) or x.dim() != dims + 2 or a["groups"] != 1 or tw is False or tb is False
                or (tw is None and tb is None)):
            return NotImplemented
        kernel, stride = tuple(w.shape[2:]), _ntuple(a["stride"], dims)
        dilation, padding = _ntuple(a["dilation"], dims), a["padding"]
        if isinstance(padding, str):
            if padding == "valid":
                padding = (0,) * dims
            elif all(d * (k - 1) % 2 == 0 for d, k in zip(dilation, kernel)):  # "same", symmetric
                padding = tuple(d * (k - 1) // 2 for d, k in zip(dilation, kernel))
            else:
                return NotImplemented
        padding = _ntuple(padding, dims)
        patchify = stride == kernel and not any(padding) and all(d == 1 for d in dilation)
        if dims == 3 and not patchify:
            return NotImplemented
        call = Call("conv", x, (dims, kernel, stride, padding, dilation))
        self.calls.append((tw, call, tb))
        return ConvFn.apply(self.anchor, x, w.detach(), None if b is None else b.detach(), call, tb is not None)

    def _embedding(self, func, args, kwargs):
        a = _bind(args, kwargs, ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq",
                                 "sparse"), {"padding_idx": None, "max_norm": None, "scale_grad_by_freq": False,
                                             "sparse": False})
        ids, w = a["input"], a["weight"]
        tw = self.target(w)
        if (not self._batched(ids, 1) or ids.is_floating_point() or not isinstance(tw, tuple)
                or a["max_norm"] is not None or a["scale_grad_by_freq"] or a["sparse"]):
            return NotImplemented
        pad = a["padding_idx"]
        pad = None if pad is None else (pad + w.shape[0] if pad < 0 else pad)
        call = Call("embedding", ids, (w.shape[0], pad))
        self.calls.append((tw, call, None))
        return EmbeddingFn.apply(self.anchor, ids, w.detach(), call)

    def _layer_norm(self, func, args, kwargs):
        a = _bind(args, kwargs, ("input", "normalized_shape", "weight", "bias", "eps"),
                  {"weight": None, "bias": None, "eps": 1e-5})
        x, w, b = a["input"], a["weight"], a["bias"]
        shape = _ntuple(a["normalized_shape"], 1)
        tw, tb = self.target(w), self.target(b)
        if (not self._batched(x, len(shape) + 1) or tw is False or tb is False or (tw is None and tb is None)):
            return NotImplemented
        call = Call("layer_norm", None)  # keeps only the per-example affine gradients
        self.norms.append((tw, call, tb))
        return LayerNormFn.apply(self.anchor, x, None if w is None else w.detach(), None if b is None else b.detach(),
                                 call, shape, a["eps"])

    def _affine(self, y: Tensor, w: Any, b: Any) -> Tensor:
        """``y * w + b`` with ``(C,)`` parameters on axis 1, through taps."""
        shape = (1, y.shape[1]) + (1,) * (y.dim() - 2)
        for t, op in ((w, torch.mul), (b, torch.add)):
            if t is None:
                continue
            if self.target(t) is None:
                y = op(y, t.reshape(shape))
            else:
                q = self._make_taps([(t, t.detach().reshape(shape).expand((self.n,) + shape[1:]), "bcast")])[0]
                y = op(y, q)
        return y

    def _group_norm(self, func, args, kwargs):
        a = _bind(args, kwargs, ("input", "num_groups", "weight", "bias", "eps"), {"weight": None, "bias": None,
                                                                                  "eps": 1e-5})
        x, w, b = a["input"], a["weight"], a["bias"]
        if not self._batched(x, 2) or self.target(w) is False or self.target(b) is False:
            return NotImplemented
        return self._affine(F.group_norm(x, a["num_groups"], None, None, a["eps"]), w, b)

    def _batch_norm(self, func, args, kwargs):
        a = _bind(args, kwargs, ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum",
                                 "eps"), {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5})
        x, w, b = a["input"], a["weight"], a["bias"]
        if not self._batched(x, 2) or self.target(w) is False or self.target(b) is False:
            return NotImplemented
        if a["training"]:
            raise ValueError("batch norm with batch statistics couples the examples of a batch, so per-example "
                             "gradients (and DP) are undefined; run it in eval mode (running statistics), freeze it, "
                             "or use GroupNorm/LayerNorm")
        y = F.batch_norm(x, a["running_mean"], a["running_var"], None, None, False, a["momentum"], a["eps"])
        return self._affine(y, w, b)

    def _elementwise(self, func, args, kwargs):
        if kwargs.get("out") is not None:
            return NotImplemented
        tensors = [(i, t) for i, t in enumerate(args) if isinstance(t, Tensor)]
        statics = [(i, t) for i, t in tensors if id(t) in self.static]
        if not statics or not any(self._live(t) for _, t in tensors):
            return NotImplemented
        shape = torch.broadcast_shapes(*[t.shape for _, t in tensors])
        if len(shape) == 0 or shape[0] != self.n:
            return NotImplemented
        plans = []
        for i, s in statics:
            plan = self._tap(s, len(shape))
            if plan is None:
                return NotImplemented
            plans.append((i, s) + plan)
        new = list(args)
        for (i, *_), q in zip(plans, self._make_taps([p[1:] for p in plans])):
            new[i] = q
        return func(*new, **kwargs)

    def _concat(self, func, args, kwargs):
        a = _bind(args, kwargs, ("tensors", "dim"), {"dim": 0})
        seq, stack = list(a["tensors"]), _CONCAT[func]
        statics = [(i, t) for i, t in enumerate(seq) if id(t) in self.static]
        live = [t for t in seq if self._live(t)]
        if not statics or not live or a.get("out") is not None:
            return NotImplemented
        ndim = live[0].dim()
        dim = a["dim"] % (ndim + int(stack))
        if dim == 0 or live[0].shape[0] != self.n or any(t.dim() != ndim or t.shape[0] != self.n for _, t in statics):
            return NotImplemented
        qs = self._make_taps([(t, t.detach(), "rows") for _, t in statics])
        for (i, _), q in zip(statics, qs):
            seq[i] = q
        return func(seq, dim)

    # -- the mode ----------------------------------------------------------------------------

    def _view(self, func, args, out) -> None:
        """Remember row slices of leaves (``w[a:b]``, ``w.narrow(0, ...)``, ``w.split``/``chunk`` on axis 0)."""
        base = self.target(args[0]) if args else None
        if not isinstance(base, tuple):
            return
        name, rows = base
        start0 = 0 if rows is None else rows[0]
        if func is Tensor.__getitem__:
            idx = args[1][0] if isinstance(args[1], tuple) and len(args[1]) == 1 else args[1]
            if isinstance(idx, slice) and idx.step in (None, 1):
                s, e, _ = idx.indices(args[0].shape[0])
                self.views[id(out)] = (name, (start0 + s, start0 + max(s, e)))
        elif func is Tensor.narrow and len(args) >= 4 and args[1] == 0:
            self.views[id(out)] = (name, (start0 + int(args[2]), start0 + int(args[2]) + int(args[3])))
        elif func in (Tensor.split, Tensor.chunk) and isinstance(out, tuple) and (len(args) < 3 or args[2] == 0):
            off = start0
            for o in out:
                self.views[id(o)] = (name, (off, off + o.shape[0]))
                off += o.shape[0]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            out = handler(self, func, args, kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        tensors = _tensors(args, kwargs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        if any(id(t) in self.data for t in tensors):
            for o in outs:
                if isinstance(o, Tensor) and not o.requires_grad:
                    self.data[id(o)] = o
        elif any(id(t) in self.static for t in tensors) and all(id(t) in self.static or not t.requires_grad
                                                                for t in tensors):
            for o in outs:
                if isinstance(o, Tensor) and o.requires_grad:
                    self.static[id(o)] = o
            self._view(func, args, out)
        return out


_HANDLERS = {F.linear: Tracer._linear, F.embedding: Tracer._embedding, F.layer_norm: Tracer._layer_norm,
             F.group_norm: Tracer._group_norm, F.batch_norm: Tracer._batch_norm}
_HANDLERS.update({f: Tracer._conv for f in _CONV_DIMS})
_HANDLERS.update({f: Tracer._elementwise for f in _ELEMENTWISE})
_HANDLERS.update({f: Tracer._concat for f in _CONCAT})


def reachable(t: Tensor, names: Mapping[int, str]) -> set[str]:
    """Names of the leaves (``names``: ``id -> name``) that ``t``'s autograd graph reaches."""
    found: set[str] = set()
    if t.grad_fn is None:
        return found
    seen, stack = set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)
        if var is not None and id(var) in names:
            found.add(names[id(var)])
        stack.extend(f for f, _ in fn.next_functions)
    return found
