"""FLAVA's zero-shot retrieval evaluation (``polymodal/models/flava/retrieval.py``): recall@k against hand-computed
examples, the retrieval set (unique captions, one per image, the synthetic data's own captions)."""

import pytest
import torch

from polymodal.data.synthetic import POSITIONS, SIZES, SyntheticCaptions
from polymodal.eval import recall_at_k
from polymodal.models.flava.retrieval import caption, retrieval_pairs, retrieval_recall


def test_recall_at_k_hand_computed():
    # images i0 = (1, 0), i1 = (0, 1), i2 = (0.8, 0.6); caption t_j belongs to image j:
    # t0 = (0.8, 0.6), t1 = (0, 1), t2 = (1, 0).  Similarities (rows images, columns captions):
    #   i0: 0.8  0.0  1.0   -> its t0 (0.8) is beaten by t2 (1.0): rank 1
    #   i1: 0.6  1.0  0.0   -> rank 0
    #   i2: 1.0  0.6  0.8   -> its t2 (0.8) is beaten by t0 (1.0): rank 1
    # caption queries (columns): t0's i0 (0.8) beaten by i2 (1.0): rank 1; t1: rank 0;
    # t2's i2 (0.8) beaten by i0: rank 1
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    txt = torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 0.0]])
    got = recall_at_k(img, txt, torch.arange(3), ks=(1, 2))
    assert got["image_to_text_R@1"] == pytest.approx(1 / 3) and got["text_to_image_R@1"] == pytest.approx(1 / 3)
    assert got["image_to_text_R@2"] == 1.0 and got["text_to_image_R@2"] == 1.0


def test_recall_at_k_ties_count_for_the_query():
    # two images with the same embedding (1, 0); captions t0 = (1, 0), t1 = (0, 1).
    # i0: t0 1 > t1 0: rank 0.  i1: its t1 (0) is beaten by t0 (1): rank 1.
    # t0: i0 and i1 tie at 1: rank 0 (nothing strictly better).  t1: both images 0, a tie: rank 0.
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    txt = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    got = recall_at_k(img, txt, torch.arange(2), ks=(1,))
    assert got["image_to_text_R@1"] == 0.5 and got["text_to_image_R@1"] == 1.0


def test_retrieval_pairs_are_unique_and_the_datasets_captions():
    seen = SyntheticCaptions("eval", size=1, image_size=32).pairs
    pairs = retrieval_pairs(seen, image_size=32)
    n = len(seen) * len(SIZES) * len(POSITIONS)
    assert n == 250 and pairs.images.shape == (n, 3, 32, 32) and len(set(pairs.captions)) == n
    assert len({tuple(a) for a in pairs.attributes}) == n
    # the caption is the data set's own for its attributes (template "a {size} {color} {shape} {where}")
    ds = SyntheticCaptions("eval", size=40, image_size=8, templates=("a {size} {color} {shape} {where}",))
    for it in ds.__getitems__(list(range(40))):
        a = it["attributes"]
        assert caption(a["shape"], a["color"], a["size"], a["position"]) == it["caption"]
    assert torch.equal(pairs.images, retrieval_pairs(seen, image_size=32).images)  # a function of the seed


def test_retrieval_recall_with_known_encoders():
    pairs = retrieval_pairs([("circle", "red"), ("square", "blue")], image_size=16)
    n = len(pairs.captions)  # 20
    index = {c: i for i, c in enumerate(pairs.captions)}
    eye = torch.eye(n)
    image_rows = iter(range(n))
    encode_image = lambda x: eye[[next(image_rows) for _ in range(len(x))]]  # noqa: E731  (in order: image i -> e_i)
    perfect = retrieval_recall(encode_image, lambda c: eye[[index[x] for x in c]], pairs, batch_size=7)
    assert all(v == 1.0 for v in perfect.values()) and len(perfect) == 6
    # captions embedded as their reversed position (caption i -> e_{n-1-i}): image i's caption is at the
    # image n-1-i's place, so no query is right at rank 0 (n even: no fixed point) and each finds its answer
    # at similarity 0, tied with n - 2 others and beaten by one: rank 1 -> R@1 = 0, R@5 = 1.
    image_rows = iter(range(n))
    shifted = retrieval_recall(encode_image, lambda c: eye[[n - 1 - index[x] for x in c]], pairs)
    assert shifted["image_to_text_R@1"] == 0.0 and shifted["text_to_image_R@1"] == 0.0
    assert shifted["image_to_text_R@5"] == 1.0 and shifted["text_to_image_R@5"] == 1.0


def test_retrieval_pairs_needs_a_pair():
    with pytest.raises(ValueError, match="at least one"):
        retrieval_pairs([], image_size=16)
