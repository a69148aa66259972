"""The one checkpoint-conversion engine: a foreign layout is a declarative :class:`Table`.

A table lists :class:`Rule` s from foreign ("theirs") key patterns to polymodal ("ours") ones,
each with an invertible value :class:`Transform` (identity, transpose, leading-axis reshape,
fused-weight split/merge). Reading a state dict (:meth:`Table.to_ours`) and writing one
(:meth:`Table.to_theirs`) run the same table in opposite directions, so a round trip is exact
by construction. The expected keys and shapes come from one meta-device initialisation of the
spec (:func:`meta_init`, shared with the ``polymodal.nn`` shells); every missing, unexpected or
mis-shaped key is named, in the caller's naming, in one ``ValueError``
(:func:`~polymodal.core.pytree.mismatch_error`).

Patterns are dotted keys with placeholders: ``{name}`` is one segment, ``{name*}`` one or more
segments, and ``{2i}`` / ``{2i+1}`` / ``{i+1}`` an integer segment that is an affine function
of the index ``i`` (torchvision interleaves stages and merges as ``features.{2i}`` /
``features.{2i+1}``). Rules are tried in order; the first match wins.

>>> import torch
>>> from polymodal.core.layers import Linear
>>> table = Table((Rule("fc.w", "weight", transpose()), Rule("fc.b", "bias")), name="toy")
>>> spec = Linear(3, 2)
>>> theirs = {"fc.w": torch.ones(3, 2), "fc.b": torch.zeros(2)}
>>> params = table.to_ours(theirs, spec)
>>> params["weight"].shape
torch.Size([2, 3])
>>> sorted(table.to_theirs(params)) == sorted(theirs)
True
>>> table.to_ours({"fc.w": torch.ones(2, 3)}, spec)
Traceback (most recent call last):
...
ValueError: toy does not match Linear:
  missing keys (1): fc.b
  shape mismatches (1): fc.w: expected (3, 2), got (2, 3)
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import random as pr
from .pytree import Params, flatten, mismatch_error, unflatten

__all__ = [
    "Transform", "Rule", "Derived", "Table", "identity", "transpose", "unsqueeze", "fused", "chain", "meta_init",
    "expected_shapes", "mismatch_error",
]


# --- value transforms: pairs of exact inverses over lists of tensors ------------------------------------

@dataclass(frozen=True)
class Transform:
    """A value map between ``n`` foreign tensors and ``m`` of ours; ``to_theirs`` inverts ``to_ours``."""

    def to_ours(self, xs: list[Tensor], n_out: int) -> list[Tensor]:
        return xs

    def to_theirs(self, xs: list[Tensor], n_out: int) -> list[Tensor]:
        return xs


@dataclass(frozen=True)
class _Transpose(Transform):
    dim0: int = 0  # the two axes swapped (their layout <-> ours; its own inverse)
    dim1: int = 1

    def to_ours(self, xs, n_out):
        return [x.transpose(self.dim0, self.dim1).contiguous() for x in xs]

    to_theirs = to_ours


@dataclass(frozen=True)
class _Unsqueeze(Transform):
    n: int = 1  # leading singleton axes ours has and theirs has not (``(D,)`` <-> ``(1, 1, D)``)

    def to_ours(self, xs, n_out):
        return [x.reshape((1,) * self.n + tuple(x.shape)) for x in xs]

    def to_theirs(self, xs, n_out):
        return [x.reshape(tuple(x.shape[self.n:])) for x in xs]


@dataclass(frozen=True)
class _Fused(Transform):
    dim: int = 0  # the axis along which the fused tensor stacks its parts (equal sizes)

    def _move(self, xs: list[Tensor], n_out: int) -> list[Tensor]:
        if len(xs) == 1 and n_out > 1:
            return list(torch.chunk(xs[0], n_out, self.dim))
        if len(xs) > 1 and n_out == 1:
            return [torch.cat(xs, self.dim)]
        raise ValueError(f"fused: expected one tensor and several parts or the reverse, got {len(xs)} -> {n_out}")

    to_ours = to_theirs = _move


@dataclass(frozen=True)
class _Chain(Transform):
    parts: tuple[Transform, ...] = ()  # applied left to right towards ours, right to left towards theirs

    def to_ours(self, xs, n_out):
        for t in self.parts:
            xs = t.to_ours(xs, n_out)
        return xs

    def to_theirs(self, xs, n_out):
        for t in reversed(self.parts):
            xs = t.to_theirs(xs, n_out)
        return xs


def identity() -> Transform:
    """Same tensor both ways."""
    return Transform()


def transpose(dim0: int = 0, dim1: int = 1) -> Transform:
    """Swap two axes (e.g. a ``(in, out)`` projection stored as ``x @ W`` vs torch's ``(out, in)``)."""
    return _Transpose(dim0, dim1)


def unsqueeze(n: int = 1) -> Transform:
    """Ours has ``n`` extra leading singleton axes (``(N, D)`` <-> ``(1, N, D)``)."""
    return _Unsqueeze(n)


def fused(dim: int = 0) -> Transform:
    """One fused tensor <-> equal parts along ``dim`` (fused ``qkv`` <-> ``q``, ``k``, ``v``)."""
    return _Fused(dim)


def chain(*parts: Transform) -> Transform:
    """``parts`` in order towards ours, reversed towards theirs."""
    return _Chain(tuple(parts))


# --- key patterns -------------------------------------------------------------------------------------

_HOLE = re.compile(r"\{(?:(\d*)([a-z_]\w*)(?:\+(\d+))?|([a-z_]\w*)\*)\}")


@functools.lru_cache(maxsize=None)
def _compile(pattern: str) -> tuple[re.Pattern, tuple[tuple[str, int, int, bool], ...]]:
    """A regex for ``pattern`` and its holes ``(name, a, b, multi)``: segment value = a * name + b."""
    out, holes, pos = [], [], 0
    for i, m in enumerate(_HOLE.finditer(pattern)):
        out.append(re.escape(pattern[pos:m.start()]))
        if m[4]:
            holes.append((m[4], 1, 0, True))
            out.append(f"(?P<h{i}>.+)")
        else:
            a, b = int(m[1] or 1), int(m[3] or 0)
            holes.append((m[2], a, b, False))
            out.append(f"(?P<h{i}>\\d+)" if (m[1] or m[3]) else f"(?P<h{i}>[^.]+)")
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out)), tuple(holes)


def _match(pattern: str, key: str) -> dict[str, str] | None:
    rx, holes = _compile(pattern)
    m = rx.fullmatch(key)
    if m is None:
        return None
    env: dict[str, str] = {}
    for i, (name, a, b, _) in enumerate(holes):
        text = m[f"h{i}"]
        if a != 1 or b != 0:
            n = int(text) - b
            if n < 0 or n % a:
                return None
            text = str(n // a)
        if env.setdefault(name, text) != text:
            return None
    return env


def _format(pattern: str, env: Mapping[str, str]) -> str:
    def sub(m: re.Match) -> str:
        if m[4]:
            return env[m[4]]
        a, b = int(m[1] or 1), int(m[3] or 0)
        return env[m[2]] if (a, b) == (1, 0) else str(a * int(env[m[2]]) + b)

    return _HOLE.sub(sub, pattern)


# --- rules and tables -----------------------------------------------------------------------------------

def _tuple(x: str | Sequence[str]) -> tuple[str, ...]:
    return (x,) if isinstance(x, str) else tuple(x)


@dataclass(frozen=True)
class Rule:
    """``theirs`` pattern(s) <-> ``ours`` pattern(s), values through ``fn`` (several keys: a fused split)."""

    theirs: str | tuple[str, ...]  # foreign key pattern, or several (parts of one fused tensor of ours)
    ours: str | tuple[str, ...]  # our key pattern, or several (parts of one fused foreign tensor)
    fn: Transform = field(default_factory=Transform)  # the value map (identity by default)

    def side(self, ours: bool) -> tuple[str, ...]:
        return _tuple(self.ours if ours else self.theirs)


@dataclass(frozen=True)
class Derived:
    """A foreign key computed from the spec (e.g. a relative-position index buffer): checked
    against ``value(spec, device)`` on the way in, written beside each of our keys matching ``like``."""

    theirs: str  # the foreign key pattern
    like: str  # our key pattern whose matches it accompanies (same placeholders)
    value: Callable[[Any, torch.device], Tensor]  # the tensor it must hold for a spec
    what: Callable[[Any], str] = lambda spec: repr(spec)  # what the value depends on, for the error


def _convert(flat: Mapping[str, Tensor], rules: Sequence[Rule], ours: bool) -> tuple[dict[str, Tensor], list[str]]:
    """Rename ``flat`` (ours if ``ours`` else theirs) to the other side; returns it and the unmatched keys."""
    groups: dict[tuple, dict[int, Tensor]] = {}
    unmatched = []
    for key, value in flat.items():
        for r, rule in enumerate(rules):
            hits = [(i, env) for i, p in enumerate(rule.side(ours)) if (env := _match(p, key)) is not None]
            if hits:
                i, env = hits[0]
                groups.setdefault((r, tuple(sorted(env.items()))), {})[i] = value
                break
        else:
            unmatched.append(key)
    out: dict[str, Tensor] = {}
    for (r, env), parts in groups.items():
        rule, env = rules[r], dict(env)
        src, dst = rule.side(ours), rule.side(not ours)
        if len(parts) < len(src):  # a partner of a fused group is absent: nothing to convert
            unmatched.extend(_format(src[i], env) for i in parts)
            continue
        xs = [parts[i] for i in range(len(src))]
        ys = rule.fn.to_theirs(xs, len(dst)) if ours else rule.fn.to_ours(xs, len(dst))
        out.update((_format(p, env), y) for p, y in zip(dst, ys))
    return out, unmatched


@functools.lru_cache(maxsize=32)
def _meta(spec: Any) -> tuple[Params, Params | None]:
    try:
        with torch.device("meta"):
            params = spec.init(key=pr.key(0))
    except Exception:  # an init that needs real values (data-dependent): draw them, keep the shapes
        params = spec.init(key=pr.key(0))
    return params, spec.init_state() if hasattr(spec, "init_state") else None


def meta_init(spec: Any) -> Params:
    """``spec.init`` under ``torch.device("meta")``: the param tree's names and shapes, no values,
    no memory, cached per spec (falls back to a real init if the spec's init needs values).
    The leaves are shared between calls: read their shapes, never write them."""
    return _meta(spec)[0]


def expected_shapes(spec: Any) -> dict[str, tuple[int, ...]]:
    """Flat ``{key: shape}`` of the spec's params, then of its state (``init_state()``)."""
    params, state = _meta(spec)
    return {k: tuple(v.shape) for k, v in (flatten(params) | flatten(state or {})).items()}


def _fill(template: Any, flat: Mapping[str, Tensor], prefix: str = "") -> Any:
    if isinstance(template, list):
        return [_fill(v, flat, f"{prefix}{i}.") for i, v in enumerate(template)]
    if isinstance(template, dict):
        return {k: _fill(v, flat, f"{prefix}{k}.") for k, v in template.items()}
    return flat[prefix[:-1]]


@dataclass(frozen=True)
class Table:
    """A foreign checkpoint layout: rules, keys to ignore, derived keys and defaults.

    Args:
        rules: tried in order, the first match wins (on either side).
        drop: foreign key patterns ignored when reading (never written).
        derived: foreign keys computed from the spec (checked when read, generated when written).
        defaults: ``(our key, fn(spec) -> Tensor)`` pairs the layout may lack: filled when
            reading, left out when writing.
        name: how errors call a state dict of this layout.
    """

    rules: tuple[Rule, ...]
    drop: tuple[str, ...] = ()
    derived: tuple[Derived, ...] = ()
    defaults: tuple[tuple[str, Callable[[Any], Tensor]], ...] = ()
    name: str = "checkpoint"

    def __add__(self, other: Table) -> Table:
        """The rules of ``self`` then of ``other`` (and both sets of drops, derived keys, defaults)."""
        return dataclasses.replace(self, rules=self.rules + other.rules, drop=self.drop + other.drop,
                                   derived=self.derived + other.derived, defaults=self.defaults + other.defaults)

    def _dropped(self, key: str) -> bool:
        return any(_match(p, key) is not None for p in self.drop)

    def rename(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Foreign -> our flat names and values, no checks; unknown and dropped keys are skipped
        (for reading an architecture off the shapes before the spec is known)."""
        kept = {k: v for k, v in state_dict.items() if not self._dropped(k)}
        return _convert(kept, self.rules, ours=False)[0]

    def unknown(self, state_dict: Mapping[str, Tensor], ours: bool = False) -> list[str]:
        """Keys no rule (nor drop / derived pattern) matches, sorted."""
        def known(k: str) -> bool:
            if any(_match(p, k) is not None for r in self.rules for p in r.side(ours)):
                return True
            return not ours and (self._dropped(k) or any(_match(d.theirs, k) is not None for d in self.derived))

        return sorted(k for k in state_dict if not known(k))

    def expected(self, spec: Any) -> dict[str, tuple[int, ...]]:
        """The foreign keys and shapes a state dict of ``spec`` has (derived keys included)."""
        return _expected_theirs(self, spec)

    def to_ours(self, state_dict: Mapping[str, Tensor], spec: Any, *, with_state: bool = False
                ) -> Params | tuple[Params, Params | None]:
        """Foreign ``state_dict`` -> params of ``spec`` (``with_state``: ``(params, state)``).

        Leaves are the state dict's tensors where no transform applies (no copy).

        Raises:
            ValueError: one error naming every missing, unexpected (including unknown) and
                mis-shaped key in the foreign naming, or a derived key with the wrong value.
        """
        sd = {k: v for k, v in state_dict.items() if not self._dropped(k)}
        for d in self.derived:
            for k in [k for k in sd if _match(d.theirs, k) is not None]:
                v, want = sd.pop(k), None
                want = d.value(spec, v.device)
                if tuple(v.shape) != tuple(want.shape) or not torch.equal(v, want.to(v.dtype)):
                    raise ValueError(f"{k}: does not match {d.what(spec)} (shape {tuple(v.shape)})")
        expected = {k: s for k, s in self.expected(spec).items()
                    if not any(_match(d.theirs, k) is not None for d in self.derived)}
        defaults = dict(self.defaults)
        optional = {k for k in sd if k not in expected and
                    set(_convert({k: sd[k]}, self.rules, ours=False)[0]) & set(defaults)}
        got = {k: tuple(v.shape) for k, v in sd.items()}
        missing = sorted(set(expected) - set(got))
        unexpected = sorted(set(got) - set(expected) - optional)
        bad = sorted(f"{k}: expected {expected[k]}, got {got[k]}" for k in set(got) & set(expected)
                     if got[k] != expected[k])
        if missing or unexpected or bad:
            raise mismatch_error(f"{self.name} does not match {type(spec).__name__}:", missing, unexpected, bad)
        flat, _ = _convert(sd, self.rules, ours=False)
        for k, fn in self.defaults:
            if k not in flat:
                flat[k] = fn(spec)
        template, template_state = _meta(spec)
        params = _fill(template, flat)
        state = None if template_state is None else _fill(template_state, flat)
        return (params, state) if with_state else params

    def to_theirs(self, params: Params, state: Params | None = None, spec: Any = None) -> dict[str, Tensor]:
        """Params (and state) -> a state dict of this layout; ``spec`` checks the tree first and
        gives the derived keys (and the initial state when ``state`` is None)."""
        if spec is not None:
            params_t, _ = _meta(spec)
            if state is None and hasattr(spec, "init_state"):
                state = spec.init_state()  # fresh: the caller may write into what it gets
            want = {k: tuple(v.shape) for k, v in flatten(params_t).items()}
            got = {k: tuple(v.shape) for k, v in flatten(params).items()}
            bad = sorted(f"{k}: expected {want[k]}, got {got[k]}" for k in set(got) & set(want) if got[k] != want[k])
            if set(want) != set(got) or bad:
                raise mismatch_error(f"params for {type(spec).__name__} do not match its layout:",
                                     sorted(set(want) - set(got)), sorted(set(got) - set(want)), bad)
        flat = flatten(params) | flatten(state or {})
        skip = {k for k, _ in self.defaults}
        out, unmatched = _convert({k: v for k, v in flat.items() if k not in skip}, self.rules, ours=True)
        if unmatched:
            raise ValueError(f"params: keys with no counterpart in a {self.name} ({len(unmatched)}): "
                             f"{', '.join(sorted(unmatched))}")
        after: dict[str, list[tuple[str, Tensor]]] = {}  # a derived key follows its companion's
        for d in self.derived:
            if spec is None:
                raise ValueError(f"{self.name}: writing {d.theirs} needs spec=...")
            for k, v in flat.items():
                if (env := _match(d.like, k)) is not None:
                    companion = next(iter(_convert({k: v}, self.rules, ours=True)[0]), None)
                    after.setdefault(companion, []).append((_format(d.theirs, env), d.value(spec, v.device)))
        if not after:
            return out
        ordered = {}
        for k, v in out.items():
            ordered[k] = v
            ordered.update(after.pop(k, ()))
        for extra in after.values():
            ordered.update(extra)
        return ordered


@functools.lru_cache(maxsize=32)
def _expected_theirs(table: Table, spec: Any) -> dict[str, tuple[int, ...]]:
    params, state = _meta(spec)
    if any(t.device.type != "meta" for t in flatten(params).values()):
        params = {k: torch.empty(v.shape, device="meta") for k, v in flatten(params).items()}
    out = table.to_theirs(params, state, spec=None if not table.derived else spec)
    return {k: tuple(v.shape) for k, v in out.items()}
