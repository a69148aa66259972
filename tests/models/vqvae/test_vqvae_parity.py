"""Video VQ-VAE parity with TorchMultimodal (``models/video_gpt``), converters, reference configurations.

Reference: TorchMultimodal's ``video_gpt.model.video_vqvae`` (installed) and MUGEN's
``examples/mugen/generation/video_vqvae.py:video_vqvae_mugen`` (not installed: composed below from
the installed ``VideoEncoder`` / ``VideoDecoder`` / ``VQVAE`` with that file's configuration).
"""

import pytest
import torch
from torchmultimodal.models.video_gpt.model import video_vqvae as tmm_video_vqvae
from torchmultimodal.models.video_gpt.video_vqvae import VideoDecoder as TVideoDecoder
from torchmultimodal.models.video_gpt.video_vqvae import VideoEncoder as TVideoEncoder
from torchmultimodal.models.vqvae import VQVAE as TVQVAE

from checks import randomize
from polymodal.core import pytree
from polymodal.core import random as pr
from polymodal.core.convert import expected_shapes
from polymodal.models.vqvae import mugen_vqvae, video_vqvae
from polymodal.models.vqvae.convert import from_torchmultimodal, to_torchmultimodal

SMALL = dict(encoder_hidden_dim=16, n_res_layers=2, attn_hidden_dim=16, num_embeddings=32, embedding_dim=8,
             decoder_hidden_dim=16)
SIZES, STRIDES = ((4, 4, 4), (3, 3, 3)), ((2, 2, 2), (1, 2, 2))


def reference_pair(seed=0):
    torch.manual_seed(seed)
    ref = tmm_video_vqvae(SIZES, STRIDES, **SMALL).eval()
    # torch's own init for the weights (sensible scales); batch norms, biases and codes redrawn
    sd = {}
    for i, (k, v) in enumerate(ref.state_dict().items()):
        if v.is_floating_point() and (v.dim() <= 1 or k.startswith("codebook")):
            v = randomize({"x": v}, seed + i)["x"]
            v = v.abs() + 0.5 if "running_var" in k or k.endswith("code_usage") else v
        sd[k] = v
    ref.load_state_dict(sd)
    spec = video_vqvae(SIZES, STRIDES, **SMALL)
    params, state = from_torchmultimodal(sd, spec)
    return ref, spec, params, state, sd


@pytest.mark.parametrize("b", [2, 1])  # batch 1: the same-padded convs run as conv2d over depths (core/layers/conv.py)
def test_encode_decode_codes_match_torchmultimodal(b):
    ref, spec, params, state, sd = reference_pair()
    x = pr.uniform(pr.key(3), (b, 3, 4, 8, 8))
    with torch.no_grad():
        ref_out = ref(x)
        ref_codes = ref.encode(x)
        ref_dec = ref.decode(ref_codes)
    out, new_state = spec(params, x, state)
    assert new_state is not None
    torch.testing.assert_close(out.codebook_output.encoded_flat, ref_out.codebook_output.encoded_flat,
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(out.codebook_output.codebook_indices, ref_out.codebook_output.codebook_indices)
    torch.testing.assert_close(out.decoded, ref_out.decoded, rtol=1e-5, atol=1e-5)
    codes = spec.encode(params, x, state)
    assert torch.equal(codes, ref_codes) and codes.shape == (b, 2, 2, 2)
    torch.testing.assert_close(spec.decode(params, codes, state), ref_dec, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(spec.lookup(state, codes), ref.lookup(codes), rtol=0, atol=0)


def test_training_step_matches_torchmultimodal_batch_norm_and_losses():
    ref, spec, params, state, sd = reference_pair(1)
    ref.train()
    x = pr.uniform(pr.key(4), (2, 3, 4, 8, 8))
    out, new_state = spec(params, x, state, training=True, key=pr.key(0))
    ref_out = ref(x)  # codebook already initialised (loaded): EMA update, then restart draws differ
    torch.testing.assert_close(out.decoded, ref_out.decoded, rtol=1e-5, atol=1e-5)
    # batch-norm running statistics advanced exactly as torch.nn.BatchNorm3d's buffers
    back = to_torchmultimodal(params, new_state, spec)
    for k, v in ref.state_dict().items():
        if "running_" in k or "num_batches" in k or k.endswith("code_usage") or k.endswith("code_avg"):
            torch.testing.assert_close(back[k], v, rtol=1e-5, atol=1e-6, msg=k)
    ls = spec.losses(out, x)
    want = torch.nn.functional.mse_loss(ref_out.decoded, x)
    torch.testing.assert_close(ls["reconstruction"], want, rtol=1e-5, atol=1e-6)
    assert ls["commitment"] > 0 and torch.allclose(ls["loss"], ls["reconstruction"] + ls["commitment"])


def test_converter_round_trip_is_exact_and_names_bad_keys():
    ref, spec, params, state, sd = reference_pair(2)
    back = to_torchmultimodal(params, state, spec)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert bool(state["codebook"]["initialized"])
    bad = dict(sd)
    bad.pop("encoder.conv_out.conv.bias")
    bad["encoder.extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \(1\): encoder.conv_out.conv.bias"):
        from_torchmultimodal(bad, spec)


def _mugen_reference():
    # examples/mugen/generation/video_vqvae.py: video_vqvae_mugen (defaults), composed here
    enc_strides = ((2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2), (1, 2, 2), (1, 1, 1))
    dec_strides = ((2, 2, 2), (2, 2, 2), (1, 2, 2), (1, 2, 2), (1, 2, 2))
    enc = TVideoEncoder((3,) + (240,) * 5, ((3, 3, 3),) * 6, enc_strides, 256, 4, 240)
    dec = TVideoDecoder((240,) * 4 + (3,), ((3, 3, 3),) * 5, dec_strides, 256, 4, 240)
    return TVQVAE(enc, dec, 2048, 256)


@pytest.mark.slow  # full-size layouts (meta device): ~5 s each on a loaded 2-core machine
@pytest.mark.parametrize("name", ["video", "mugen"])
def test_published_configurations_have_the_reference_layout(name):
    with torch.device("meta"):
        ref = tmm_video_vqvae() if name == "video" else _mugen_reference()
    spec = video_vqvae() if name == "video" else mugen_vqvae()
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    meta = {k: torch.empty(s, device="meta") for k, s in expected_shapes(spec).items()
            if not k.startswith("codebook") and "running" not in k and "num_batches" not in k}
    ours = to_torchmultimodal(pytree.unflatten(meta), None, spec)
    assert {k: tuple(v.shape) for k, v in ours.items()} == theirs
    n_ref = sum(p.numel() for p in ref.parameters())
    from polymodal.core.convert import meta_init
    assert pytree.num_params(meta_init(spec)) == n_ref
    assert (spec.num_embeddings, spec.embedding_dim) == ((1024, 256) if name == "video" else (2048, 256))
    assert spec.latent_shape((16, 64, 64) if name == "video" else (32, 256, 256)) == (
        (8, 32, 32) if name == "video" else (8, 8, 8))
