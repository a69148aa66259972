"""FLAVA specs: shell == spec, grad == shell autograd, safetensors round trip; per-sample gradients through
the classifier equal a loop; required_embedding / skip flags; the dVAE against TorchMultimodal's; bad input."""

import pytest
import torch
import torch.nn.functional as F

from polymodal.core import random as pr
from polymodal.core.pytree import flatten
from polymodal.models.flava import (
    DalleEncoder, flava_tiny, flava_tiny_for_classification, flava_tiny_for_pretraining,
)
from polymodal.train.dp.per_sample import per_sample_grads
from tests.checks import check_grad, check_roundtrip, check_shell, randomize

MODEL = flava_tiny()
B = 3


def _inputs(b=B, t=6):
    g = torch.Generator().manual_seed(0)
    text = torch.randint(5, 64, (b, t), generator=g)
    text[:, 0] = 2
    text[1, 4:] = 0
    return torch.rand(b, 3, 32, 32, generator=g), text


@pytest.fixture(scope="module")
def params():
    return randomize(MODEL.init(key=pr.key(0)), 1)


def test_model_shell_grad_roundtrip(params):
    image, text = _inputs()
    kw = {"skip_unmasked_mm_encoder": False}
    check_shell(MODEL, params, (image, text), kw)
    check_grad(MODEL, params, (image, text), kw)
    check_roundtrip(MODEL, params, (image, text), kw)


def test_required_embedding_and_skip(params):
    image, text = _inputs()
    out = MODEL(params, image)
    assert out.text is None and out.multimodal_masked is None and out.projected_image_embeddings.shape == (B, 64)
    out = MODEL(params, text=text)
    assert out.image is None and out.text.last_hidden_state.shape == (B, 6, 64)
    out = MODEL(params, image, text, text_masked=text)
    assert out.multimodal is None and out.multimodal_masked.last_hidden_state.shape == (B, 1 + 65 + 6, 64)
    assert MODEL(params, image, text, required_embedding="image").text is None
    # masked towers without masks equal the unmasked ones; a patch mask changes the image states
    assert out.image_masked is out.image
    mask = torch.zeros(B, 64, dtype=torch.bool)
    mask[:, 3] = True
    masked = MODEL(params, image, image_patches_mask=mask).image_masked.last_hidden_state
    assert not torch.allclose(masked, out.image.last_hidden_state)


def test_dropout_keys(params):
    image, text = _inputs()
    spec = flava_tiny(image_dropout=0.1, text_dropout=0.1, multimodal_dropout=0.1)
    a = spec(params, image, text, text_masked=text, key=pr.key(1)).multimodal_masked.last_hidden_state
    b = spec(params, image, text, text_masked=text, key=pr.key(1)).multimodal_masked.last_hidden_state
    c = spec(params, image, text, text_masked=text, key=pr.key(2)).multimodal_masked.last_hidden_state
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_per_sample_gradients_through_the_classifier_equal_a_loop():
    spec = flava_tiny_for_classification(num_classes=4)
    params = randomize(spec.init(key=pr.key(2)), 3)
    image, text = _inputs()
    labels = torch.tensor([0, 3, 1])

    def loss_fn(p, b):
        return F.cross_entropy(spec(p, b["image"], b["text"]), b["labels"], reduction="none")

    batch = {"image": image, "text": text, "labels": labels}
    got = flatten(per_sample_grads(loss_fn, params, batch, method="vmap"))
    for i in range(B):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        want = flatten(torch.func.grad(lambda p: loss_fn(p, one).sum())(params))
        for k in want:
            torch.testing.assert_close(got[k][i], want[k], atol=1e-5, rtol=1e-4, msg=k)


def test_dvae_matches_torchmultimodal():
    tmm = pytest.importorskip("torchmultimodal.models.flava.model")
    torch.manual_seed(0)
    ref = tmm.DalleEncoder(n_hid=8, vocab_size=32).eval()
    spec = DalleEncoder(n_hid=8, vocab_size=32, image_size=32)
    from polymodal.models.flava.convert import from_dalle, to_dalle

    params = from_dalle(ref.state_dict(), spec)
    assert to_dalle(params, spec).keys() == ref.state_dict().keys()
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(spec(params, x), ref(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(spec.codebook_indices(params, x), ref(x).argmax(1))


def test_bad_input_names_expected_and_actual():
    spec = flava_tiny_for_pretraining()
    p = spec.init(key=pr.key(0))
    image, text = _inputs()
    m = spec.model
    with pytest.raises(ValueError, match=r"expected shape \(B, 3, 32, 32\), got \(3, 3, 24, 24\)"):
        m(p["model"], torch.rand(3, 3, 24, 24))
    with pytest.raises(ValueError, match=r"expected shape \(B, 3, 32, 32\), got \(3, 1, 32, 32\)"):
        m(p["model"], torch.rand(3, 1, 32, 32))
    with pytest.raises(ValueError, match=r"T <= 32 \(the position table's rows\), got \(3, 40\)"):
        m(p["model"], text=torch.ones(3, 40, dtype=torch.long))
    with pytest.raises(ValueError, match=r"image_patches_mask: expected shape \(3, 64\), got \(3, 65\)"):
        m(p["model"], image, image_patches_mask=torch.zeros(3, 65, dtype=torch.bool))
    cb = torch.rand(3, 3, 64, 64)
    with pytest.raises(ValueError, match=r"expected 64 patches per image \(shape \(3, 64\)\), got shape \(3, 5\)"):
        spec(p, image, image_for_codebook=cb, image_patches_mask=torch.zeros(3, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"DalleEncoder: images: expected shape \(B, 3, 64, 64\), got \(3, 3, 32, 32\)"):
        spec(p, image, image_for_codebook=image, image_patches_mask=torch.zeros(3, 64).bool())
    with pytest.raises(ValueError, match="required_embedding: expected one of"):
        m(p["model"], image, required_embedding="video")
    mask = torch.zeros(3, 64).bool()
    with pytest.raises(ValueError, match=r"image_codes: expected integer codes of shape \(B, 64\), got torch.float32 \(3, 64\)"):
        spec(p, image, image_codes=torch.zeros(3, 64), image_patches_mask=mask)
    with pytest.raises(ValueError, match=r"image_codes: expected integer codes of shape \(B, 64\), got torch.int64 \(3, 8, 8\)"):
        spec(p, image, image_codes=torch.zeros(3, 8, 8, dtype=torch.long), image_patches_mask=mask)
    codes = spec.image_codes(p, cb)  # precomputed codes give the same MIM targets as the image
    assert torch.equal(spec(p, image, image_codes=codes, image_patches_mask=mask | True).mim_labels,
                       spec(p, image, image_for_codebook=cb, image_patches_mask=mask | True).mim_labels)


def test_block_stacks_declared_equal_what_runs():
    from polymodal.core.layers.seam import record_stacks

    spec = flava_tiny_for_pretraining()
    p = spec.init(key=pr.key(0))
    image, text = _inputs()
    ran = record_stacks(lambda q: spec(q, image, text, text_masked=text, skip_unmasked_mm_encoder=False), p)
    assert sorted(set(ran)) == sorted(spec.block_stacks()) == [
        "model.image_encoder.transformer.layers", "model.mm_encoder.encoder.layers", "model.text_encoder.encoder.layers"]


def test_masked_losses_without_a_masked_position_are_zero_not_nan():
    """MLM over a batch whose masking drew no token: 0 with finite gradients (the reference's mean over no
    position is NaN), eager and under vmap-style full-sequence evaluation; with labels, the mean as before."""
    from polymodal.models.flava.heads import MaskedPredictionHead, masked_prediction_loss

    head = MaskedPredictionHead(16, 10)
    p = head.init(key=pr.key(0))
    hidden = torch.randn(2, 5, 16, requires_grad=True)
    none = torch.full((2, 5), -1)
    loss = masked_prediction_loss(head, p, hidden, none)
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(hidden.grad).all()
    labels = none.clone()
    labels[0, 1], labels[1, 3] = 4, 7
    want = torch.nn.functional.cross_entropy(head(p, hidden)[labels != -1], labels[labels != -1])
    torch.testing.assert_close(masked_prediction_loss(head, p, hidden, labels), want)
    per_example = torch.func.vmap(lambda h, y: masked_prediction_loss(head, p, h, y))(hidden, none)
    assert torch.equal(per_example, torch.zeros(2))
