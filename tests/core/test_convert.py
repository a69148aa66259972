"""The conversion engine: patterns, transforms, fused splits, derived keys, defaults, the one
mismatch error, exact round trips, and the meta initialisation every spec supports."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from polymodal.core import layers as L
from polymodal.core import random as pr
from polymodal.core.convert import (
    Derived, Rule, Table, chain, expected_shapes, fused, meta_init, transpose, unsqueeze,
)
from polymodal.core.pytree import flatten

# Hugging Face / BERT-style attention: separate q, k, v projections <-> our fused in_proj.
SEPARATE_QKV = Table((
    Rule(("q.weight", "k.weight", "v.weight"), "in_proj_weight", fused(0)),
    Rule(("q.bias", "k.bias", "v.bias"), "in_proj_bias", fused(0)),
    Rule("o.{p}", "out_proj.{p}"),
), name="separate-qkv attention")


def test_patterns_with_affine_indices_and_multi_segment_wildcards():
    table = Table((Rule("features.{2i}.{j}.{rest*}", "stages.{i}.{j}.{rest*}"),
                   Rule("features.{2i+1}.{rest*}", "merges.{i}.{rest*}")))
    x = torch.zeros(1)
    got = table.rename({"features.0.1.attn.qkv.weight": x, "features.3.norm.bias": x, "features.4.0.w": x})
    assert sorted(got) == ["merges.1.norm.bias", "stages.0.1.attn.qkv.weight", "stages.2.0.w"]
    back = table.to_theirs({"stages": [[{"w": x}]], "merges": [{"w": x}, {"w": x}]})
    assert sorted(back) == ["features.0.0.w", "features.1.w", "features.3.w"]
    assert table.unknown({"head.weight": x, "features.2.0.w": x}) == ["head.weight"]


def test_fused_qkv_split_gives_torch_separate_projection_attention():
    spec = L.MultiHeadAttention(8, 2)
    params = spec.init(key=pr.key(0))
    theirs = SEPARATE_QKV.to_theirs(params, spec=spec)
    assert sorted(theirs) == ["k.bias", "k.weight", "o.bias", "o.weight", "q.bias", "q.weight", "v.bias", "v.weight"]
    x = pr.normal(pr.key(1), (5, 2, 8))  # (T, B, D): torch's functional MHA is sequence-first
    want, _ = F.multi_head_attention_forward(
        x, x, x, 8, 2, None, torch.cat([theirs["q.bias"], theirs["k.bias"], theirs["v.bias"]]), None, None, False,
        0.0, theirs["o.weight"], theirs["o.bias"], training=False, need_weights=False, use_separate_proj_weight=True,
        q_proj_weight=theirs["q.weight"], k_proj_weight=theirs["k.weight"], v_proj_weight=theirs["v.weight"])
    ours = spec(SEPARATE_QKV.to_ours(theirs, spec), x.transpose(0, 1)).output.transpose(0, 1)
    torch.testing.assert_close(ours, want, atol=1e-6, rtol=1e-5)


def test_transpose_and_unsqueeze_by_hand():
    # A JAX-style dense layer stores kernel (in, out) and computes x @ kernel + bias.
    table = Table((Rule("dense.kernel", "weight", transpose()), Rule("dense.bias", "bias", chain(unsqueeze(0)))))
    kernel = torch.arange(6.0).reshape(3, 2)
    params = table.to_ours({"dense.kernel": kernel, "dense.bias": torch.tensor([10.0, 20.0])}, L.Linear(3, 2))
    x = torch.tensor([[1.0, 0.0, 2.0]])
    assert L.Linear(3, 2)(params, x).tolist() == [[1 * 0 + 2 * 4 + 10, 1 * 1 + 2 * 5 + 20]]
    cls = Table((Rule("cls", "cls_token", unsqueeze(2)),))
    assert cls.rename({"cls": torch.ones(4)})["cls_token"].shape == (1, 1, 4)
    assert cls.to_theirs({"cls_token": torch.ones(1, 1, 4)})["cls"].shape == (4,)


def test_one_error_names_every_missing_unexpected_and_misshaped_key():
    spec = L.MultiHeadAttention(8, 2)
    sd = SEPARATE_QKV.to_theirs(spec.init(key=pr.key(0)))
    del sd["k.weight"], sd["o.bias"]
    sd["q.bias"] = torch.zeros(7)
    sd["extra.gamma"] = torch.zeros(1)
    with pytest.raises(ValueError) as e:
        SEPARATE_QKV.to_ours(sd, spec)
    assert str(e.value) == (
        "separate-qkv attention does not match MultiHeadAttention:\n"
        "  missing keys (2): k.weight, o.bias\n"
        "  unexpected keys (1): extra.gamma\n"
        "  shape mismatches (1): q.bias: expected (8,), got (7,)")


def test_drop_defaults_and_derived_keys():
    spec = L.Linear(3, 2)
    index = lambda spec, device: torch.arange(spec.out_features, device=device)  # noqa: E731
    table = Table((Rule("w", "weight"), Rule("b", "bias")), drop=("{any*}.mask",),
                  derived=(Derived("w_index", "weight", index, lambda s: f"out_features {s.out_features}"),),
                  defaults=(("bias", lambda s: torch.full((s.out_features,), 0.5)),), name="toy")
    w = torch.ones(2, 3)
    params = table.to_ours({"w": w, "attn.mask": torch.ones(1), "w_index": torch.arange(2)}, spec)
    assert params["weight"] is w and params["bias"].tolist() == [0.5, 0.5]  # no copy; default filled
    assert table.to_ours({"w": w, "b": torch.zeros(2)}, spec)["bias"].tolist() == [0.0, 0.0]  # optional key read
    out = table.to_theirs(params, spec=spec)
    assert sorted(out) == ["w", "w_index"] and out["w_index"].tolist() == [0, 1]  # default left out
    with pytest.raises(ValueError, match=r"w_index: does not match out_features 2 \(shape \(3,\)\)"):
        table.to_ours({"w": w, "w_index": torch.arange(3)}, spec)
    with pytest.raises(ValueError, match=r"keys with no counterpart in a toy \(1\): scale"):
        table.to_theirs({"weight": w, "scale": w})


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.booleans())
def test_round_trips_are_exact(heads, head_dim, bias):
    dim = heads * head_dim
    spec = L.MultiHeadAttention(dim, heads, bias=bias, out_bias=bias)
    # The output projection stored transposed: its rule comes before the generic "o.{p}".
    table = Table((Rule("o.weight", "out_proj.weight", transpose()),)) + SEPARATE_QKV
    params = spec.init(key=pr.key(heads))
    theirs = table.to_theirs(params, spec=spec)
    assert theirs["o.weight"].shape == (dim, dim) and torch.equal(theirs["o.weight"], params["out_proj"]["weight"].t())
    back = table.to_ours(theirs, spec)
    assert flatten(back).keys() == flatten(params).keys()
    assert all(torch.equal(a, b) for a, b in zip(flatten(back).values(), flatten(params).values()))
    again = table.to_theirs(back)
    assert again.keys() == theirs.keys() and all(torch.equal(again[k], theirs[k]) for k in theirs)


def test_meta_init_works_for_every_registered_builder(monkeypatch):
    from polymodal.core.convert import _meta
    from polymodal.registry import families

    for name in ("clip_tiny", "clip_tiny_rn", "video_gpt"):  # real random bits on the meta device; shapes equal a real init's
        spec = next(f for f in families().values() if name in f.builders).builders[name]()
        real = {k: tuple(v.shape) for k, v in (flatten(spec.init(key=pr.key(0))) | flatten(spec.init_state() or {})).items()}
        assert expected_shapes(spec) == real, name
    # Every builder: values are never read on meta, so a cheap stand-in hash keeps this fast.
    monkeypatch.setattr(pr, "_hash", lambda k, c: k[..., 0].reshape(k.shape[:-1] + (1,) * c.dim()) ^ c)
    _meta.cache_clear()
    for fam in families().values():
        for name, builder in fam.builders.items():
            leaves = flatten(meta_init(builder()))
            assert leaves and all(v.device.type == "meta" for v in leaves.values()), f"{fam.name}/{name}"
    _meta.cache_clear()
