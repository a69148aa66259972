"""transformers' FLAVA (random init, small FlavaConfig): layouts load both ways exactly; FlavaModel's image,
text and multimodal outputs equal ours (its multimodal padding mask is polymodal's default)."""

import pytest
import torch

from polymodal.core.pytree import flatten
from polymodal.models.flava.hf import from_huggingface, to_huggingface

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _config():
    return transformers.FlavaConfig(text_config=dict(SMALL, vocab_size=50), image_config=dict(SMALL, image_size=32,
                                    patch_size=8, vocab_size=16), multimodal_config=dict(SMALL, num_hidden_layers=1),
                                    image_codebook_config=dict(hidden_size=8, vocab_size=16), projection_dim=24,
                                    hidden_size=32)


def test_flava_model_outputs_match():
    torch.manual_seed(0)
    ref = transformers.FlavaModel(_config()).eval()
    for p in ref.parameters():  # non-trivial weights everywhere (LayerNorms, biases, tokens)
        p.data.normal_(0, 0.3)
    spec, params = from_huggingface(ref.state_dict(), ref.config)
    assert to_huggingface(params, spec).keys() == ref.state_dict().keys()
    g = torch.Generator().manual_seed(1)
    image = torch.randn(3, 3, 32, 32, generator=g)
    text = torch.randint(4, 50, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    with torch.no_grad():
        want = ref(input_ids=text, pixel_values=image, attention_mask=mask)
    out = spec(params, image, text, skip_unmasked_mm_encoder=False, text_attention_mask=mask)
    torch.testing.assert_close(out.image.last_hidden_state, want.image_embeddings, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.text.last_hidden_state, want.text_embeddings, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.multimodal.last_hidden_state, want.multimodal_embeddings, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.image.pooler_output, want.image_output.pooler_output, atol=1e-5, rtol=1e-5)


def test_flava_for_pretraining_layout_round_trip():
    torch.manual_seed(0)
    ref = transformers.FlavaForPreTraining(_config())
    sd = ref.state_dict()
    spec, params = from_huggingface(sd, ref.config)
    back = to_huggingface(params, spec)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert spec.loss.layer_norm_eps == 1e-12 and spec.image_codebook.grid == 4
    assert sum(v.numel() for v in flatten(params).values()) == sum(p.numel() for p in ref.parameters())
    # the dVAE encoders compute the same logits
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = ref.image_codebook.blocks(x)
    torch.testing.assert_close(spec.image_codebook(params["image_codebook"], x), want, atol=1e-5, rtol=1e-5)
