"""Position embeddings: MAE's sin-cos formula (numpy, written here), TorchMultimodal parity
(BroadcastedPositionEmbedding, SinusoidalPositionEmbeddings, 2-d/3-d sin-cos), learned table."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from checks import check_spec
from polymodal import nn as pnn
from polymodal.core import random as pr
from polymodal.core.layers import (
    BroadcastedPositionEmbedding, LearnedPositionEmbedding, decode_idx, sincos_1d, sincos_2d, sincos_3d,
    timestep_embedding,
)

seeds = st.integers(0, 2**32)


# MAE (facebookresearch/mae, util/pos_embed.py), transcribed in numpy.
def mae_1d(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def mae_2d(embed_dim, grid_h, grid_w, cls_token=False):
    grid = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))  # w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_h, grid_w])
    emb = np.concatenate([mae_1d(embed_dim // 2, grid[0]), mae_1d(embed_dim // 2, grid[1])], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)
    return emb


@given(st.integers(1, 7), st.integers(1, 7), st.sampled_from([4, 8, 12, 32, 64]), st.booleans())
def test_sincos_2d_equals_mae_formula_and_tmm(h, w, dim, cls):
    from torchmultimodal.models.masked_auto_encoder.position_embeddings import get_2d_sin_cos_embeddings

    ours = sincos_2d(h, w, dim, cls_token=cls)
    ref = torch.from_numpy(mae_2d(dim, h, w, cls)).float()
    assert ours.shape == (h * w + cls, dim) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(sincos_2d(h, w, dim, cls, dtype=torch.float64), torch.from_numpy(mae_2d(dim, h, w, cls)))
    torch.testing.assert_close(ours[None], get_2d_sin_cos_embeddings(dim, (h, w), cls), rtol=1e-5, atol=1e-5)


def test_sincos_1d_hand_values():
    e = sincos_1d(torch.tensor([0.0, 1.0]), 4, dtype=torch.float64)
    # omega = [1, 1/100]; row p = [sin p, sin p/100, cos p, cos p/100]
    want = torch.tensor([[0, 0, 1, 1], [np.sin(1), np.sin(0.01), np.cos(1), np.cos(0.01)]], dtype=torch.float64)
    torch.testing.assert_close(e, want)
    assert torch.equal(sincos_1d(3, 4), sincos_1d(torch.arange(3), 4))
    with pytest.raises(ValueError, match="even"):
        sincos_1d(3, 5)


@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.sampled_from([16, 32, 48]), st.booleans())
def test_sincos_3d_matches_tmm(t, h, w, dim, cls):
    from torchmultimodal.models.masked_auto_encoder.position_embeddings import get_3d_sin_cos_embeddings

    ours = sincos_3d(t, h, w, dim, cls_token=cls)
    torch.testing.assert_close(ours[None], get_3d_sin_cos_embeddings(dim, t, (h, w), cls), rtol=1e-5, atol=1e-5)
    assert ours.shape == (t * h * w + cls, dim)
    with pytest.raises(ValueError, match="divisible by 16"):
        sincos_3d(t, h, w, 8)


@given(st.integers(4, 65), st.lists(st.integers(0, 1000), min_size=1, max_size=5), st.booleans())
def test_timestep_embedding_matches_tmm(dim, ts, as_float):
    from torchmultimodal.modules.layers.position_embedding import SinusoidalPositionEmbeddings

    t = torch.tensor(ts, dtype=torch.float32 if as_float else torch.int64)
    torch.testing.assert_close(timestep_embedding(t, dim), SinusoidalPositionEmbeddings(dim)(t), rtol=0, atol=0)
    # per-example (vmap) == batched; any leading shape
    out = torch.func.vmap(lambda ti: timestep_embedding(ti, dim))(t)
    torch.testing.assert_close(out, timestep_embedding(t, dim), rtol=0, atol=0)
    assert timestep_embedding(t.reshape(1, -1), dim).shape == (1, len(ts), dim)


# A 1-d latent_shape breaks the reference (cartesian_prod of one axis is 1-d); covered by hand below.
@given(st.lists(st.integers(1, 4), min_size=2, max_size=3).map(tuple), st.integers(1, 3), st.integers(1, 3), seeds)
def test_broadcasted_matches_tmm(shape, per_axis, b, seed):
    from torchmultimodal.modules.layers.position_embedding import BroadcastedPositionEmbedding as Ref

    dim = per_axis * len(shape)
    spec = BroadcastedPositionEmbedding(shape, dim)
    p = spec.init(key=pr.key(seed))
    ref = Ref(shape, dim)
    missing, unexpected = ref.load_state_dict({f"embedding.{k}": v for k, v in p["embedding"].items()}, strict=True)
    n = int(np.prod(shape))
    ids = pr.randint(pr.key(seed + 1), (b, 5), -1, n)  # -1 (= last) is valid in the reference
    torch.testing.assert_close(spec(p, ids), ref(ids), rtol=0, atol=0)
    assert torch.equal(spec.indices(), ref.indices)
    assert torch.equal(decode_idx(torch.arange(n), shape), ref.indices)
    assert spec(p).shape == (n, dim)
    check_spec(spec, p, [ids], compile=seed % 2 == 0)


def test_broadcasted_hand_computed_and_shell():
    spec = BroadcastedPositionEmbedding((2, 3), 4)
    p = {"embedding": {"d_0": torch.tensor([[0.0, 1.0], [2.0, 3.0]]), "d_1": torch.tensor([[10.0, 11.0], [12.0, 13.0], [14.0, 15.0]])}}
    # flat 5 = (1, 2): [d_0[1], d_1[2]]
    assert spec(p, torch.tensor([5, 0])).tolist() == [[2.0, 3.0, 14.0, 15.0], [0.0, 1.0, 10.0, 11.0]]
    one = BroadcastedPositionEmbedding((3,), 2)
    q = {"embedding": {"d_0": torch.arange(6.0).reshape(3, 2)}}
    assert one(q, torch.tensor([[2, -1, 0]])).tolist() == [[[4.0, 5.0], [4.0, 5.0], [0.0, 1.0]]]
    assert one.indices().tolist() == [[0], [1], [2]]
    m = pnn.BroadcastedPositionEmbedding((2, 3), 4)
    assert sorted(m.state_dict()) == ["embedding.d_0", "embedding.d_1"]
    with pytest.raises(ValueError, match="multiple of"):
        BroadcastedPositionEmbedding((2, 3), 5)
    with pytest.raises(TypeError, match="expected dtype"):
        spec(p, torch.tensor([0.0]))


@given(st.integers(4, 16), st.integers(1, 8), st.integers(1, 3), st.integers(0, 3), seeds)
def test_learned_position_embedding(npos, dim, b, offset, seed):
    spec = LearnedPositionEmbedding(npos, dim)
    p = spec.init(key=pr.key(seed))
    assert p["weight"].shape == (npos, dim) and p["weight"].abs().max() <= 2 * 0.02
    n = npos - offset
    x = pr.normal(pr.key(seed + 1), (b, n, dim))
    y = spec(p, x, offset)
    torch.testing.assert_close(y, x + p["weight"][offset:])
    check_spec(spec, p, [x], {"offset": offset}, compile=seed % 2 == 0)
    ids = torch.arange(n)[None].expand(b, n) + offset
    torch.testing.assert_close(spec.lookup(p, ids), y - x)
    with pytest.raises(ValueError, match=rf"expected shape \(\.\.\., N, {dim}\) with offset \+ N <= {npos}"):
        spec(p, torch.zeros(1, npos + 1, dim))
    m = pnn.LearnedPositionEmbedding(npos, dim)
    assert list(m.state_dict()) == ["weight"]
