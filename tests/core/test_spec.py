"""The spec base class: hashing, and the rules that keep specs traceable by torch.compile across
torch releases (torch 2.11's dynamo cannot build a spec in traced code when a field's default is a
dataclass instance, nor hash one whose fields are not set yet)."""

import dataclasses
import enum
import importlib
import pkgutil

import pytest
import torch

import polymodal
from polymodal.core.layers import Conv, Linear
from polymodal.core.spec import Spec
from polymodal.models.clip import build


def all_dataclasses() -> list[type]:
    found: dict[type, None] = {}
    for info in pkgutil.walk_packages(polymodal.__path__, "polymodal."):
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__.startswith("polymodal"):
                found[obj] = None
    return list(found)


def test_field_defaults_are_constants_or_factories():
    """A dataclass instance as a default is a sourceless object to dynamo (torch 2.11 failed to
    compile code that builds such a spec with the argument given, commit 56495a1; torch 2.14 fails
    when the default is used, instance or factory). Specs are what traced code builds (layers build helper specs in ``__call__``);
    other dataclasses (registry entries, converter rules) never are traced, so only specs are checked."""
    constant = (int, float, str, bool, type(None), tuple, frozenset, enum.Enum, torch.dtype)
    classes = [c for c in all_dataclasses() if issubclass(c, Spec)]
    assert len(classes) > 50  # the walk found the package's specs
    bad = [f"{c.__module__}.{c.__name__}.{f.name}" for c in classes for f in dataclasses.fields(c)
           if f.default is not dataclasses.MISSING and not isinstance(f.default, constant)]
    assert not bad, f"use field(default_factory=...) for: {bad}"


def test_spec_hash_is_the_dataclass_hash_and_types_error_before_fields_exist():
    conv = Conv(2, 3, 8, 3)
    assert hash(conv) == hash(tuple(getattr(conv, f.name) for f in dataclasses.fields(conv)))
    assert hash(conv) == hash(Conv(2, 3, 8, (3, 3))) and conv == Conv(2, 3, 8, (3, 3))
    assert {build("clip_tiny"): 1}[build("clip_tiny")] == 1
    blank = object.__new__(Linear)  # what dynamo holds while it traces a spec's __init__
    with pytest.raises(TypeError, match="Linear is not hashable before its fields are set"):
        hash(blank)


def test_every_spec_dataclass_uses_the_field_hash():
    specs = [c for c in all_dataclasses() if issubclass(c, Spec)]
    assert specs and all(c.__hash__ is Spec._field_hash for c in specs), [
        c.__name__ for c in specs if c.__hash__ is not Spec._field_hash]


def test_specs_built_inside_compiled_code_trace():
    """The pattern every spec uses: build a child spec in the traced function, then call it."""
    def f(w, x):
        return Linear(4, 3)({"weight": w, "bias": torch.zeros(3)}, x)

    w, x = torch.randn(3, 4), torch.randn(2, 4)
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="eager")(w, x)
    torch.testing.assert_close(got, f(w, x))


def test_stateful_specs_always_return_out_and_state():
    """The core's rule: ``init_state()`` not None -> ``(out, new_state)`` in every mode, ``state=None``
    meaning fresh state; stateless specs return ``out`` alone (CLIP with a ViT tower)."""
    from polymodal.core import random as pr
    from polymodal.core.layers.batchnorm import BatchNorm2d
    from polymodal.core.layers.codebook import Codebook
    from polymodal.models.clip import CLIPOutput

    x = torch.randn(2, 4, 3, 3)
    clip_rn, clip_vit = build("clip_tiny_rn"), build("clip_tiny")
    images, tokens = torch.randn(2, 3, 64, 64), torch.randint(1, 49000, (2, 16))
    cases = [(BatchNorm2d(4), lambda s, p, st, **kw: s(p, x, st, **kw)),
             (Codebook(num_embeddings=8, embedding_dim=4), lambda s, p, st, **kw: s(p, x, st, **kw, key=pr.key(1))),
             (clip_rn, lambda s, p, st, **kw: s(p, images, tokens, st, **kw))]
    for spec, call in cases:
        p, fresh = spec.init(key=pr.key(0)), spec.init_state()
        assert fresh is not None
        for state in (None, fresh):
            for training in (False, True):
                out = call(spec, p, state, training=training)
                assert isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict), type(spec).__name__
    assert clip_vit.init_state() is None
    assert isinstance(clip_vit(clip_vit.init(key=pr.key(0)), images, tokens), CLIPOutput)


def test_model_specs_hold_their_sub_specs_as_fields():
    """CLIP's and GPT's parts are fields (no method rebuilds a sub-spec from copied hyperparameters),
    and their params nest under the field names."""
    from polymodal.core import random as pr
    from polymodal.models.gpt import video_gpt

    for spec in (build("clip_tiny"), build("clip_tiny_rn"), video_gpt()):
        parts = {f.name for f in dataclasses.fields(spec) if isinstance(getattr(spec, f.name), Spec)}
        assert len(parts) >= 2, type(spec).__name__
        with torch.device("meta"):
            assert parts <= set(spec.init(key=pr.key(0))), type(spec).__name__
