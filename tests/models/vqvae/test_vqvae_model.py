"""Video VQ-VAE spec: generic checks, explicit state, losses, errors, a few training steps."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from checks import check_spec
from polymodal import nn as pnn
from polymodal.core import pytree
from polymodal.core import random as pr
from polymodal.models.vqvae import AxialAttentionBlock, video_vqvae, vqvae_tiny

SMALL = dict(encoder_hidden_dim=8, n_res_layers=1, attn_hidden_dim=8, num_embeddings=16, embedding_dim=4,
             decoder_hidden_dim=8)


def small():
    spec = video_vqvae(((4, 4, 4),), ((2, 2, 2),), **SMALL)
    return spec, spec.init(key=pr.key(0)), spec.init_state()


def _generic(compile_):
    spec, p, s = small()
    x = pr.uniform(pr.key(1), (2, 3, 2, 4, 4))
    check_spec(spec, p, [x], vmap_inputs=[x[:, None].expand(2, 2, 3, 2, 4, 4).contiguous()], compile=compile_,
               atol=1e-5)


def test_generic_checks_eval_mode():
    _generic(False)


@pytest.mark.slow  # torch.compile(fullgraph=True) of the whole VQ-VAE: ~20 s on CPU
def test_generic_checks_compile():
    _generic(True)


def test_axial_attention_is_attention_along_each_axis():
    # hand-built reference: full attention over one axis at a time with the same projections, summed
    blk = AxialAttentionBlock(8, 2)
    p = blk.init(key=pr.key(0))
    x = pr.normal(pr.key(1), (1, 8, 2, 3, 4))
    want = torch.zeros_like(x)
    for axis in range(3):
        mha = torch.nn.MultiheadAttention(8, 2, bias=False, batch_first=True)
        q = p["mha_attns"][axis]
        with torch.no_grad():
            mha.in_proj_weight.copy_(torch.cat([q["q_proj"]["weight"], q["k_proj"]["weight"], q["v_proj"]["weight"]]))
            mha.out_proj.weight.copy_(q["out_proj"]["weight"])
        mha.out_proj.bias = torch.nn.Parameter(q["out_proj"]["bias"].clone())
        h = x.movedim(1, -1).movedim(1 + axis, -2)
        flat = h.reshape(-1, h.shape[-2], 8)
        y = mha(flat, flat, flat, need_weights=False)[0].reshape(h.shape).movedim(-2, 1 + axis).movedim(-1, 1)
        want = want + y
    torch.testing.assert_close(blk(p, x), want, rtol=1e-5, atol=1e-5)


def test_state_is_explicit_and_training_updates_it():
    spec, p, s = small()
    x = pr.uniform(pr.key(2), (2, 3, 2, 4, 4))
    before = {k: v.clone() for k, v in pytree.flatten(s).items()}
    out, s2 = spec(p, x, s, training=True, key=pr.key(3))
    assert all(torch.equal(v, pytree.flatten(s)[k]) for k, v in before.items())  # input untouched
    assert bool(s2["codebook"]["initialized"]) and not bool(s["codebook"]["initialized"])
    assert int(s2["encoder"]["res_blocks"][0]["bn1"]["num_batches_tracked"]) == 1
    out_b, s3 = spec(p, x, s, training=True, key=pr.key(3))
    assert all(torch.equal(a, b) for a, b in zip(pytree.leaves(s2), pytree.leaves(s3)))  # same key, same step
    with pytest.raises(ValueError, match="needs a key"):
        spec(p, x, s, training=True)


def test_bad_inputs_name_what_was_expected():
    spec, p, s = small()
    with pytest.raises(ValueError, match=r"divisible by the downsampling \(2, 2, 2\), got \(3, 4, 4\)"):
        spec(p, torch.zeros(1, 3, 3, 4, 4), s)
    with pytest.raises(ValueError, match=r"expected shape \(B, 3, <3 spatial axes>\), got \(1, 4, 2, 4, 4\)"):
        spec.encode(p, torch.zeros(1, 4, 2, 4, 4), s)
    with pytest.raises(ValueError, match=r"codes in \[0, 16\) \(the codebook has 16 entries\), got codes from 0 to 16"):
        spec.decode(p, torch.tensor([[[[0, 16], [1, 2]]]]), s)
    with pytest.raises(TypeError, match="codes"):
        spec.decode(p, torch.zeros(1, 1, 2, 2), s)


@settings(max_examples=6, deadline=None)
@given(st.tuples(*(st.integers(1, 4),) * 3))
def test_latent_shape_is_input_over_downsampling(mult):
    spec = vqvae_tiny()
    shape = tuple(m * d for m, d in zip(mult, spec.encoder.downsample))
    assert spec.latent_shape(shape) == mult
    assert spec.encoder.downsample == (2, 4, 4)


def test_shell_and_a_few_training_steps_lower_the_loss():
    spec, p, s = small()
    shell = pnn.build("vqvae_tiny")
    assert sorted(shell.state_dict()) == sorted(pytree.flatten(shell.params) | pytree.flatten(shell.spec.init_state()))
    x = pr.uniform(pr.key(5), (4, 3, 2, 4, 4))
    leaves = {k: v.clone().requires_grad_() for k, v in pytree.flatten(p).items()}
    opt = torch.optim.Adam(leaves.values(), lr=5e-3)
    losses = []
    for step in range(15):
        out, s = spec(pytree.unflatten(leaves), x, s, training=True, key=pr.fold_in(pr.key(0), step))
        loss = spec.losses(out, x)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
