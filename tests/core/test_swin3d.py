"""Swin3D: windows, shifted-window attention, blocks, encoder — torchvision parity, conversion, generic checks."""

from functools import partial

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models import swin_transformer as tv2d
from torchvision.models.video import swin_transformer as tvs

from checks import check_spec
from polymodal import nn as pnn
from polymodal.core import pytree
from polymodal.core import random as pr
from polymodal.core.encoders.swin3d import (
    PatchEmbed3d, PatchMerging, Swin3D, SwinTransformerBlock3d, swin3d, swin3d_b, swin3d_s, swin3d_t,
)
from polymodal.core.layers import LayerNorm, Linear
from polymodal.core.layers.window import (
    ShiftedWindowAttention3d, relative_position_index, shifted_window_mask, window_and_shift, window_partition,
    window_reverse,
)
from polymodal.models.swin3d import from_torchvision, infer_spec, to_torchvision

TOL = dict(rtol=1e-5, atol=1e-5)
seeds = st.integers(0, 2**32)
win3 = st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4))
size3 = st.tuples(st.integers(1, 7), st.integers(1, 7), st.integers(1, 7))


def x_of(seed, *shape):
    return pr.normal(pr.key(seed), shape)


def ours(state_dict):
    """A torchvision sub-module's state dict as our tree (the index buffers are recomputed)."""
    return pytree.unflatten({k: v for k, v in state_dict.items() if not k.endswith("relative_position_index")})


def tv_attention(dim, heads, window, shift, seed):
    torch.manual_seed(seed % 2**31)
    ref = tvs.ShiftedWindowAttention3d(dim, list(window), list(shift), heads).eval()
    with torch.no_grad():  # a bias table large enough to matter (torchvision inits it at std 0.02)
        ref.relative_position_bias_table.normal_()
    return ref


# ---------------------------------------------------------------- windows, masks, indices


@given(st.lists(st.integers(1, 2), max_size=2), win3, st.tuples(*[st.integers(1, 3)] * 3), st.integers(1, 3), seeds)
def test_window_partition_reverse_is_identity(lead, window, mult, c, seed):
    size = tuple(w * m for w, m in zip(window, mult))
    x = x_of(seed, *lead, *size, c)
    win = window_partition(x, window)
    n_windows = mult[0] * mult[1] * mult[2]
    assert win.shape == (*lead, n_windows, window[0] * window[1] * window[2], c)
    assert torch.equal(window_reverse(win, window, size), x)
    # the last window in (t, h, w) order holds the last block of the volume, flattened in (t, h, w) order
    wd, wh, ww = window
    block = x[..., size[0] - wd:, size[1] - wh:, size[2] - ww:, :].reshape(*lead, wd * wh * ww, c)
    assert torch.equal(win[..., -1, :, :], block)
    j = min(1, mult[2] - 1)  # the next window along W
    assert torch.equal(win[..., j, :, :], x[..., :wd, :wh, j * ww:(j + 1) * ww, :].reshape(*lead, -1, c))


def test_window_partition_rejects_partial_windows():
    with pytest.raises(ValueError, match=r"\(T, H, W\) = \(4, 5, 6\) is not a multiple of the window \(2, 2, 3\)"):
        window_partition(torch.zeros(1, 4, 5, 6, 2), (2, 2, 3))


@given(win3, st.tuples(*[st.integers(1, 3)] * 3), st.data())
def test_shifted_window_mask_matches_torchvision(window, mult, data):
    shift = tuple(data.draw(st.integers(0, w - 1)) for w in window)
    padded = tuple(w * m for w, m in zip(window, mult))
    ref = tvs._compute_attention_mask_3d(torch.zeros(1), padded, window, shift)
    assert torch.equal(shifted_window_mask(padded, window, shift), ref)


@given(win3)
@settings(max_examples=6)
def test_relative_position_index_matches_torchvision(window):
    ref = tvs.ShiftedWindowAttention3d(4, list(window), [0, 0, 0], 1)
    assert torch.equal(relative_position_index(window), ref.relative_position_index)


@given(size3, win3)
def test_window_and_shift_rules_match_torchvision(size, window):
    shift = tuple(w // 2 for w in window)
    ref = tvs._get_window_and_shift_size(list(shift), list(size), list(window))
    assert window_and_shift(size, window, shift) == (tuple(ref[0]), tuple(ref[1]))


# ---------------------------------------------------------------- attention


@given(st.integers(1, 3), st.sampled_from([2, 4]), win3, st.booleans(), size3, st.integers(1, 2), seeds)
@settings(max_examples=20)
def test_attention_matches_torchvision(heads, head_dim, window, shifted, size, b, seed):
    shift = tuple(w // 2 if shifted else 0 for w in window)
    dim = heads * head_dim
    ref = tv_attention(dim, heads, window, shift, seed)
    spec = ShiftedWindowAttention3d(dim, heads, window, shift)
    x = x_of(seed, b, *size, dim)
    torch.testing.assert_close(spec(ours(ref.state_dict()), x), ref(x), **TOL)


@pytest.mark.parametrize("size, window, shift", [
    ((4, 8, 8), (2, 4, 4), (0, 0, 0)),  # divisible, no shift
    ((4, 8, 8), (2, 4, 4), (1, 2, 2)),  # divisible, shifted
    ((3, 5, 7), (2, 3, 3), (0, 0, 0)),  # padding, no shift
    ((3, 5, 7), (2, 3, 3), (1, 1, 1)),  # padding, shifted
    ((2, 9, 4), (8, 7, 7), (4, 3, 3)),  # window shrinks on T and W (shift zeroed there), padding on H
    ((5, 6, 7), (2, 3, 3), (0, 1, 0)),  # shift on one axis only
])
def test_attention_named_cases_match_torchvision_and_pass_generic_checks(size, window, shift):
    ref = tv_attention(6, 2, window, shift, 0)
    spec = ShiftedWindowAttention3d(6, 2, window, shift)
    p = ours(ref.state_dict())
    x = x_of(1, 2, *size, 6)
    torch.testing.assert_close(spec(p, x), ref(x), **TOL)
    check_spec(spec, p, [x], compile=size == (3, 5, 7), atol=1e-5)


def test_attention_dropout_uses_keys():
    spec = ShiftedWindowAttention3d(4, 2, (2, 2, 2), (1, 1, 1), attention_dropout=0.5, dropout=0.1)
    p, x, k = spec.init(key=pr.key(0)), x_of(1, 2, 3, 4, 4, 4), pr.key(2)
    assert torch.equal(spec(p, x, key=k), spec(p, x, key=k))
    assert not torch.allclose(spec(p, x, key=k), spec(p, x))
    assert not torch.allclose(spec(p, x, key=k), spec(p, x, key=pr.key(3)))


# ---------------------------------------------------------------- blocks, patch embedding, merging


@pytest.mark.parametrize("size, shift", [((4, 6, 6), (0, 0, 0)), ((4, 6, 6), (1, 1, 1)), ((3, 5, 7), (1, 1, 1))])
def test_block_matches_torchvision_and_passes_generic_checks(size, shift):
    torch.manual_seed(0)
    ref = tv2d.SwinTransformerBlock(8, 2, [2, 3, 3], list(shift), stochastic_depth_prob=0.2,
                                    norm_layer=partial(torch.nn.LayerNorm, eps=1e-5),
                                    attn_layer=tvs.ShiftedWindowAttention3d).eval()
    spec = SwinTransformerBlock3d(8, 2, (2, 3, 3), shift, stochastic_depth_prob=0.2)
    p = ours(ref.state_dict())
    assert sorted(pytree.flatten(p)) == sorted(pytree.flatten(spec.init(key=pr.key(0))))
    x = x_of(1, 2, *size, 8)
    torch.testing.assert_close(spec(p, x), ref(x), **TOL)
    # gradients too (the learned bias table reaches the fused kernel as its additive mask)
    w = torch.cos(torch.arange(x.numel(), dtype=x.dtype)).reshape(x.shape)
    grads = torch.func.grad(lambda q: (spec(q, x) * w).sum())(p)
    (ref(x) * w).sum().backward()
    for k, g in pytree.flatten(grads).items():
        torch.testing.assert_close(g, ref.get_parameter(k).grad, **TOL, msg=k)
    check_spec(spec, p, [x], compile=shift == (1, 1, 1), atol=1e-5)


def test_drop_path_rate_zero_is_identity_and_positive_rate_drops_per_example():
    p = SwinTransformerBlock3d(8, 2, (2, 2, 2)).init(key=pr.key(0))
    x = x_of(1, 64, 2, 2, 2, 8)
    none = SwinTransformerBlock3d(8, 2, (2, 2, 2), stochastic_depth_prob=0.0)
    assert torch.equal(none(p, x, key=pr.key(5)), none(p, x))
    half = SwinTransformerBlock3d(8, 2, (2, 2, 2), stochastic_depth_prob=0.5)
    y = half(p, x, key=pr.key(5))
    assert torch.equal(y, half(p, x, key=pr.key(5)))
    # with both branches dropped an example passes through unchanged; some but not all do (p = 1/4)
    passed = (y == x).flatten(1).all(1)
    assert 0 < int(passed.sum()) < 64
    tiny = swin3d(embed_dim=8, depths=(1, 1), num_heads=(1, 2), window_size=(2, 2, 2), stochastic_depth_prob=0.0)
    tp, v = tiny.init(key=pr.key(0)), x_of(2, 1, 3, 4, 16, 16)
    assert torch.equal(tiny(tp, v, key=pr.key(1)).features, tiny(tp, v).features)


@given(st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)), size3, st.booleans(), st.integers(1, 2), seeds)
@settings(max_examples=8)
def test_patch_embed_matches_torchvision(patch, size, norm, b, seed):
    torch.manual_seed(seed % 2**31)
    ref = tvs.PatchEmbed3d(list(patch), 3, 8, partial(torch.nn.LayerNorm, eps=1e-5) if norm else None).eval()
    spec = PatchEmbed3d(patch, 3, 8, norm=norm)
    p = pytree.unflatten(ref.state_dict())
    x = x_of(seed, b, 3, *size)
    torch.testing.assert_close(spec(p, x), ref(x), **TOL)
    check_spec(spec, p, [x], compile=False, atol=1e-5)


@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 3), st.integers(1, 2), seeds)
@settings(max_examples=8)
def test_patch_merging_matches_torchvision(h, w, t, b, seed):
    torch.manual_seed(seed % 2**31)
    ref = tv2d.PatchMerging(4, partial(torch.nn.LayerNorm, eps=1e-5))
    spec = PatchMerging(4)
    p = pytree.unflatten(ref.state_dict())
    x = x_of(seed, b, t, h, w, 4)
    torch.testing.assert_close(spec(p, x), ref(x), **TOL)
    check_spec(spec, p, [x], compile=False, atol=1e-5)


# ---------------------------------------------------------------- the encoder


def tiny_tv(seed=0, num_classes=5):
    torch.manual_seed(seed)
    return tvs.SwinTransformer3d([2, 4, 4], 8, [1, 2], [1, 2], [2, 3, 3], stochastic_depth_prob=0.2,
                                 num_classes=num_classes).eval()


def test_swin3d_t_matches_torchvision():
    torch.manual_seed(0)
    ref = torchvision.models.video.swin3d_t(weights=None).eval()
    spec, p = swin3d_t(), from_torchvision(ref.state_dict())
    assert infer_spec(ref.state_dict()) == spec
    x = x_of(0, 1, 3, 4, 64, 64)
    out = spec(p, x)
    with torch.no_grad():
        feats = ref.norm(ref.features(ref.patch_embed(x)))
        logits = ref(x)
    torch.testing.assert_close(out.features, feats, **TOL)
    torch.testing.assert_close(out.logits, logits, **TOL)
    assert out.features.shape == (1, 2, 2, 2, 768) and out.pooled.shape == (1, 768)


def test_headless_swin3d_matches_torchmultimodal():
    tmm = pytest.importorskip("torchmultimodal.modules.encoders.swin_transformer_3d_encoder")
    torch.manual_seed(0)
    ref = tmm.SwinTransformer3d([2, 4, 4], 8, [1, 2], [1, 2], [2, 3, 3], num_classes=None).eval()
    spec = infer_spec(ref.state_dict(), window_size=(2, 3, 3))
    p = from_torchvision(ref.state_dict(), spec)
    assert spec.num_classes is None and "head" not in p
    x = x_of(0, 2, 3, 3, 13, 10)
    torch.testing.assert_close(spec(p, x).pooled, ref(x), **TOL)


def test_tiny_swin3d_with_padding_matches_torchvision_and_passes_generic_checks():
    ref = tiny_tv()
    spec = swin3d(embed_dim=8, depths=(1, 2), num_heads=(1, 2), window_size=(2, 3, 3), stochastic_depth_prob=0.2,
                  num_classes=5)
    p = from_torchvision(ref.state_dict(), spec)
    x = x_of(0, 2, 3, 5, 26, 18)  # T, H, W not multiples of the patch; odd sizes at the merge
    torch.testing.assert_close(spec(p, x).logits, ref(x), **TOL)
    assert spec.drop_path_rates() == [blk.stochastic_depth.p for blk in (*ref.features[0], *ref.features[2])]
    check_spec(spec, p, [x], atol=1e-5)


def test_state_dict_round_trip_is_exact():
    sd = torchvision.models.video.swin3d_t(weights=None).state_dict()
    back = to_torchvision(from_torchvision(sd))
    assert list(back) == list(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k
    ref = tiny_tv()
    small = to_torchvision(from_torchvision(ref.state_dict(), infer_spec(ref.state_dict(), (2, 3, 3))),
                           infer_spec(ref.state_dict(), (2, 3, 3)))
    tiny_tv(seed=1).load_state_dict(small, strict=True)


def test_conversion_errors_name_keys():
    sd = tiny_tv().state_dict()
    spec = infer_spec(sd, (2, 3, 3))
    with pytest.raises(ValueError, match=r"unknown keys \(1\): classifier\.weight"):
        from_torchvision({**sd, "classifier.weight": torch.zeros(1)}, spec)
    missing = {k: v for k, v in sd.items() if k not in ("features.2.1.norm1.weight", "norm.bias")}
    with pytest.raises(ValueError, match=r"missing keys \(2\): features\.2\.1\.norm1\.weight, norm\.bias"):
        from_torchvision(missing, spec)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): features\.0\.0\.attn\.extra"):
        from_torchvision({**sd, "features.0.0.attn.extra": torch.zeros(1)}, spec)
    with pytest.raises(ValueError, match=r"relative_position_index: does not match window_size \(3, 3, 3\)"):
        from_torchvision(sd, swin3d(embed_dim=8, depths=(1, 2), num_heads=(1, 2), window_size=(3, 3, 3), num_classes=5))
    with pytest.raises(ValueError, match=r"has 75 rows, but window_size \(8, 7, 7\) needs 2535"):
        from_torchvision(sd)
    with pytest.raises(ValueError, match=r"unknown keys \(1\): bogus"):
        to_torchvision({**from_torchvision(sd, spec), "bogus": torch.zeros(1)}, spec)


@pytest.mark.parametrize("builder, tv_builder, expected", [
    (swin3d_t, torchvision.models.video.swin3d_t, 28158070),
    (swin3d_s, torchvision.models.video.swin3d_s, 49816678),
    (swin3d_b, torchvision.models.video.swin3d_b, 88048984),
])
def test_parameter_counts_equal_torchvision(builder, tv_builder, expected):
    params = builder().init(key=pr.key(0, device="meta"))  # shapes only
    with torch.device("meta"):  # weights=None; nothing is initialised or run
        ref = tv_builder(weights=None)
    assert pytree.num_params(params) == sum(q.numel() for q in ref.parameters()) == expected
    assert pytree.num_params(params["head"]) == (builder().num_features + 1) * 400


@pytest.mark.parametrize("builder, tv_builder", [
    (swin3d_t, torchvision.models.video.swin3d_t), (swin3d_b, torchvision.models.video.swin3d_b)])
def test_builders_make_torchvisions_parts(builder, tv_builder):
    """Each part the builder makes once is the torchvision module at the same place (meta: nothing runs)."""
    spec = builder()
    with torch.device("meta"):
        ref = tv_builder(weights=None)
    assert spec.patch_embed.patch_size == ref.patch_embed.tuple_patch_size
    assert spec.patch_embed.embed_dim == ref.patch_embed.proj.out_channels
    assert len(spec.stages) == len(spec.merges) + 1 == len(ref.features) // 2 + 1
    for i, stage in enumerate(spec.stages):
        assert len(stage) == len(ref.features[2 * i])
        for blk, tv in zip(stage, ref.features[2 * i]):
            assert (blk.dim, blk.num_heads, blk.hidden_dim) == (tv.norm1.normalized_shape[0], tv.attn.num_heads,
                                                                tv.mlp[0].out_features)
            assert (list(blk.window_size), list(blk.shift_size)) == (tv.attn.window_size, tv.attn.shift_size)
            assert blk.stochastic_depth_prob == tv.stochastic_depth.p and blk.norm_eps == tv.norm1.eps
        if i < len(spec.merges):
            assert 4 * spec.merges[i].dim == ref.features[2 * i + 1].reduction.in_features
    assert (spec.norm.dim, spec.norm.eps) == (ref.norm.normalized_shape[0], ref.norm.eps) == (spec.num_features, 1e-5)
    assert (spec.head.in_features, spec.head.out_features) == (ref.head.in_features, ref.head.out_features)
    assert builder(num_classes=None).head is None and builder(num_classes=None).num_classes is None


def test_spec_composed_from_parts_equals_the_builders_and_checks_them():
    spec = swin3d(embed_dim=8, depths=(1, 2), num_heads=(1, 2), window_size=(2, 3, 3), num_classes=5)
    pe, stages, merges, norm, head = spec.patch_embed, spec.stages, spec.merges, spec.norm, spec.head
    by_hand = Swin3D(patch_embed=pe, stages=[list(s) for s in stages], merges=list(merges), norm=norm, head=head)
    assert by_hand == spec and hash(by_hand) == hash(spec)  # lists are kept as tuples: hashable
    assert (spec.depths, spec.num_heads, spec.embed_dim, spec.num_features) == ((1, 2), (1, 2), 8, 16)
    s1 = stages[1]
    with pytest.raises(ValueError, match=r"Swin3D: merges: expected 1 \(one between consecutive stages\), got 0"):
        Swin3D(pe, stages, (), norm, head)
    with pytest.raises(ValueError, match=r"Swin3D: stages\[1\]\[0\]: expected dim 16, got 8"):
        Swin3D(pe, (stages[0], stages[0]), merges, norm, head)
    with pytest.raises(ValueError, match=r"Swin3D: stages\[1\]\[1\]: expected the window of every block, \(2, 3, 3\), "
                                         r"got \(2, 2, 2\)"):
        Swin3D(pe, (stages[0], (s1[0], SwinTransformerBlock3d(16, 2, (2, 2, 2)))), merges, norm, head)
    with pytest.raises(ValueError, match=r"Swin3D: merges\[0\]: expected dim 8, got 16"):
        Swin3D(pe, stages, (PatchMerging(16),), norm, head)
    with pytest.raises(ValueError, match=r"Swin3D: norm: expected dim 16 \(the last stage's\), got 8"):
        Swin3D(pe, stages, merges, LayerNorm(8), head)
    with pytest.raises(ValueError, match=r"Swin3D: head: expected in_features 16, got 8"):
        Swin3D(pe, stages, merges, norm, Linear(8, 5))
    with pytest.raises(ValueError, match=r"Swin3D: stages: expected at least one stage of at least one block, "
                                         r"got depths \(1, 0\)"):
        Swin3D(pe, (stages[0], ()), merges, norm, head)
    with pytest.raises(TypeError, match=r"Swin3D: stages\[0\]\[0\]: expected SwinTransformerBlock3d, got Linear"):
        Swin3D(pe, ((Linear(8, 8),), s1), merges, norm, head)


def test_bad_inputs_raise_clear_errors():
    spec = swin3d(embed_dim=8, depths=(1,), num_heads=(1,), window_size=(2, 2, 2))
    p = spec.init(key=pr.key(0))
    with pytest.raises(ValueError, match=r"Swin3D: x: expected shape \(B, 3, T, H, W\) or \(3, T, H, W\), got \(3, 64, 64\)"):
        spec(p, torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match=r"Swin3D: x: expected shape \(B, 3, T, H, W\).*got \(1, 4, 2, 8, 8\)"):
        spec(p, torch.zeros(1, 4, 2, 8, 8))
    blk = SwinTransformerBlock3d(8, 2, (2, 2, 2))
    with pytest.raises(ValueError, match=r"SwinTransformerBlock3d: x: expected shape \(\*, T, H, W, 8\), got \(1, 2, 4, 4, 6\)"):
        blk(blk.init(key=pr.key(0)), torch.zeros(1, 2, 4, 4, 6))
    with pytest.raises(ValueError, match=r"PatchMerging: x: expected shape \(\*, H, W, 4\), got \(4,\)"):
        PatchMerging(4)({}, torch.zeros(4))
    with pytest.raises(TypeError, match="floating-point"):
        spec(p, torch.zeros(1, 3, 2, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"0 <= shift_size < window_size"):
        ShiftedWindowAttention3d(8, 2, (2, 2, 2), (2, 0, 0))
    with pytest.raises(ValueError, match=r"dim \(8\) must be divisible by num_heads \(3\)"):
        ShiftedWindowAttention3d(8, 3)
    with pytest.raises(ValueError, match=r"swin3d: expected one positive depth per stage"):
        swin3d(depths=(2, 2), num_heads=(1,))


def test_shells():
    ref = tiny_tv()
    spec = swin3d(embed_dim=8, depths=(1, 2), num_heads=(1, 2), window_size=(2, 3, 3), stochastic_depth_prob=0.5,
                  num_classes=5)
    m = pnn.Swin3D.from_params(spec, from_torchvision(ref.state_dict(), spec)).eval()
    assert sorted(m.state_dict()) == sorted(pytree.flatten(m.params))
    x = x_of(0, 2, 3, 4, 16, 16)
    torch.testing.assert_close(m(x).logits, ref(x), **TOL)
    m.train()
    assert not torch.equal(m(x).features, m(x).features)  # a fresh stochastic-depth key per training call
    blk = pnn.SwinTransformerBlock3d(8, 2, window_size=(2, 2, 2), shift_size=(1, 1, 1), key=pr.key(0))
    assert "attn.relative_position_bias_table" in blk.state_dict() and "mlp.3.weight" in blk.state_dict()
    assert pnn.ShiftedWindowAttention3d(8, 2)(torch.zeros(1, 2, 3, 3, 8)).shape == (1, 2, 3, 3, 8)
    assert pnn.PatchEmbed3d(embed_dim=8)(torch.zeros(1, 3, 2, 8, 8)).shape == (1, 1, 2, 2, 8)
    assert pnn.PatchMerging(8)(torch.zeros(1, 2, 4, 4, 8)).shape == (1, 2, 2, 2, 16)


@pytest.mark.parametrize("shift", [(0, 0, 0), (1, 1, 1)])
def test_per_sample_gradients_equal_a_loop(shift):
    spec = SwinTransformerBlock3d(8, 2, (2, 3, 3), shift)
    p, x = spec.init(key=pr.key(0)), x_of(1, 3, 3, 5, 7, 8)

    def loss(q, xi):
        return spec(q, xi[None]).square().sum()

    per_sample = pytree.flatten(torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(p, x))
    for i in range(3):
        for k, g in pytree.flatten(torch.func.grad(loss)(p, x[i])).items():
            torch.testing.assert_close(per_sample[k][i], g, **TOL, msg=k)


def test_relative_position_bias_trains_after_a_first_call_in_inference_mode():
    """The flat index is cached per (window, n, device): a first call under torch.inference_mode must not
    leave an inference tensor that a later training call saves for backward."""
    from polymodal.core.layers import window as W

    W._cached.cache_clear()
    table = torch.randn(27, 2, requires_grad=True)
    with torch.inference_mode():
        first = W.relative_position_bias(table.detach(), (2, 2, 2), (2, 2, 2))
    bias = W.relative_position_bias(table, (2, 2, 2), (2, 2, 2))
    bias.sum().backward()
    expected = W.relative_position_index((2, 2, 2))[:8, :8]
    assert torch.equal(bias.detach(), table.detach()[expected.reshape(-1)].reshape(8, 8, -1).permute(2, 0, 1))
    assert torch.equal(first, bias.detach())
    assert torch.equal(table.grad, torch.bincount(expected.reshape(-1), minlength=27).float()[:, None].expand(27, 2))
