"""The family registry: how the CLI, the training loop and the shells find a model family, with no central list.

A family registers itself in its package's ``__init__.py``::

    from ...registry import register_family

    register_family(
        "clip",
        builders=BUILDERS,                                  # builder name -> function returning the spec
        presets={"tiny": "clip_tiny_rn", "vit-b32": "clip_vit_b32"},  # CLI preset -> builder name
        task="polymodal.models.clip.task:CLIPTask",         # "module:attr", imported on first use
        description="contrastive image-text pretraining (Radford et al. 2021)",
    )

:func:`families` imports every package under ``polymodal.models`` once (so each has registered)
and the modules named by the ``polymodal.families`` entry-point group (families that live outside
polymodal). Adding a family touches no file but its own.

>>> fam = family("clip")
>>> "tiny" in fam.presets and fam.default_preset in fam.presets
True
>>> family("nope")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: unknown model family 'nope'; expected one of [...]
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Family", "register_family", "families", "family", "find_builder"]


@dataclass(frozen=True)
class Family:
    """What a model family offers the rest of polymodal."""

    name: str  # the CLI's word: ``polymodal train <name>``
    builders: Mapping[str, Callable[..., Any]]  # builder name -> function returning the model spec
    presets: Mapping[str, str] = field(default_factory=dict)  # CLI preset -> builder name
    task: str | None = None  # "module:attr" of the family's Task (class or factory); None: not trainable
    default_preset: str | None = None  # the preset ``--preset`` defaults to (None: the first)
    description: str = ""  # one line for ``--help``
    extra: Mapping[str, Any] = field(default_factory=dict)  # anything else a family exposes (converters, ...)
    builders_from: str | None = None  # another family whose builders the presets name (a second task, same models)

    def __post_init__(self) -> None:
        if self.builders_from is not None and self.builders:
            raise ValueError(f"family {self.name!r}: give builders or builders_from, not both")
        unknown = [] if self.builders_from else sorted(b for b in self.presets.values() if b not in self.builders)
        if unknown:
            raise ValueError(f"family {self.name!r}: presets name unknown builders {unknown}; "
                             f"expected some of {sorted(self.builders)}")
        if self.default_preset is None and self.presets:
            object.__setattr__(self, "default_preset", next(iter(self.presets)))
        if self.default_preset is not None and self.default_preset not in self.presets:
            raise ValueError(f"family {self.name!r}: default_preset {self.default_preset!r} is not one of "
                             f"{sorted(self.presets)}")

    def all_builders(self) -> Mapping[str, Callable[..., Any]]:
        """The builders the presets name: this family's, or ``builders_from``'s."""
        return family(self.builders_from).builders if self.builders_from else self.builders

    def builder_name(self, preset: str) -> str:
        """The builder behind a CLI preset (a builder name is accepted as is)."""
        if preset in self.presets:
            return self.presets[preset]
        if preset in self.all_builders():
            return preset
        raise ValueError(f"unknown preset {preset!r} for {self.name}; expected one of {sorted(self.presets)} "
                         f"(or a builder: {sorted(self.all_builders())})")

    def build(self, preset: str, **kwargs) -> Any:
        """The model spec of a preset or builder name."""
        return self.all_builders()[self.builder_name(preset)](**kwargs)

    def load_task(self) -> Any:
        """The family's Task class or factory (imported now)."""
        if self.task is None:
            raise ValueError(f"family {self.name!r} has no training task")
        module, _, attr = self.task.partition(":")
        return getattr(importlib.import_module(module), attr)


_FAMILIES: dict[str, Family] = {}
_DISCOVERED = False


def register_family(name: str, **kwargs) -> Family:
    """Register (or re-register, on reload) a family; returns it. Keyword arguments are :class:`Family`'s."""
    fam = Family(name, **kwargs)
    _FAMILIES[name] = fam
    return fam


def _discover() -> None:
    global _DISCOVERED
    if _DISCOVERED:
        return
    _DISCOVERED = True
    from . import models

    for info in pkgutil.iter_modules(models.__path__, models.__name__ + "."):
        if info.ispkg:
            importlib.import_module(info.name)
    from importlib.metadata import entry_points

    for ep in entry_points(group="polymodal.families"):
        ep.load()


def families() -> dict[str, Family]:
    """Every registered family by name (discovering them on first call)."""
    _discover()
    return dict(sorted(_FAMILIES.items()))


def family(name: str) -> Family:
    """The family called ``name``; the error names the valid ones."""
    fams = families()
    if name not in fams:
        raise ValueError(f"unknown model family {name!r}; expected one of {sorted(fams)}")
    return fams[name]


def find_builder(name: str) -> tuple[Family, Callable[..., Any]]:
    """``(family, builder)`` for a builder name of any family (``"clip_vit_b32"``)."""
    for fam in families().values():
        if name in fam.builders:
            return fam, fam.builders[name]
    known = sorted(b for f in families().values() for b in f.builders)
    raise ValueError(f"unknown builder {name!r}; expected one of {known}")
