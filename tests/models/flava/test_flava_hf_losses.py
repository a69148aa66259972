"""Pretraining losses and gradients against ``transformers``' ``FlavaForPreTraining`` (random init, a small
``FlavaConfig`` with non-default loss weights), its weights loaded with ``from_huggingface``: on the same batch
and masks, every loss term (MIM and MLM on unimodal batches; ITM, MMM-image, MMM-text and the global
contrastive loss on a paired batch with an ITM negative), the ITM and contrastive logits, the MIM targets and
the gradient of the summed totals w.r.t. every parameter (mapped back with ``to_huggingface``) agree.

Conventions (read from ``transformers/models/flava/modeling_flava.py``, v5): unmasked positions are labelled
``ce_ignore_index`` (-100; ``config_from_huggingface`` sets the loss's ``ignore_index`` to it), padding needs
``attention_mask`` (passed to both), and ``logit_scale`` is clamped to [0, 4.6052] in place only in training
mode: ours clamps in every mode with the same straight-through gradient, so the paired batch runs the
reference in training mode (dropout is 0) with ``logit_scale`` = 5 to check the clamp.
"""

import pytest
import torch

from polymodal.core.pytree import flatten, unflatten
from polymodal.models.flava.hf import config_from_huggingface, from_huggingface, to_huggingface
from tests.checks import assert_reference_grads

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
WEIGHTS = dict(mim_weight=0.7, mlm_weight=0.8, itm_weight=1.3, global_contrastive_weight=0.9,
               mmm_image_weight=1.1, mmm_text_weight=0.6)
B, T, N, IG = 4, 8, 16, -100
# transformers' FlavaLosses field -> ours
TERMS = {"mim": "mim_loss", "mlm": "mlm_loss", "itm": "itm_loss", "global_contrastive": "global_contrastive_loss",
         "mmm_image": "mmm_image_loss", "mmm_text": "mmm_text_loss"}


def _config(**kw):
    return transformers.FlavaConfig(text_config=dict(SMALL, vocab_size=50), image_config=dict(SMALL, image_size=32,
                                    patch_size=8, vocab_size=16), multimodal_config=dict(SMALL, num_hidden_layers=1),
                                    image_codebook_config=dict(hidden_size=8, vocab_size=16), projection_dim=24,
                                    hidden_size=32, **(WEIGHTS | kw))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ref = transformers.FlavaForPreTraining(_config())
    with torch.no_grad():
        for p in ref.parameters():  # non-trivial weights everywhere (LayerNorms, biases, tokens, heads, dVAE)
            p.normal_(0, 0.3)
        ref.flava.logit_scale.fill_(5.0)  # above the clamp (4.6052)
    spec, params = from_huggingface(ref.state_dict(), ref.config)
    return ref, spec, params


def _batch():
    g = torch.Generator().manual_seed(1)
    text = torch.randint(4, 50, (B, T), generator=g)
    text[:, 0] = 2
    text = text.masked_fill(torch.arange(T) >= torch.tensor([8, 5, 7, 3])[:, None], 0)
    masked = (torch.rand(B, T, generator=g) < 0.3) & (text != 0) & (torch.arange(T) > 0)
    masked[:, 1] = True
    patches = torch.rand(B, N, generator=g) < 0.4
    patches[:, 0] = True
    return dict(image=torch.randn(B, 3, 32, 32, generator=g), text=text, text_masked=text.masked_fill(masked, 3),
                mlm_labels=torch.where(masked, text, IG), image_patches_mask=patches,
                image_for_codebook=torch.rand(B, 3, 32, 32, generator=g) * 0.8 + 0.1,
                attention_mask=(text != 0).long())


def _theirs(ref, b, which, **kw):
    """transformers' forward on the batch's image-only / text-only / paired part."""
    img = dict(pixel_values=b["image"], bool_masked_pos=b["image_patches_mask"],
               codebook_pixel_values=b["image_for_codebook"])
    txt = dict(input_ids=b["text"], input_ids_masked=b["text_masked"], attention_mask=b["attention_mask"],
               mlm_labels=b["mlm_labels"].clone())  # it writes into labels it is given
    return ref(**{"image": img, "text": txt, "paired": img | txt}[which], **kw)


def _ours(spec, params, b, which, **kw):
    img = {k: b[k] for k in ("image", "image_for_codebook", "image_patches_mask")}
    txt = dict(text=b["text"], text_masked=b["text_masked"], mlm_labels=b["mlm_labels"],
               text_attention_mask=b["attention_mask"])
    return spec(params, **{"image": img, "text": txt, "paired": img | txt}[which], **kw)


def _check_terms(out, want, names):
    got = out.losses.terms()
    assert sorted(got) == sorted(TERMS[n] for n in names)
    for n in names:
        torch.testing.assert_close(got[TERMS[n]], getattr(want.loss_info, n), atol=1e-5, rtol=1e-5, msg=n)
    torch.testing.assert_close(out.losses.total, want.loss, atol=1e-5, rtol=1e-5)


def test_losses_and_gradients_match_transformers(models):
    ref, spec, params = models
    b, itm = _batch(), torch.tensor([1, 0, 1, 1])
    leaves = {k: v.detach().clone().requires_grad_() for k, v in flatten(params).items()}
    p = unflatten(leaves)
    ref.eval()
    want_img, want_txt = _theirs(ref, b, "image"), _theirs(ref, b, "text")
    ref.train()  # the in-place logit_scale clamp of its training mode
    want = _theirs(ref, b, "paired", itm_labels=itm)
    ref.eval()
    assert ref.flava.logit_scale.item() == pytest.approx(4.6052)
    got_img, got_txt = _ours(spec, p, b, "image"), _ours(spec, p, b, "text")
    got = _ours(spec, p, b, "paired", itm_labels=itm)
    _check_terms(got_img, want_img, ["mim"])
    _check_terms(got_txt, want_txt, ["mlm"])
    _check_terms(got, want, ["itm", "mmm_image", "mmm_text", "global_contrastive"])
    # MIM targets: the dVAE's codes at the masked patches
    codes = ref.image_codebook.get_codebook_indices(b["image_for_codebook"]).flatten(1)
    assert torch.equal(got.mim_labels, codes.masked_fill(~b["image_patches_mask"], IG))
    # logits: ITM over every pair, contrastive over the matched rows (ITM negatives stay as columns)
    torch.testing.assert_close(got.losses.itm_logits, want.itm_logits, atol=1e-5, rtol=1e-5)
    pos = itm.bool()
    c = got.losses.contrastive
    torch.testing.assert_close(c.logits_a[pos], want.contrastive_logits_per_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c.logits_b[pos], want.contrastive_logits_per_text, atol=1e-5, rtol=1e-5)
    # gradients of the three batches' summed totals, for every parameter
    (want_img.loss + want_txt.loss + want.loss).backward()
    (got_img.losses.total + got_txt.losses.total + got.losses.total).backward()
    nonzero = assert_reference_grads(leaves, ref, lambda g: to_huggingface(g, spec), rtol=1e-5)
    assert nonzero > 100 and ref.flava.logit_scale.grad.abs() > 0  # towers, projections, all six heads
    ref.zero_grad(set_to_none=True)


def test_no_matched_pair_and_unmasked_mm_encoder(models):
    """All pairs ITM negatives: the MMM and contrastive losses use every row (both libraries' rule);
    ``skip_unmasked_mm_encoder=False``: the unmasked multimodal states agree too."""
    ref, spec, params = models
    b, itm = _batch(), torch.zeros(B, dtype=torch.long)
    with torch.no_grad():
        ref.train()
        want = _theirs(ref, b, "paired", itm_labels=itm, skip_unmasked_multimodal_encoder=False)
        ref.eval()
        got = _ours(spec, params, b, "paired", itm_labels=itm, skip_unmasked_mm_encoder=False)
    _check_terms(got, want, ["itm", "mmm_image", "mmm_text", "global_contrastive"])
    torch.testing.assert_close(got.model.multimodal.last_hidden_state, want.multimodal_embeddings,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.model.multimodal_masked.last_hidden_state, want.multimodal_masked_embeddings,
                               atol=1e-5, rtol=1e-5)


def test_config_carries_loss_settings_and_rejects_unmatched_heads():
    loss = config_from_huggingface(_config(ce_ignore_index=-7), pretraining=True).loss
    assert loss.ignore_index == -7 and (loss.mim_weight, loss.mlm_weight, loss.itm_loss_weight) == (0.7, 0.8, 1.3)
    assert (loss.contrastive_loss_weight, loss.mmm_image_loss_weight, loss.mmm_text_loss_weight) == (0.9, 1.1, 0.6)
    bad = _config()
    bad.image_config.hidden_size = 48
    with pytest.raises(ValueError, match=r"one width.*'image_config': 48"):
        config_from_huggingface(bad, pretraining=True)
    bad = _config()
    bad.text_config.hidden_act = "gelu_new"
    with pytest.raises(ValueError, match=r"GELU.*'gelu_new' and 'gelu'"):
        config_from_huggingface(bad, pretraining=True)
