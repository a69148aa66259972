"""The one generic mechanism behind every ``polymodal.nn`` module.

A :class:`Shell` wraps a spec. It registers the spec's parameter tree as
``nn.Parameter`` leaves under the same nested names (dicts and lists become
child modules), so ``state_dict()`` keys equal ``flatten(params)``. Its forward
calls the pure spec with the live tree. State (running statistics) lives in
buffers and is written back after each call; dropout keys are drawn from a
per-module key advanced on every training call.

>>> import torch
>>> from polymodal.core.layers import Linear as LinearSpec
>>> m = Shell(LinearSpec(4, 2), key=None)
>>> sorted(m.state_dict())
['bias', 'weight']
>>> m(torch.ones(3, 4)).shape
torch.Size([3, 2])
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor, nn

from ..core import random as pr
from ..core.convert import meta_init
from ..core.pytree import Params, check_like, flatten, tree_map
from ..core.spec import Spec

__all__ = ["Shell", "shell_class"]


class ShellNode(nn.Module):
    """A dict or list level of a parameter tree. ``forward(fn, *a)`` runs ``fn(self.params, *a)``.

    The ``forward`` indirection lets hook-based wrappers (FSDP2 ``fully_shard``,
    checkpoint wrappers) installed on a sub-tree fire when the core applies it.
    """

    def __init__(self, tree: Any, *, as_buffers: bool = False) -> None:
        super().__init__()
        self._is_list = isinstance(tree, (list, tuple))
        self._names: list[str] = []
        items = enumerate(tree) if self._is_list else tree.items()
        for name, value in items:
            name = str(name)
            self._names.append(name)
            if isinstance(value, (dict, list, tuple)):
                self.add_module(name, ShellNode(value, as_buffers=as_buffers))
            elif as_buffers or not value.is_floating_point():
                self.register_buffer(name, value)
            else:
                self.register_parameter(name, nn.Parameter(value))

    @property
    def params(self) -> Params:
        """The live tree: leaves are this module's current Parameters/buffers."""
        out = []
        for name in self._names:
            child = getattr(self, name)
            out.append((name, child.params if isinstance(child, ShellNode) else child))
        return [v for _, v in out] if self._is_list else dict(out)

    def forward(self, fn, *args, **kwargs):
        return fn(self.params, *args, **kwargs)


class Shell(ShellNode):
    """``nn.Module`` view of a spec: ``Shell(spec, params=None, *, key=None)``.

    Args:
        spec: the spec whose ``__call__`` becomes ``forward``.
        params: an existing tree to wrap (by reference; no copy), else ``spec.init``.
        key: init key; ``None`` draws a seed from torch's global RNG, as torch.nn does.
        device, dtype: where and in what floating dtype the parameters live.
    """

    def __init__(
        self,
        spec: Spec,
        params: Params | None = None,
        *,
        key: Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if params is None:
            if key is None:
                key = pr.key(int(torch.randint(0, 2**62, ()).item()))
            params = spec.init(key=key)
        else:
            check_like(flatten(params), _template(spec), what=f"params for {type(spec).__name__}")
        if device is not None or dtype is not None:
            params = tree_map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None), params)
        super().__init__(params)
        object.__setattr__(self, "spec", spec)
        state = spec.init_state()
        self._stateful = state is not None
        if self._stateful:
            if device is not None:
                state = tree_map(lambda t: t.to(device), state)
            self._add_state(state)
        sig = inspect.signature(type(spec).__call__).parameters
        self._takes_key = "key" in sig
        self._takes_training = "training" in sig
        self.register_buffer("_step", torch.zeros((), dtype=torch.int64), persistent=False)
        self._seed = pr.key(int(torch.randint(0, 2**62, ()).item())) if self._takes_key else None

    def _add_state(self, state: Params) -> None:
        # State leaves sit beside the params (as torch's BatchNorm keeps running_mean
        # next to weight), so state_dict keys match the reference layouts.
        def put(module: nn.Module, tree: Any) -> None:
            items = enumerate(tree) if isinstance(tree, (list, tuple)) else tree.items()
            for name, value in items:
                name = str(name)
                if isinstance(value, (dict, list, tuple)):
                    if not hasattr(module, name):
                        module.add_module(name, ShellNode(value, as_buffers=True))
                    else:
                        put(getattr(module, name), value)
                else:
                    module.register_buffer(name, value)
        # Leaves registered here are not in ``_names``, so ``params`` never includes them.
        self._state_template = tree_map(lambda t: None, state)
        put(self, state)

    @property
    def state(self) -> Params | None:
        """The live state tree (buffers), or ``None`` for stateless specs."""
        if not self._stateful:
            return None
        live = dict(self.named_buffers())
        return _rebuild(self._state_template, "", live)

    @classmethod
    def from_params(cls, spec: Spec, params: Params, **kwargs: Any) -> "Shell":
        """Wrap an existing tree (validated against the spec's layout)."""
        obj = Shell.__new__(cls)
        Shell.__init__(obj, spec, params, **kwargs)
        return obj

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._takes_training and "training" not in kwargs:
            kwargs["training"] = self.training
        if self._takes_key and "key" not in kwargs:
            kwargs["key"] = self._next_key() if self.training else None
        if not self._stateful:
            return self.spec(self.params, *args, **kwargs)
        out, new_state = self.spec(self.params, *args, state=self.state, **kwargs)
        with torch.no_grad():
            live = dict(self.named_buffers())
            for k, v in flatten(new_state).items():
                # An unchanged buffer (eval-mode BatchNorm) may be saved for backward: writing
                # it in place would bump its version and break that backward.
                if v is not live[k]:
                    live[k].copy_(v)
        return out

    def _next_key(self) -> Tensor:
        k = pr.fold_in(self._seed.to(self._step.device), self._step)
        with torch.no_grad():
            self._step.add_(1)
        return k

    def extra_repr(self) -> str:
        return repr(self.spec)


def _template(spec: Spec) -> Params:
    """The spec's param tree for a shape check: the converters' one meta initialisation (no
    random numbers drawn: a full init of a large model takes minutes on CPU)."""
    return meta_init(spec)


def _rebuild(template: Any, prefix: str, live: dict[str, Tensor]) -> Any:
    if isinstance(template, list):
        return [_rebuild(v, f"{prefix}{i}.", live) for i, v in enumerate(template)]
    if isinstance(template, dict):
        return {k: _rebuild(v, f"{prefix}{k}.", live) for k, v in template.items()}
    return live[prefix[:-1]]


def shell_class(spec_cls: type[Spec], doc: str | None = None) -> type[Shell]:
    """A Shell subclass whose constructor takes the spec's fields (plus key/device/dtype).

    >>> from polymodal.core.layers import Linear as LinearSpec
    >>> Linear = shell_class(LinearSpec)
    >>> Linear(8, 4, bias=False).weight.shape
    torch.Size([4, 8])
    """

    def __init__(self, *args: Any, key: Tensor | None = None, device=None, dtype=None, **kwargs: Any) -> None:
        Shell.__init__(self, spec_cls(*args, **kwargs), key=key, device=device, dtype=dtype)

    fields = [p for p in inspect.signature(spec_cls).parameters.values()]
    extra = [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in ("key", "device", "dtype")
    ]
    __init__.__signature__ = inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)] + fields + extra)
    cls = type(spec_cls.__name__, (Shell,), {"__init__": __init__, "__module__": "polymodal.nn"})
    cls.__doc__ = doc or f"``nn.Module`` shell over :class:`{spec_cls.__module__}.{spec_cls.__name__}`.\n\n{spec_cls.__doc__ or ''}"
    return cls
