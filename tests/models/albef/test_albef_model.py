"""ALBEF specs: the generic checks, explicit state (momentum update, queue pointer), hard-negative
sampling, the training step under torch.compile, full-size parameter counts, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from checks import check_spec
from polymodal.core import pytree
from polymodal.core import random as pr
from polymodal.core.convert import meta_init
from polymodal.models.albef import (
    albef_retrieval, albef_tiny, albef_vqa, enqueue, init_queues, momentum_update, negative_weights, sample_negatives,
)

SPEC = albef_tiny(queue_size=8, vision_layers=1, text_layers=1, multimodal_layers=1)


def batch(b=2, t=5):
    images = pr.normal(pr.key(3), (b, 3, 32, 32))
    ids = pr.randint(pr.key(4), (b, t), 5, 60)
    ids[:, 0] = 2
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, 3:] = 0
    return images, ids * mask, mask


def test_model_generic_checks():
    params = SPEC.model.init(key=pr.key(0))
    check_spec(SPEC.model, params, batch(), compile=False)


def test_momentum_update_by_hand():
    m = {"a": torch.tensor([1.0, 2.0]), "b": [torch.tensor(4.0)]}
    p = {"a": torch.tensor([3.0, 2.0]), "b": [torch.tensor(0.0)]}
    out = momentum_update(m, p, 0.75)
    assert out["a"].tolist() == [1.5, 2.0] and float(out["b"][0]) == 3.0
    assert m["a"].tolist() == [1.0, 2.0]  # inputs untouched


def test_enqueue_wraps_and_never_mutates():
    s = init_queues(embed_size=2, queue_size=4, key=pr.key(0))
    before = {k: v.clone() for k, v in s.items()}
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    s1 = enqueue(s, f, f, torch.tensor([5, 6]))
    s2 = enqueue(s1, 2 * f, 3 * f, torch.tensor([7, 8]))
    s3 = enqueue(s2, 4 * f, 4 * f, torch.tensor([9, 10]))
    assert s1["queue_ptr"].tolist() == [2] and s2["queue_ptr"].tolist() == [0] and s3["queue_ptr"].tolist() == [2]
    assert s3["idx_queue"].tolist() == [[9, 10, 7, 8]]
    assert s3["image_queue"].T.tolist() == [[4, 0], [0, 4], [2, 0], [0, 2]]
    assert s2["text_queue"][:, 2:].T.tolist() == [[3, 0], [0, 3]]
    assert all(torch.equal(s[k], before[k]) for k in s)
    with pytest.raises(ValueError, match="queue_size 4 is not divisible by the global batch size 3"):
        enqueue(s, torch.ones(3, 2), torch.ones(3, 2), torch.arange(3))


@settings(max_examples=15, deadline=None)
@given(b=st.integers(2, 6), seed=st.integers(0, 1000), dup=st.booleans())
def test_sampled_negatives_are_never_positives(b, seed, dup):
    sim = pr.normal(pr.key(seed), (b, b + 3)) * 3
    idx = torch.arange(b) // 2 if dup else torch.arange(b)
    w = negative_weights(sim, idx)
    neg = sample_negatives(w, pr.key(seed + 1))
    if dup and b == 2:  # both share one id: the fallback is the other sample
        assert neg.tolist() == [1, 0]
    else:
        assert not bool((idx[neg] == idx).any())
    assert torch.equal(neg, sample_negatives(w, pr.key(seed + 1)))  # same key, same draw


def test_sampling_follows_the_weights():
    w = torch.tensor([[0.0, 0.9, 0.1], [0.5, 0.0, 0.5], [0.0, 1.0, 0.0]])
    draws = torch.stack([sample_negatives(w, pr.key(i)) for i in range(400)])
    assert (draws[:, 2] == 1).all() and (draws[:, 0] != 0).all() and (draws[:, 1] != 1).all()
    assert abs(float((draws[:, 0] == 1).float().mean()) - 0.9) < 0.06


def test_mlm_on_masked_rows_equals_the_full_head():
    # Eager steps run the MLM head on the masked positions only; the loss and every gradient must equal
    # the reference formula on the full (B, T, V) logits (ALBEF's BertForMaskedLM: CE + distillation).
    from polymodal.models.albef.losses import mlm_distill_loss

    params = SPEC.init(key=pr.key(0))
    state = SPEC.initial_state(params, key=pr.key(1))
    images, ids, mask = batch(4)
    labels = torch.full_like(ids, -100)
    labels[:, 1], labels[1, 2] = ids[:, 1], ids[1, 2]
    mlm_ids = ids.masked_fill(labels != -100, 4)
    leaves = {k: v.clone().requires_grad_() for k, v in pytree.flatten(params).items()}

    def fast(p):
        out, new = SPEC(p, images, ids, mask, torch.arange(4), state, key=pr.key(2), mlm_input_ids=mlm_ids,
                        mlm_labels=labels)
        return out.mlm_loss, new

    def full(p, mp):
        m = SPEC.model
        img, img_m = m.encode_image(p["model"], images), m.encode_image(mp["model"], images)
        logits = SPEC._mlm_logits(p, mlm_ids, mask, img, None)
        logits_m = SPEC._mlm_logits(mp, mlm_ids, mask, img_m, None).detach()
        assert logits.shape == (4, ids.shape[1], SPEC.mlm_head.vocab_size)
        return mlm_distill_loss(logits, labels, logits_m, 0.4)

    a, new = fast(pytree.unflatten(leaves))
    b = full(pytree.unflatten(leaves), new["momentum"])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    ga = torch.autograd.grad(a, list(leaves.values()), allow_unused=True)
    gb = torch.autograd.grad(b, list(leaves.values()), allow_unused=True)
    for k, x, y in zip(leaves, ga, gb):
        assert (x is None) == (y is None), k
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.slow  # ~25 s of compilation on a CPU
def test_training_step_compiles_fullgraph_and_matches_eager():
    params = SPEC.init(key=pr.key(0))
    state = SPEC.initial_state(params, key=pr.key(1))
    images, ids, mask = batch(4)
    mlm_labels = torch.full_like(ids, -100)
    mlm_labels[:, 1] = ids[:, 1]
    mlm_ids = ids.clone()
    mlm_ids[:, 1] = 4

    def step(p, s, key):
        out, new = SPEC(p, images, ids, mask, torch.arange(4), s, key=key, mlm_input_ids=mlm_ids, mlm_labels=mlm_labels)
        return out.loss, out.itm_logits, new

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a, b = step(params, state, pr.key(2)), compiled(params, state, pr.key(2))
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1], b[1])
    for k, v in pytree.flatten(a[2]).items():
        torch.testing.assert_close(pytree.flatten(b[2])[k], v)


def test_full_size_parameter_counts():
    # TorchMultimodal's retrieval model built on the meta device: 209,560,835 trainable parameters
    # (vision 85.8M at 384 px, text 6 BERT layers + embeddings, multimodal 6 layers, projections, ITM, temp)
    assert pytree.num_params(meta_init(albef_retrieval(mlm=False))) == 209_560_835
    spec = albef_vqa()
    assert spec.model.vision.embeddings.image_size == (384, 384) and spec.answer_decoder.encoder.num_layers == 6


def test_bad_input_is_named():
    params = SPEC.init(key=pr.key(0))
    state = SPEC.initial_state(params, key=pr.key(1))
    images, ids, mask = batch(3)
    with pytest.raises(ValueError, match="queue_size 8 is not divisible by the global batch size 3"):
        SPEC(params, images, ids, mask, torch.arange(3), state, key=pr.key(2))
    images, ids, mask = batch(2)
    with pytest.raises(ValueError, match=r"expected 2 texts \(one per image\)"):
        SPEC(params, images, ids[:1], mask[:1], torch.arange(2), state, key=pr.key(2))
    with pytest.raises(ValueError, match="expected 2 ids"):
        SPEC(params, images, ids, mask, torch.arange(3), state, key=pr.key(2))
    with pytest.raises(ValueError, match="pass key="):
        SPEC(params, images, ids, mask, torch.arange(2), state)
