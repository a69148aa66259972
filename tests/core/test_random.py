import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.func import vmap

from polymodal.core import random as pr

seeds = st.integers(0, 2**63 - 1)
shapes = st.lists(st.integers(1, 6), min_size=0, max_size=3).map(tuple)


@given(seeds, shapes)
def test_same_key_same_numbers_and_global_rng_untouched(seed, shape):
    before = torch.get_rng_state()
    k = pr.key(seed)
    for f in (pr.normal, pr.uniform, lambda k, s: pr.bernoulli(k, 0.3, s), lambda k, s: pr.randint(k, s, -3, 9),
              pr.truncated_normal):
        assert torch.equal(f(k, shape), f(k, shape))
    assert torch.equal(pr.permutation(k, 7), pr.permutation(k, 7))
    assert torch.equal(torch.get_rng_state(), before)


@given(seeds)
def test_split_and_fold_in_give_distinct_keys(seed):
    k = pr.key(seed)
    ks = pr.split(k, 5)
    assert ks.shape == (5, 2) and ks.dtype == torch.int64
    rows = {tuple(r.tolist()) for r in ks} | {tuple(k.tolist())} | {tuple(pr.fold_in(k, i).tolist()) for i in range(5)}
    assert len(rows) == 11
    assert torch.equal(pr.fold_in(k, 3), pr.fold_in(k, torch.tensor(3)))


def test_distributions_moments():
    k = pr.key(1)
    n = 200_000
    x = pr.normal(k, (n,))
    assert abs(x.mean()) < 0.01 and abs(x.std() - 1) < 0.01
    u = pr.uniform(pr.fold_in(k, 1), (n,))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.005
    b = pr.bernoulli(pr.fold_in(k, 2), 0.2, (n,))
    assert b.dtype == torch.bool and abs(b.float().mean() - 0.2) < 0.005
    r = pr.randint(pr.fold_in(k, 3), (n,), -2, 3)
    assert r.min() == -2 and r.max() == 2 and abs(r.float().mean()) < 0.02
    t = pr.truncated_normal(pr.fold_in(k, 4), (n,), -1.0, 2.0)
    assert t.min() >= -1 and t.max() <= 2
    # mean of N(0,1) truncated to [a, b] is (phi(a) - phi(b)) / (Phi(b) - Phi(a))
    phi = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    Phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    assert abs(t.mean() - (phi(-1) - phi(2)) / (Phi(2) - Phi(-1))) < 0.01
    p = pr.permutation(pr.fold_in(k, 5), 1000)
    assert torch.equal(p.sort().values, torch.arange(1000))


def test_bits_look_independent():
    # Adjacent counters and adjacent keys must not be correlated (a weak mixer would fail this).
    k = pr.key(0)
    u = pr.uniform(k, (100_000,))
    assert abs(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1]) < 0.01
    v = pr.uniform(pr.key(1), (100_000,))
    assert abs(torch.corrcoef(torch.stack([u, v]))[0, 1]) < 0.01
    bit_means = torch.stack([(pr.bits(k, (50_000,)) >> i) & 1 for i in range(32)]).float().mean(1)
    assert (bit_means - 0.5).abs().max() < 0.01


@given(seeds, st.integers(1, 6))
def test_vmap_over_keys_gives_each_its_own_draw(seed, n):
    keys = pr.split(pr.key(seed), n)
    out = vmap(lambda k: pr.normal(k, (4,)))(keys)
    loop = torch.stack([pr.normal(k, (4,)) for k in keys])
    assert torch.equal(out, loop)
    if n > 1:
        assert not torch.equal(out[0], out[1])
    assert torch.equal(vmap(lambda k: pr.split(k, 3))(keys), torch.stack([pr.split(k, 3) for k in keys]))
    assert torch.equal(vmap(lambda k: pr.fold_in(k, 7))(keys), torch.stack([pr.fold_in(k, 7) for k in keys]))


def test_compiles_without_graph_breaks():
    k = pr.key(3)
    f = torch.compile(lambda k: pr.normal(k, (16,)) + pr.uniform(pr.fold_in(k, 1), (16,)), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(k), pr.normal(k, (16,)) + pr.uniform(pr.fold_in(k, 1), (16,)))


def test_bad_keys_and_arguments():
    with pytest.raises(TypeError, match="expected a random key"):
        pr.normal(torch.zeros(2), (3,))
    with pytest.raises(TypeError, match="expected a random key"):
        pr.split(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="seed must be an int"):
        pr.key(1.5)
    with pytest.raises(ValueError, match="lower < upper"):
        pr.truncated_normal(pr.key(0), (2,), 1.0, 1.0)
    with pytest.raises(ValueError, match="high - low"):
        pr.randint(pr.key(0), (2,), 3, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_same_numbers_on_gpu():
    k = pr.key(5)
    assert torch.equal(pr.bits(k, (1000,)), pr.bits(k.cuda(), (1000,)).cpu())
    torch.testing.assert_close(pr.normal(k, (1000,)), pr.normal(k.cuda(), (1000,)).cpu())


def test_extreme_bits_give_finite_normals(monkeypatch):
    # The largest and smallest 32-bit words must map strictly inside (0, 1): erfinv(+-1) = inf.
    for word in (0xFFFFFFFF, 0):
        monkeypatch.setattr(pr, "bits", lambda k, shape, w=word: torch.full(tuple(shape), w, dtype=torch.int64))
        z = pr.normal(pr.key(0), (4,))
        assert torch.isfinite(z).all() and 5.0 < z.abs().min() < 5.5
        t = pr.truncated_normal(pr.key(0), (4,), -2.0, 2.0)
        assert torch.isfinite(t).all() and t.abs().max() <= 2.0


def test_vmap_draws_per_example_only_with_split_keys():
    """README: under vmap, mapped split keys give each example its own draw; a closed-over key does not."""
    from polymodal.core.layers.dropout import dropout

    x = torch.ones(4, 64)
    k = pr.key(3)
    same = torch.func.vmap(lambda xi: dropout(xi, 0.5, key=k))(x)
    assert all(torch.equal(same[0], row) for row in same)
    own = torch.func.vmap(lambda xi, ki: dropout(xi, 0.5, key=ki))(x, pr.split(k, 4))
    assert not all(torch.equal(own[0], row) for row in own)
