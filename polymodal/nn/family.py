"""Shells for model families, made by one mechanism from the family registry.

:func:`spec_shell` turns a spec class into a :class:`~polymodal.nn.Shell` subclass of the same
name whose constructor takes a registered builder name (``"clip_vit_b32"``), a spec, or the
spec's fields, and which exposes the spec's public methods on the live parameters: a spec
method ``encode_image(params, images, ..., *, state=None, key=None)`` becomes the shell's
``encode_image(images, ...)``; ``state`` (the shell's buffers) and ``key`` (drawn in training
mode) are supplied when the method takes them and the caller did not. Other public spec
methods are forwarded as they are.

:func:`build` (alias :data:`Model`) builds the shell of any registered builder, and
``polymodal.nn.<SpecClass>`` finds the shell of any spec class a registered builder makes (or
one of its towers), so a new family needs no edit in ``polymodal.nn``.

>>> from polymodal.core import random as pr
>>> model = build("clip_tiny", key=pr.key(0))
>>> type(model).__name__, type(model) is spec_shell(type(model.spec))
('CLIP', True)
>>> import torch
>>> model.encode_text(torch.randint(0, 49407, (3, 32))).shape
torch.Size([3, 128])
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from typing import Any

import torch
from torch import Tensor

from ..core.pytree import Params, flatten
from ..core.spec import Spec
from .shell import Shell

__all__ = ["FamilyShell", "spec_shell", "build", "Model", "resolve", "find_shell"]

_RESERVED = {"init", "init_state"}


def _registry():
    from .. import registry

    return registry


def resolve(name: str, **builder_kwargs: Any) -> tuple[Any, Spec]:
    """``(family, spec)`` for a registered builder name; a family may also register a ``build``
    function in its ``extra`` that accepts more names (CLIP's ``"ViT-B-32"``)."""
    registry = _registry()
    try:
        fam, builder = registry.find_builder(name)
        return fam, builder(**builder_kwargs)
    except ValueError as e:
        first = e
    for fam in registry.families().values():
        build_fn = fam.extra.get("build")
        if build_fn is not None:
            try:
                return fam, build_fn(name, **builder_kwargs)
            except ValueError:
                continue
    raise first


def _set_state(shell: Shell, state: Params | None) -> None:
    if state is None:
        return
    if not shell._stateful:
        raise ValueError(f"{type(shell).__name__}: got a state, but {type(shell.spec).__name__} has none")
    buffers = dict(shell.named_buffers())
    with torch.no_grad():
        for k, v in flatten(state).items():
            buffers[k].copy_(v)


class FamilyShell(Shell):
    """Base of the family shells; ``FamilyShell("clip_vit_b32")`` (alias ``polymodal.nn.Model``)
    gives the shell of whatever spec that builder makes."""

    _spec_cls: type | None = None
    _methods: dict[str, Any] = {}  # the spec's public methods, as shell methods (see spec_shell)

    def __getattr__(self, name: str) -> Any:
        # Parameters, buffers and sub-trees first (a param sub-tree may share a spec method's name).
        try:
            return super().__getattr__(name)
        except AttributeError:
            fn = type(self)._methods.get(name)
            if fn is None or name in self.__dict__.get("_names", ()):  # a param sub-tree being registered
                raise
            return fn.__get__(self)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(type(self)._methods))

    def __new__(cls, *args: Any, **kwargs: Any):
        if cls._spec_cls is None:  # Model(name): dispatch to the spec's own shell class
            return build(*args, **kwargs)
        return super().__new__(cls)

    def __init__(self, *args: Any, key: Tensor | None = None, device=None, dtype=None, **kwargs: Any) -> None:
        if self.__dict__.get("_built"):  # made by __new__ through build()
            return
        Shell.__init__(self, self._make_spec(args, kwargs), key=key, device=device, dtype=dtype)
        self._built = True

    @classmethod
    def _make_spec(cls, args: tuple, kwargs: dict) -> Spec:
        spec_cls = cls._spec_cls
        if len(args) == 1 and isinstance(args[0], spec_cls) and not kwargs:
            return args[0]
        if len(args) == 1 and isinstance(args[0], str) and not _first_field_is_str(spec_cls):
            _, spec = resolve(args[0], **kwargs)
            if not isinstance(spec, spec_cls):
                raise ValueError(f"{cls.__name__}: {args[0]!r} builds a {type(spec).__name__}, not a {spec_cls.__name__}")
            return spec
        if len(args) == 1 and isinstance(args[0], Spec):
            raise TypeError(f"{cls.__name__}: expected a {spec_cls.__name__} spec, got {type(args[0]).__name__}")
        return spec_cls(*args, **kwargs)

    @classmethod
    def from_params(cls, spec: Spec, params: Params, state: Params | None = None, **kwargs: Any) -> Shell:
        """Wrap an existing tree (checked against the spec's layout) and, for stateful specs, ``state``."""
        obj = Shell.__new__(cls)
        Shell.__init__(obj, spec, params, **kwargs)
        obj._built = True
        _set_state(obj, state)
        return obj

    @classmethod
    def from_name(cls, name: str, *, key: Tensor | None = None, device=None, dtype=None, **builder_kwargs: Any) -> Shell:
        """The builder ``name``'s model, or the part of it (a tower) that is a ``cls`` spec, randomly initialised."""
        _, spec = resolve(name, **builder_kwargs)
        part = _find_part(spec, cls._spec_cls)
        if part is None:
            raise ValueError(f"{cls.__name__}.from_name: {name!r} builds a {type(spec).__name__} with no "
                             f"{cls._spec_cls.__name__} part")
        obj = Shell.__new__(cls)
        Shell.__init__(obj, part, key=key, device=device, dtype=dtype)
        obj._built = True
        return obj

    @classmethod
    def from_pretrained_name(cls, name: str, pretrained: bool = False, *, path: str | os.PathLike | None = None,
                             cache_dir: str | os.PathLike | None = None, key: Tensor | None = None, device=None,
                             dtype=None, **builder_kwargs: Any) -> Shell:
        """The architecture of ``name``; ``pretrained=True`` (or ``path``) loads weights through the
        family's registered ``load_pretrained`` (``extra``), else a random init."""
        if not (pretrained or path is not None):
            return cls(name, key=key, device=device, dtype=dtype, **builder_kwargs)
        fam, _ = resolve(name, **builder_kwargs)
        loader = fam.extra.get("load_pretrained")
        if loader is None:
            raise ValueError(f"{cls.__name__}: family {fam.name!r} registers no load_pretrained")
        spec, params, state = loader(name, path, cache_dir, **builder_kwargs)
        return cls.from_params(spec, params, state, device=device, dtype=dtype)


def _first_field_is_str(spec_cls: type) -> bool:
    fields = dataclasses.fields(spec_cls) if dataclasses.is_dataclass(spec_cls) else ()
    return bool(fields) and fields[0].type in (str, "str")


def _find_part(spec: Any, spec_cls: type) -> Spec | None:
    if isinstance(spec, spec_cls):
        return spec
    if dataclasses.is_dataclass(spec):
        for f in dataclasses.fields(spec):
            value = getattr(spec, f.name)
            if isinstance(value, Spec) and (found := _find_part(value, spec_cls)) is not None:
                return found
    return None


def _method(name: str, fn: Any) -> Any:
    params = list(inspect.signature(fn).parameters.values())[1:]
    takes_params = bool(params) and params[0].name == "params"
    names = {p.name for p in params}

    if not takes_params:
        def forward_plain(self, *args, **kwargs):
            return getattr(self.spec, name)(*args, **kwargs)

        forward_plain.__name__, forward_plain.__doc__ = name, fn.__doc__
        return forward_plain

    def on_live_params(self, *args, **kwargs):
        if "state" in names and "state" not in kwargs and self._stateful:
            kwargs["state"] = self.state
        if "key" in names and "key" not in kwargs:
            kwargs["key"] = self._next_key() if (self.training and self._seed is not None) else None
        return getattr(self.spec, name)(self.params, *args, **kwargs)

    on_live_params.__name__ = name
    on_live_params.__doc__ = (f"``spec.{name}`` on the live parameters (``params`` is supplied; ``state`` and ``key`` "
                              f"too when not given).\n\n{fn.__doc__ or ''}")
    return on_live_params


@functools.lru_cache(maxsize=None)
def spec_shell(spec_cls: type) -> type[FamilyShell]:
    """The shell class of ``spec_cls`` (one per class): its name, the spec's public methods on the
    live parameters (found after the module's own attributes: a param sub-tree keeps its name),
    construction from a builder name, a spec or the spec's fields."""
    methods = {name: _method(name, fn) for name, fn in inspect.getmembers(spec_cls, inspect.isfunction)
               if not (name.startswith("_") or name in _RESERVED or hasattr(FamilyShell, name))}
    cls = type(spec_cls.__name__, (FamilyShell,), {"_spec_cls": spec_cls, "_methods": methods,
                                                   "__module__": "polymodal.nn"})
    cls.__qualname__ = spec_cls.__name__
    cls.__doc__ = (f"``nn.Module`` shell over :class:`{spec_cls.__module__}.{spec_cls.__name__}`: "
                   f"``{spec_cls.__name__}(builder_name | spec | fields..., *, key=None, device=None, dtype=None)``; "
                   f"``forward`` is the spec's ``__call__``.\n\n{spec_cls.__doc__ or ''}")
    return cls


def build(name_or_spec: str | Spec, /, *, key: Tensor | None = None, device=None, dtype=None,
          **builder_kwargs: Any) -> FamilyShell:
    """The shell of a registered builder (``build("clip_vit_b32", key=pr.key(0))``) or of a spec."""
    if isinstance(name_or_spec, str):
        _, spec = resolve(name_or_spec, **builder_kwargs)
    elif isinstance(name_or_spec, Spec) and not builder_kwargs:
        spec = name_or_spec
    else:
        raise TypeError(f"build: expected a builder name or a spec, got {type(name_or_spec).__name__}"
                        + (f" with builder arguments {sorted(builder_kwargs)}" if builder_kwargs else ""))
    cls = spec_shell(type(spec))
    obj = Shell.__new__(cls)
    Shell.__init__(obj, spec, key=key, device=device, dtype=dtype)
    obj._built = True
    return obj


Model = FamilyShell


def _spec_classes(spec: Any, out: dict[str, type]) -> None:
    out.setdefault(type(spec).__name__, type(spec))
    if dataclasses.is_dataclass(spec):
        for f in dataclasses.fields(spec):
            value = getattr(spec, f.name)
            if isinstance(value, Spec):
                _spec_classes(value, out)


def find_shell(name: str) -> type[FamilyShell] | None:
    """The shell of the spec class called ``name`` that a registered builder makes (or holds as a
    part), or a name a family's ``polymodal.nn.<family>`` module defines; ``None`` if none."""
    import importlib

    registry = _registry()
    for fam in registry.families().values():
        try:
            module = importlib.import_module(f"{__package__}.{fam.name}")
        except ModuleNotFoundError as e:  # no shell module for this family (a missing dependency is raised)
            if e.name != f"{__package__}.{fam.name}":
                raise
            module = None
        if module is not None and isinstance(getattr(module, name, None), type):
            return getattr(module, name)
        classes: dict[str, type] = {}
        for builder in fam.builders.values():
            try:
                _spec_classes(builder(), classes)
            except TypeError:  # a builder that needs arguments
                continue
        if name in classes:
            return spec_shell(classes[name])
    return None
