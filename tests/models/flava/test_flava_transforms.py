"""FLAVA's transforms: BEiT block masking (keyed; TorchMultimodal's generator's mask-size statistics), MLM
masking (15%, 80/10/10), ITM negatives, the image transform (sizes, ranges, keyed crops)."""

import random

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

from polymodal.core import random as pr
from polymodal.models.flava.transforms import FLAVAImageTransform, block_mask, itm_negatives, map_pixels, mlm_mask


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(4, 90))
def test_block_mask_keyed_and_bounded(seed, n):
    a = block_mask(pr.key(seed), 14, n)
    assert torch.equal(a, block_mask(pr.key(seed), 14, n))  # same key, same mask
    assert a.shape == (14, 14) and a.dtype == torch.bool
    # At most n patches; no lower bound holds: a rectangle of area ~16 rounds to e.g. 3 x 5 = 15.
    assert int(a.sum()) <= n
    assert torch.equal(a, _reference_fed(seed, n))


def _reference_fed(seed: int, n: int) -> torch.Tensor:
    """TorchMultimodal's ImageMaskingGenerator(14, n, 16) with its ``random`` draws replaced by our key's
    uniforms: attempt i reads row i of the same (64, 4) tables block_mask draws (area, aspect, top, left)."""
    mod = pytest.importorskip("torchmultimodal.transforms.flava_transform")
    rows = []

    def row(i):
        while len(rows) <= i:
            rows.extend(pr.uniform(pr.fold_in(pr.key(seed), len(rows) // 64), (64, 4), dtype=torch.float64).tolist())
        return rows[i]

    state = {"attempt": -1, "u": 0, "r": 0}

    class Fed:
        @staticmethod
        def uniform(a, b):
            if state["u"] % 2 == 0:
                state["attempt"] += 1
            u = row(state["attempt"])[state["u"] % 2]
            state["u"] += 1
            return a + (b - a) * u

        @staticmethod
        def randint(a, b):
            u = row(state["attempt"])[2 + state["r"] % 2]
            state["r"] += 1
            return a + min(int(u * (b - a + 1)), b - a)

    saved = mod.random
    mod.random = Fed
    try:
        state["r"] = 0
        out = mod.ImageMaskingGenerator(14, n, 16)()
    finally:
        mod.random = saved
    return torch.from_numpy(out).bool()


def test_block_mask_statistics_match_the_reference():
    gen = pytest.importorskip("torchmultimodal.transforms.flava_transform").ImageMaskingGenerator(14, 75, 16)
    random.seed(0)
    ref = torch.tensor([float(gen().sum()) for _ in range(300)])
    ours = torch.tensor([float(block_mask(pr.key(i), 14, 75).sum()) for i in range(300)])
    assert abs(ours.mean() - ref.mean()) < 2.0, (ours.mean(), ref.mean())  # ~73 of 196 patches masked
    assert abs(ours.std() - ref.std()) < 2.0, (ours.std(), ref.std())
    assert len({tuple(block_mask(pr.key(i), 14, 75).flatten().tolist()) for i in range(20)}) == 20


def test_mlm_mask_proportions():
    ids = torch.randint(5, 1000, (200, 100), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[:, -1] = 2, 3
    masked, labels = mlm_mask(pr.key(0), ids, mask_id=4, vocab_size=1000, special_ids=[0, 1, 2, 3, 4])
    chosen = labels != -1
    assert not chosen[:, 0].any() and not chosen[:, -1].any()  # specials never chosen
    assert torch.equal(labels[chosen], ids[chosen])
    rate = chosen[:, 1:-1].float().mean()
    assert abs(rate - 0.15) < 0.01
    as_mask = (masked[chosen] == 4).float().mean()
    kept = (masked[chosen] == ids[chosen]).float().mean()
    assert abs(as_mask - 0.8) < 0.03 and abs(kept - 0.1) < 0.03
    assert torch.equal(masked[~chosen], ids[~chosen])
    again = mlm_mask(pr.key(0), ids, mask_id=4, vocab_size=1000, special_ids=[0, 1, 2, 3, 4])
    assert torch.equal(again[0], masked)


def test_itm_negatives_come_from_another_group():
    groups = [i % 5 for i in range(64)]
    index, labels = itm_negatives(pr.key(0), 64, 0.5, groups)
    for i, (j, y) in enumerate(zip(index.tolist(), labels.tolist())):
        assert (y == 1) == (j == i)
        if y == 0:
            assert groups[j] != groups[i]
    assert 20 <= int((labels == 0).sum()) <= 44


def test_image_transform():
    img = torch.rand(3, 48, 40)
    t = FLAVAImageTransform(is_train=False, encoder_input_size=32, codebook_input_size=16, mask_window_size=4,
                            mask_num_patches=6, mask_min_patches=2)
    out = t(img, key=pr.key(0))
    want = TF.normalize(TF.resize(img, [32, 32], TF.InterpolationMode.BICUBIC, antialias=True).clamp(0, 1),
                        [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
    torch.testing.assert_close(out["image"], want)
    cb = out["image_for_codebook"]
    assert cb.shape == (3, 16, 16) and cb.min() >= 0.1 - 1e-6 and cb.max() <= 0.9 + 1e-6
    assert out["image_patches_mask"].shape == (4, 4)
    train = FLAVAImageTransform(encoder_input_size=32, codebook_input_size=16, mask_window_size=4,
                                mask_num_patches=6, mask_min_patches=2)
    a, b = train(img, key=pr.key(1)), train(img, key=pr.key(1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match=r"expected a float image \(3, H, W\), got torch.float32 \(1, 8, 8\)"):
        t(torch.rand(1, 8, 8), key=pr.key(0))
    torch.testing.assert_close(map_pixels(torch.tensor([0.0, 1.0])), torch.tensor([0.1, 0.9]))
