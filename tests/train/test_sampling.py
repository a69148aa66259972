"""Poisson batch sampling and bucket padding."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from polymodal.core import random as pr
from polymodal.train.dp import sampling
from polymodal.train.dp.sampling import BucketCollate, PoissonBatchSampler, pad_indices, pad_to_bucket


def test_empirical_inclusion_rate_is_sample_rate():
    n, q, steps = 2000, 0.1, 400
    sampler = PoissonBatchSampler(n, q, steps, key=pr.key(7))
    counts = torch.stack([sampler.mask(s) for s in range(steps)]).sum(0).double()  # per example, ~ Binomial(400, 0.1)
    mean, var = steps * q, steps * q * (1 - q)
    # the overall rate: n * steps draws, 5 standard errors
    assert abs(counts.mean().item() - mean) < 5 * math.sqrt(var / n)
    # every example has the same rate: the spread across examples is binomial, not wider
    assert counts.var().item() == pytest.approx(var, rel=0.15)
    # batch sizes ~ Binomial(n, q)
    sizes = torch.tensor([len(b) for b in sampler], dtype=torch.float64)
    assert abs(sizes.mean().item() - n * q) < 5 * math.sqrt(n * q * (1 - q) / steps)
    assert sizes.var().item() == pytest.approx(n * q * (1 - q), rel=0.25)


def test_steps_are_independent():
    sampler = PoissonBatchSampler(5000, 0.3, 2, key=pr.key(3))
    a, b = sampler.mask(0).double(), sampler.mask(1).double()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert abs(corr) < 5 / math.sqrt(5000)
    # neighbouring examples within a step are independent too
    corr_shift = torch.corrcoef(torch.stack([a[:-1], a[1:]]))[0, 1].item()
    assert abs(corr_shift) < 5 / math.sqrt(5000)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**63 - 1), st.integers(1, 300), st.floats(1e-3, 1.0), st.integers(0, 5))
def test_deterministic_per_key_sorted_unique_in_range(seed, n, q, steps):
    before = torch.get_rng_state()
    a = list(PoissonBatchSampler(n, q, steps, key=pr.key(seed)))
    b = list(PoissonBatchSampler(n, q, steps, key=pr.key(seed)))
    assert a == b and len(a) == steps
    for batch in a:
        assert batch == sorted(set(batch))
        assert all(0 <= i < n for i in batch)
    assert torch.equal(torch.get_rng_state(), before)


def test_different_keys_differ_and_resume_continues_the_sequence():
    a = PoissonBatchSampler(1000, 0.1, 6, key=pr.key(0))
    b = PoissonBatchSampler(1000, 0.1, 6, key=pr.key(1))
    assert list(a) != list(b)
    resumed = PoissonBatchSampler(1000, 0.1, 6, key=pr.key(0), start_step=4)
    assert len(resumed) == 2 and list(resumed) == list(a)[4:] == [a.batch(4), a.batch(5)]


def test_rate_one_takes_everything_and_tiny_rate_is_mostly_empty():
    assert list(PoissonBatchSampler(17, 1.0, 2, key=pr.key(0))) == [list(range(17))] * 2
    sizes = [len(b) for b in PoissonBatchSampler(100, 1e-4, 50, key=pr.key(0))]
    assert sum(sizes) <= 5


def test_large_data_sets_are_drawn_in_chunks():
    n = sampling._CHUNK + 1000
    sampler = PoissonBatchSampler(n, 0.01, 1, key=pr.key(2))
    mask = sampler.mask(0)
    assert mask.shape == (n,)
    tail = mask[sampling._CHUNK :].sum().item()  # the second chunk is sampled too
    assert 0 < tail < 40
    assert abs(mask.sum().item() - 0.01 * n) < 5 * math.sqrt(0.01 * n)


@given(st.integers(0, 500), st.lists(st.integers(1, 64), min_size=1, max_size=4))
def test_pad_to_bucket_is_the_smallest_allowed_size(size, buckets):
    padded = pad_to_bucket(size, buckets)
    top = max(buckets)
    assert padded >= size
    if size <= top:
        assert padded in buckets and all(b < size for b in buckets if b < padded)
    else:
        assert padded % top == 0 and padded - size < top


@given(st.lists(st.integers(0, 99), max_size=40), st.lists(st.integers(1, 16), min_size=1, max_size=3))
def test_pad_indices_mask_marks_the_real_examples(indices, buckets):
    padded, mask = pad_indices(indices, buckets, fill_index=5)
    assert len(padded) == len(mask) == pad_to_bucket(len(indices), buckets)
    assert mask.dtype == torch.bool and mask.sum().item() == len(indices)
    assert mask[: len(indices)].all() and not mask[len(indices) :].any()
    assert padded[: len(indices)] == indices and set(padded[len(indices) :]) <= {5}


def test_dataloader_with_buckets_and_masked_loss_gradients():
    n, q = 200, 0.05
    x = torch.linspace(-1, 1, n * 3).reshape(n, 3)
    y = torch.arange(n, dtype=torch.float32) / n
    dataset = TensorDataset(x, y)
    sampler = PoissonBatchSampler(n, q, 30, key=pr.key(11))
    buckets = (4, 8, 16)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=BucketCollate(buckets, fill=dataset[0]))
    w = torch.tensor([0.5, -1.0, 2.0])

    def example_loss(w, xi, yi):
        return (xi @ w - yi) ** 2

    for (xb, yb), mask in loader:
        assert xb.shape[0] in buckets or xb.shape[0] % 16 == 0
        real = int(mask.sum())
        # the masked sum equals the loss of the real examples only
        per_example = vmap(example_loss, in_dims=(None, 0, 0))(w, xb, yb)
        assert torch.allclose((per_example * mask).sum(), per_example[:real].sum())
        # per-example gradients of the masked loss are exactly zero on the filler rows
        masked = grad(lambda w, xi, yi, mi: example_loss(w, xi, yi) * mi)
        g = vmap(masked, in_dims=(None, 0, 0, 0))(w, xb, yb, mask.float())
        assert torch.equal(g[real:], torch.zeros_like(g[real:]))
        assert g.shape == (xb.shape[0], 3)


def test_empty_batch_is_all_padding():
    collate = BucketCollate((2, 4), fill=(torch.zeros(3), torch.tensor(0.0)))
    (xb, yb), mask = collate([])
    assert xb.shape == (2, 3) and yb.shape == (2,) and not mask.any()


@pytest.mark.parametrize(
    "args,kwargs,error,match",
    [
        ((0, 0.1, 3), {}, ValueError, r"num_samples must be >= 1, got 0"),
        ((10, 0.0, 3), {}, ValueError, r"sample_rate must be in \(0, 1\], got 0.0"),
        ((10, 1.5, 3), {}, ValueError, r"sample_rate must be in \(0, 1\], got 1.5"),
        ((10, 0.1, -1), {}, ValueError, r"steps must be >= 0, got -1"),
        ((10.0, 0.1, 3), {}, TypeError, r"num_samples must be an int, got float 10.0"),
        ((10, 0.1, 3), {"start_step": -2}, ValueError, r"start_step must be >= 0, got -2"),
    ],
)
def test_sampler_rejects_bad_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=f"PoissonBatchSampler: {match}"):
        PoissonBatchSampler(*args, key=pr.key(0), **kwargs)


def test_bad_keys_and_buckets():
    with pytest.raises(TypeError, match=r"key must be a random key .* got int"):
        PoissonBatchSampler(10, 0.1, 3, key=0)
    with pytest.raises(ValueError, match=r"pad_to_bucket: buckets must be .* ints >= 1, got \[8, 0\]"):
        pad_to_bucket(3, [8, 0])
    with pytest.raises(ValueError, match=r"buckets must be a non-empty sequence of ints >= 1, got \(\)"):
        BucketCollate((), fill=None)
    with pytest.raises(ValueError, match=r"pad_to_bucket: batch_size must be >= 0, got -1"):
        pad_to_bucket(-1, (4,))
