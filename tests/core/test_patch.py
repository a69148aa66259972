"""PatchEmbedding and keyed random masking: TorchMultimodal parity without masking, masking
invariants (restore inverts the shuffle, len_keep per example, mask sums, same key same mask),
vmap with per-example keys, generic checks, video, errors, shell."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.func import vmap

from checks import check_spec, copy_into
from polymodal import nn as pnn
from polymodal.core import random as pr
from polymodal.core.layers import PatchEmbedding, random_masking, random_masking_2d, sincos_2d, sincos_3d

seeds = st.integers(0, 2**32)


def x_of(seed, *shape):
    return pr.normal(pr.key(seed), shape)


def nonzero_params(spec, seed):
    """init, with the zero-initialised tokens made non-trivial so parity tests see them."""
    p = spec.init(key=pr.key(seed))
    for i, name in enumerate(("cls_token", "mask_token")):
        if name in p:
            p[name] = x_of(seed + 10 + i, *p[name].shape)
    if "bias" in p["conv_projection"]:
        p["conv_projection"]["bias"] = x_of(seed + 12, spec.hidden_size)
    return p


@given(st.sampled_from([(8, 4), (12, 4), ((8, 12), 4), (6, 3)]), st.integers(1, 3), st.sampled_from([4, 8]),
       st.booleans(), st.booleans(), st.integers(1, 2), seeds)
def test_matches_tmm_without_random_masking(sizes, c, d, cls, masking, b, seed):
    from torchmultimodal.modules.layers.patch_embedding import PatchEmbeddings

    image, patch = sizes
    spec = PatchEmbedding(image, patch, c, d, include_cls_token=cls, use_image_masking=masking, patch_drop_rate=0.5)
    p = nonzero_params(spec, seed)
    ref = PatchEmbeddings(image, patch, c, d, use_image_masking=masking, patch_drop_rate=0.5, include_cls_embed=cls).eval()
    copy_into(ref, p)
    x = x_of(seed + 1, b, c, *spec.image_size)
    mask = pr.bernoulli(pr.key(seed + 2), 0.5, (b, spec.num_patches)) if masking else None
    out, want = spec(p, x, mask), ref(x, mask)  # key=None: no patch drop, like TMM in eval
    torch.testing.assert_close(out.embeddings, want.embeddings, rtol=1e-5, atol=1e-5)
    assert out.random_mask is None and out.ids_restore is None
    check_spec(spec, p, [x] + ([mask] if masking else []), compile=seed % 3 == 0, atol=1e-5)
    if masking:  # masked patches are the mask token plus their position embedding
        pos = p["position_embeddings"][0, int(cls):]
        tokens = out.embeddings[:, int(cls):]
        torch.testing.assert_close(tokens[mask], (p["mask_token"][0, 0] + pos.expand(b, -1, -1))[mask])


@given(st.integers(1, 3), st.integers(2, 40), st.integers(1, 5), st.floats(0.0, 0.95), seeds)
def test_random_masking_invariants(b, n, d, ratio, seed):
    keep = int(n * (1 - ratio))
    x = x_of(seed, b, n, d)
    if keep < 1:
        with pytest.raises(ValueError, match="keeps no patch"):
            random_masking(x, ratio, key=pr.key(seed))
        return
    out = random_masking(x, ratio, key=pr.key(seed))
    assert out.x_masked.shape == (b, keep, d) and out.ids_keep.shape == (b, keep)
    assert torch.equal(out.mask.sum(-1), torch.full((b,), float(n - keep)))
    # kept rows are x at ids_keep, and exactly those positions are unmasked
    assert torch.equal(out.x_masked, torch.stack([x[i, out.ids_keep[i]] for i in range(b)]))
    for i in range(b):
        assert sorted(torch.nonzero(out.mask[i] == 0).flatten().tolist()) == sorted(out.ids_keep[i].tolist())
    # ids_restore inverts the shuffle: un-shuffling [kept, placeholders] puts every kept row back
    shuffled = torch.cat([out.x_masked, torch.zeros(b, n - keep, d)], dim=1)
    restored = torch.gather(shuffled, 1, out.ids_restore[..., None].expand(b, n, d))
    kept = out.mask == 0
    assert torch.equal(restored[kept], x[kept])
    assert torch.equal(torch.sort(out.ids_restore, -1).values, torch.arange(n).expand(b, n))
    again = random_masking(x, ratio, key=pr.key(seed))
    assert all(torch.equal(a, c) for a, c in zip(out, again))  # same key, same mask


def test_random_masking_matches_tmm_statistics_and_keys_differ():
    from torchmultimodal.modules.masking.random_masking import random_masking as tmm_masking

    x = x_of(0, 4, 16, 3)
    ours, ref = random_masking(x, 0.75, key=pr.key(1)), tmm_masking(x, 0.75)
    for a, r in zip(ours, ref):
        assert a.shape == r.shape
    assert torch.equal(ours.mask.sum(-1), ref.mask.sum(-1))
    other = random_masking(x, 0.75, key=pr.key(2))
    assert not torch.equal(ours.ids_keep, other.ids_keep)
    assert not torch.equal(ours.ids_keep[0], ours.ids_keep[1])  # per-example shuffles


def test_random_masking_vmap_per_example_keys():
    x = x_of(0, 5, 12, 4)
    keys = pr.split(pr.key(3), 5)
    batched = vmap(lambda xi, k: random_masking(xi, 0.5, key=k))(x, keys)
    for i in range(5):
        single = random_masking(x[i], 0.5, key=keys[i])
        assert all(torch.equal(a[i], s) for a, s in zip(batched, single))
    out2d = vmap(lambda xi, k: random_masking_2d(xi, 0.5, 0.25, 3, 4, key=k))(x, keys)
    loop = torch.stack([random_masking_2d(x[i], 0.5, 0.25, 3, 4, key=keys[i]) for i in range(5)])
    assert torch.equal(out2d, loop) and out2d.shape == (5, 3, 4)


@given(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5), st.floats(0.0, 0.8), st.floats(0.0, 0.8), seeds)
def test_random_masking_2d_keeps_whole_rows_and_columns(b, nt, nf, rt, rf, seed):
    kt, kf = int(nt * (1 - rt)), int(nf * (1 - rf))
    if kt < 1 or kf < 1:
        return
    # token (r, c) holds the value r * nf + c, so the kept set reveals the kept rows and columns
    x = torch.arange(nt * nf, dtype=torch.float32).reshape(1, nt * nf, 1).expand(b, -1, 2).contiguous()
    y = random_masking_2d(x, rt, rf, nt, nf, key=pr.key(seed))
    assert y.shape == (b, kt * kf, 2)
    vals = y[..., 0].long()
    for i in range(b):
        rows, cols = set((vals[i] // nf).tolist()), set((vals[i] % nf).tolist())
        assert len(rows) == kt and len(cols) == kf
        assert set(vals[i].tolist()) == {r * nf + c for r in rows for c in cols}
    assert torch.equal(y, random_masking_2d(x, rt, rf, nt, nf, key=pr.key(seed)))


@given(st.booleans(), st.sampled_from([0.5, (0.5, 0.5)]), st.integers(1, 2), seeds)
def test_patch_drop_with_keys(cls, rate, b, seed):
    spec = PatchEmbedding(8, 2, 2, 4, include_cls_token=cls, patch_drop_rate=rate, hidden_dropout=0.1)
    p = nonzero_params(spec, seed)
    x = x_of(seed + 1, b, 2, 8, 8)
    k = pr.key(seed + 2)
    out = spec(p, x, key=k)
    n_kept = 8 if rate == 0.5 else 4
    assert out.embeddings.shape == (b, n_kept + cls, 4)
    assert all((a is None and c is None) or torch.equal(a, c) for a, c in zip(out, spec(p, x, key=k)))
    if rate == 0.5:
        assert out.random_mask.shape == (b, 16) and torch.equal(out.random_mask.sum(-1), torch.full((b,), 8.0))
        # without dropout, the kept tokens are the unmasked tokens in shuffled order
        nodrop = PatchEmbedding(8, 2, 2, 4, include_cls_token=cls, patch_drop_rate=0.5)
        full = nodrop(p, x).embeddings[:, int(cls):]
        dropped = nodrop(p, x, key=k)
        ids_keep = torch.argsort(dropped.ids_restore, -1)[:, :8]
        torch.testing.assert_close(dropped.embeddings[:, int(cls):], torch.gather(full, 1, ids_keep[..., None].expand(b, 8, 4)))
    else:
        assert out.random_mask is None
    # vmap over examples with a key per example == loop (the check_spec contract with masking)
    keys = pr.split(k, b)
    f = lambda xi, ki: spec(p, xi, key=ki).embeddings  # noqa: E731
    torch.testing.assert_close(vmap(f)(x, keys), torch.stack([f(x[i], keys[i]) for i in range(b)]))
    check_spec(spec, p, [x], {"key": k}, compile=seed % 3 == 0, vmap_inputs=[x[:, None]], atol=1e-5)


@given(st.sampled_from(["learned", "sincos", None]), st.booleans(), st.integers(1, 2), seeds)
def test_video_and_position_modes(position, cls, tubelet, seed):
    spec = PatchEmbedding(8, 4, 3, 16, num_frames=4, tubelet_size=tubelet, include_cls_token=cls, position=position)
    p = nonzero_params(spec, seed)
    assert spec.grid == (4 // tubelet, 2, 2) and p["conv_projection"]["weight"].shape == (16, 3, tubelet, 4, 4)
    x = x_of(seed + 1, 2, 3, 4, 8, 8)
    y = spec(p, x).embeddings
    assert y.shape == (2, spec.num_patches + cls, 16)
    if position == "sincos":
        torch.testing.assert_close(p["position_embeddings"][0], sincos_3d(4 // tubelet, 2, 2, 16, cls_token=cls))
        g = torch.func.grad(lambda q: spec(q, x).embeddings.sum())(p)
        assert torch.all(g["position_embeddings"] == 0)  # fixed table
    if position is None:
        assert "position_embeddings" not in p
    ref = torch.nn.Conv3d(3, 16, (tubelet, 4, 4), (tubelet, 4, 4))
    copy_into(ref, p["conv_projection"])
    tokens = ref(x).flatten(2).transpose(1, 2)
    if position is not None:
        tokens = tokens + p["position_embeddings"][:, int(cls):]
    torch.testing.assert_close(y[:, int(cls):], tokens, rtol=1e-5, atol=1e-5)
    check_spec(spec, p, [x], compile=seed % 3 == 0, atol=1e-5)


def test_init_and_sincos_image():
    spec = PatchEmbedding(32, 8, 3, 64, position="sincos")
    p = spec.init(key=pr.key(0))
    torch.testing.assert_close(p["position_embeddings"][0], sincos_2d(4, 4, 64, cls_token=True))
    std = math.sqrt(1 / (3 * 8 * 8))
    w = p["conv_projection"]["weight"]
    assert abs(w.std() - std) < 0.1 * std and w.abs().max() > 2.5 * std  # torch cuts at +-2 absolute, not 2 std
    assert torch.all(p["conv_projection"]["bias"] == 0) and torch.all(p["cls_token"] == 0)
    learned = PatchEmbedding(32, 8, 3, 64).init(key=pr.key(0))["position_embeddings"]
    assert learned.shape == (1, 17, 64) and 0.015 < learned.std() < 0.025


def test_errors_and_shell():
    spec = PatchEmbedding(8, 4, 3, 8)
    p = spec.init(key=pr.key(0))
    with pytest.raises(ValueError, match=r"expected shape \(B, 3, 8, 8\), got \(2, 3, 8, 4\)"):
        spec(p, torch.ones(2, 3, 8, 4))
    with pytest.raises(ValueError, match="use_image_masking=False"):
        spec(p, torch.ones(2, 3, 8, 8), torch.zeros(2, 4, dtype=torch.bool))
    masked = PatchEmbedding(8, 4, 3, 8, use_image_masking=True)
    with pytest.raises(ValueError, match=r"image_patches_mask: expected shape \(2, 4\)"):
        masked(masked.init(key=pr.key(0)), torch.ones(2, 3, 8, 8), torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="divisible by patch_size"):
        PatchEmbedding(10, 4)
    with pytest.raises(ValueError, match="keeps no patch"):
        random_masking(torch.ones(1, 2, 3), 0.6, key=pr.key(0))
    from torchmultimodal.modules.layers.patch_embedding import PatchEmbeddings

    m = pnn.PatchEmbedding(16, 4, 3, 8, use_image_masking=True, patch_drop_rate=0.5)
    ref = PatchEmbeddings(16, 4, 3, 8, use_image_masking=True)
    assert list(m.state_dict()) == list(ref.state_dict())
    m.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 16, 16)
    m.train()  # the shell supplies a fresh key per training call: patches are dropped
    a, b = m(x), m(x)
    assert a.embeddings.shape == (2, 9, 8) and not torch.equal(a.ids_restore, b.ids_restore)
    m.eval()
    assert m(x).embeddings.shape == (2, 17, 8) and m(x).random_mask is None


def _ranks(key, shape):
    """Float noise whose argsort is the shuffle ``key`` draws (fed to the reference's torch.rand)."""
    from polymodal.core.layers.patch import _shuffle

    return torch.argsort(_shuffle(key, shape), -1).float()


def test_equals_tmm_given_the_same_shuffle(monkeypatch):
    from torchmultimodal.modules.layers.patch_embedding import PatchEmbeddings
    from torchmultimodal.modules.masking import random_masking as tmm

    x, k = x_of(0, 3, 12, 4), pr.key(5)
    noises = iter([_ranks(k, (3, 12))])
    monkeypatch.setattr(torch, "rand", lambda *a, **kw: next(noises))
    ours, ref = random_masking(x, 0.6, key=k), tmm.random_masking(x, 0.6)
    assert all(torch.equal(a, r) for a, r in zip(ours, ref))

    kt, kf = pr.split(k)
    noises = iter([_ranks(kt, (3, 3)), _ranks(kf, (3, 4))])
    assert torch.equal(random_masking_2d(x, 0.4, 0.5, 3, 4, key=k), tmm.random_masking_2d(x, 0.4, 0.5, 3, 4))

    for rate in (0.75, (0.5, 0.5)):
        spec = PatchEmbedding(8, 2, 2, 4, patch_drop_rate=rate)
        p = nonzero_params(spec, 1)
        ref_m = PatchEmbeddings(8, 2, 2, 4, patch_drop_rate=rate).train()
        copy_into(ref_m, p)
        xi = x_of(2, 2, 2, 8, 8)
        k_mask = pr.split(k)[0]
        if rate == 0.75:
            noises = iter([_ranks(k_mask, (2, 16))])
        else:
            noises = iter([_ranks(pr.split(k_mask)[0], (2, 4)), _ranks(pr.split(k_mask)[1], (2, 4))])
        out, want = spec(p, xi, key=k), ref_m(xi)
        torch.testing.assert_close(out.embeddings, want.embeddings, rtol=1e-5, atol=1e-5)
        for a, r in zip(out[1:], want[1:]):
            assert (a is None and r is None) or torch.equal(a, r)


def test_conv_stem_is_the_convs_then_the_projection_and_blanks_masked_pixels():
    """``conv_stem``: 3x3 stride-2 convs + ReLU, then the patch projection over the remaining stride, the
    same as torch.nn layers built from the params; masked patches' pixels are zeroed before the stem (its
    windows cross patch borders), so nothing of a masked patch reaches its neighbours."""
    pe = PatchEmbedding(image_size=16, patch_size=8, hidden_size=12, conv_stem=(4, 6), use_image_masking=True)
    p = pe.init(key=pr.key(0))
    assert [tuple(c["weight"].shape) for c in p["conv_stem"]] == [(4, 3, 3, 3), (6, 4, 3, 3)]
    assert tuple(p["conv_projection"]["weight"].shape) == (12, 6, 2, 2)
    x = x_of(1, 2, 3, 16, 16)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(4, 6, 3, 2, 1),
                              torch.nn.ReLU(), torch.nn.Conv2d(6, 12, 2, 2))
    for layer, q in zip((ref[0], ref[2], ref[4]), (*p["conv_stem"], p["conv_projection"])):
        layer.weight.data.copy_(q["weight"]), layer.bias.data.copy_(q["bias"])
    want = ref(x).flatten(2).transpose(1, 2) + p["position_embeddings"][:, 1:]
    torch.testing.assert_close(pe(p, x).embeddings[:, 1:], want, rtol=1e-5, atol=1e-5)
    mask = torch.tensor([[True, False, False, False], [False, False, False, False]])
    changed = x.clone()
    changed[0, :, :8, :8] = x_of(2, 3, 8, 8)  # only the masked patch's pixels differ
    a, b = pe(p, x, mask).embeddings, pe(p, changed, mask).embeddings
    torch.testing.assert_close(a, b)
    assert not torch.equal(pe(p, x).embeddings, pe(p, changed).embeddings)  # unmasked: the change shows
    with pytest.raises(ValueError, match=r"patch_size \(6, 6\) divisible by 2 \*\* 2 = 4"):
        PatchEmbedding(image_size=12, patch_size=6, hidden_size=8, conv_stem=(4, 4))
    with pytest.raises(ValueError, match="images only"):
        PatchEmbedding(image_size=8, patch_size=4, hidden_size=8, num_frames=2, conv_stem=(4,))
