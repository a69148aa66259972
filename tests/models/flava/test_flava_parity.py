"""Parity with TorchMultimodal's FLAVA (randomly initialised, small widths, the reference's classes and
builder arguments): same outputs, losses and gradients from the same weights and batch; the state-dict
round trip is exact; the fixed padding mask differs from the reference only where padding is attended."""

import pytest
import torch

from polymodal.core import random as pr
from polymodal.core.pytree import flatten, unflatten
from polymodal.models.flava import flava_model, flava_model_for_classification, flava_model_for_pretraining
from polymodal.models.flava.convert import from_torchmultimodal, to_torchmultimodal
from tests.checks import assert_reference_grads, randomize

tmm_flava = pytest.importorskip("torchmultimodal.models.flava.model")
from torchmultimodal.modules.losses.flava import FLAVAPretrainingLoss as TMMLoss  # noqa: E402

KW = dict(image_hidden_size=32, image_num_attention_heads=2, image_num_hidden_layers=2, image_intermediate_size=64,
          image_size=32, patch_size=8, text_hidden_size=32, text_num_attention_heads=2, text_num_hidden_layers=2,
          text_intermediate_size=64, vocab_size=50, multimodal_hidden_size=32, multimodal_num_attention_heads=2,
          multimodal_num_hidden_layers=1, multimodal_intermediate_size=64, text_and_image_proj_size=24)
B, T, N = 4, 10, 16


def _tmm_pretraining():
    torch.manual_seed(0)
    vae = tmm_flava.DalleVAEEncoder(image_size=32, pretrained=False)
    vae.encoder = tmm_flava.DalleEncoder(n_hid=8, vocab_size=16)
    return tmm_flava.FLAVAForPreTraining(tmm_flava.flava_model(**KW), vae,
                                         TMMLoss(hidden_size=32, text_vocab_size=50, image_vocab_size=16)).eval()


def _batch():
    g = torch.Generator().manual_seed(0)
    text = torch.randint(4, 50, (B, T), generator=g)
    text[:, 0] = 2
    lengths = torch.tensor([10, 6, 8, 4])
    text = text.masked_fill(torch.arange(T) >= lengths[:, None], 0)
    masked = torch.rand(B, T, generator=g) < 0.3
    masked &= (text != 0) & (torch.arange(T) > 0)
    masked[:, 1] = True
    return dict(image=torch.randn(B, 3, 32, 32, generator=g), text=text,
                image_for_codebook=torch.rand(B, 3, 32, 32, generator=g),
                image_patches_mask=torch.rand(B, N, generator=g) < 0.4,
                text_masked=text.masked_fill(masked, 3), mlm_labels=torch.where(masked, text, -1),
                itm_labels=torch.tensor([1, 0, 1, 1]))


@pytest.fixture(scope="module")
def pretraining():
    spec = flava_model_for_pretraining(codebook_image_size=32, codebook_n_hid=8, image_vocab_size=16,
                                       mask_text_padding_in_mm=False, **KW)
    params = randomize(spec.init(key=pr.key(0)), 1)
    ref = _tmm_pretraining()
    ref.load_state_dict(to_torchmultimodal(params, spec), strict=True)
    return spec, params, ref


def _ours_loss(spec, params, batch, **kw):
    return spec(params, **batch, **kw)


def test_pretraining_losses_outputs_and_gradients(pretraining):
    spec, params, ref = pretraining
    batch = _batch()
    out_ref = ref(**batch, skip_unmasked_mm_encoder=False)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in flatten(params).items()}
    out = spec(unflatten(leaves), **batch, skip_unmasked_mm_encoder=False)
    terms = out.losses.terms()
    assert sorted(terms) == ["global_contrastive_loss", "itm_loss", "mmm_image_loss", "mmm_text_loss"]
    for name, value in terms.items():
        torch.testing.assert_close(value, getattr(out_ref.losses, name), atol=1e-5, rtol=1e-5, msg=name)
    torch.testing.assert_close(out.losses.itm_logits, out_ref.itm_output.logits, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        m = ref.model(image=batch["image"], text=batch["text"], image_patches_mask=batch["image_patches_mask"],
                      text_masked=batch["text_masked"], skip_unmasked_mm_encoder=False)
    for f in ("image", "image_masked", "text", "text_masked", "multimodal", "multimodal_masked"):
        ours, theirs = getattr(out.model, f), getattr(m, f)
        torch.testing.assert_close(ours.last_hidden_state, theirs.last_hidden_state, atol=1e-5, rtol=1e-5, msg=f)
        torch.testing.assert_close(ours.pooler_output, theirs.pooler_output, atol=1e-5, rtol=1e-5, msg=f)
        # the last block outputs before the LayerNorm (unnormalised: relative tolerance 1e-4)
        torch.testing.assert_close(ours.hidden_states[-1], theirs.hidden_states[-1], atol=1e-5, rtol=1e-4, msg=f)
    for f in ("projected_image_embeddings", "projected_text_embeddings"):
        torch.testing.assert_close(getattr(out.model, f), getattr(m, f), atol=1e-5, rtol=1e-5, msg=f)
    sum(terms.values()).backward()
    sum(v for v in vars(out_ref.losses).values() if v is not None).backward()
    checked = assert_reference_grads(leaves, ref, lambda g: to_torchmultimodal(g, spec))
    assert checked > 60  # the encoders, projections and heads all receive gradients


def test_unimodal_mlm_and_mim(pretraining):
    spec, params, ref = pretraining
    b = _batch()
    img = dict(image=b["image"], image_for_codebook=b["image_for_codebook"], image_patches_mask=b["image_patches_mask"])
    txt = dict(text=b["text"], text_masked=b["text_masked"], mlm_labels=b["mlm_labels"])
    for inputs, name, which in ((img, "mim_loss", "image"), (txt, "mlm_loss", "text")):
        want = getattr(ref(**inputs, required_embedding=which).losses, name)
        got = spec(params, **inputs, required_embedding=which).losses
        assert list(got.terms()) == [name]
        torch.testing.assert_close(got.total, want, atol=1e-5, rtol=1e-5, msg=name)


def test_vmap_compile_path_equals_eager(pretraining):
    """The transform-safe masked losses (ignore_index over every row) equal the eager row selection."""
    spec, params, _ = pretraining
    batch = _batch()
    eager = spec(params, **batch).losses.total
    compiled = torch.compile(lambda p, b: spec(p, **b).losses.total, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(params, batch), eager, atol=1e-5, rtol=1e-5)


def test_classification_matches_reference():
    spec = flava_model_for_classification(5, classifier_in_dim=32, classifier_hidden_sizes=32,
                                          mask_text_padding_in_mm=False, **KW)
    params = randomize(spec.init(key=pr.key(2)), 3)
    ref = tmm_flava.flava_model_for_classification(5, classifier_in_dim=32, classifier_hidden_sizes=32,
                                                    pretrained=False, **KW).eval()
    ref.load_state_dict(to_torchmultimodal(params, spec), strict=True)
    b = _batch()
    labels = torch.tensor([0, 3, 1, 4])
    for which in (None, "image", "text"):
        out_ref = ref(image=b["image"], text=b["text"], required_embedding=which, labels=labels)
        torch.testing.assert_close(spec(params, b["image"], b["text"], which), out_ref.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(spec.loss(params, labels, b["image"], b["text"], which), out_ref.loss,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("build", ["model", "pretraining", "classification"])
def test_round_trip_is_exact(build):
    spec = {"model": lambda: flava_model(**KW),
            "pretraining": lambda: flava_model_for_pretraining(codebook_image_size=32, codebook_n_hid=8,
                                                               image_vocab_size=16, **KW),
            "classification": lambda: flava_model_for_classification(5, classifier_in_dim=32,
                                                                     classifier_hidden_sizes=32, **KW)}[build]()
    params = randomize(spec.init(key=pr.key(4)), 5)
    sd = to_torchmultimodal(params, spec)
    back = from_torchmultimodal(sd, spec)
    a, b = flatten(params), flatten(back)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert to_torchmultimodal(back, spec).keys() == sd.keys()


def test_reference_state_dict_loads():
    ref = _tmm_pretraining()
    spec = flava_model_for_pretraining(codebook_image_size=32, codebook_n_hid=8, image_vocab_size=16, **KW)
    params = from_torchmultimodal(ref.state_dict(), spec)
    sd = to_torchmultimodal(params, spec)
    assert all(torch.equal(sd[k], v) for k, v in ref.state_dict().items())
    bad = dict(ref.state_dict())
    bad.pop("model.mm_encoder.cls_token")
    bad["model.text_projection.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"missing keys \(1\): model.mm_encoder.cls_token(.|\n)*"
                                         r"model.text_projection.weight: expected \(24, 32\), got \(3, 3\)"):
        from_torchmultimodal(bad, spec)


def test_fixed_padding_mask_ignores_padding():
    """Default (bug fixed): what sits at padded text positions does not change the multimodal states of the
    real positions; the reference's behaviour (mask_text_padding_in_mm=False) lets it leak in."""
    b = _batch()
    for fixed in (True, False):
        spec = flava_model(mask_text_padding_in_mm=fixed, **KW)
        params = randomize(spec.init(key=pr.key(6)), 7)
        img = torch.randn(B, 17, 32)
        txt = torch.randn(B, T, 32)
        valid = b["text"] != 0
        txt2 = torch.where(valid[..., None], txt, torch.randn(B, T, 32))
        h1 = spec.encode_mm(params, img, txt, valid).last_hidden_state
        h2 = spec.encode_mm(params, img, txt2, valid).last_hidden_state
        real = torch.cat([torch.ones(B, 18, dtype=torch.bool), valid], 1)
        same = torch.allclose(h1[real], h2[real], atol=1e-6)
        assert same == fixed
