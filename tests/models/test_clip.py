"""CLIP model: structure, CLIP's init scheme, input errors, generic checks, per-sample gradients,
torch.compile, and the usual training example (functional and shells)."""

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from checks import assert_close, check_spec
from polymodal import nn as pnn
from polymodal.core import pytree
from polymodal.core import random as pr
from polymodal.core.losses import contrastive_loss_with_temperature
from polymodal.models.clip import (
    CLIP, ModifiedResNet, build, clip_text_transformer, clip_vision_transformer, trim_padding,
)
from polymodal.train.dp.per_sample import per_sample_grads

TEXT = clip_text_transformer(context_length=8, vocab_size=60, width=32, heads=2, layers=2, embed_dim=24)
VIT = clip_vision_transformer(image_size=16, patch_size=4, width=32, layers=2, heads=2, embed_dim=24)
RESNET = ModifiedResNet(image_size=64, layers=(1, 2, 1, 1), width=8, heads=2, embed_dim=24)


def tiny(vision=VIT) -> CLIP:
    return CLIP(visual=vision, text=TEXT)


def tokens(seed: int, b: int, t: int = 8, vocab: int = 60) -> torch.Tensor:
    ids = pr.randint(pr.key(seed), (b, t), 1, vocab - 1)
    eot = pr.randint(pr.key(seed + 1), (b,), 1, t)
    return ids.scatter(1, eot[:, None], vocab - 1)  # one end-of-text (the largest id) per row


def test_outputs_are_normalised_and_logit_scale_is_clips():
    spec = tiny()
    p = spec.init(key=pr.key(0))
    out = spec(p, torch.randn(3, 3, 16, 16), tokens(1, 3))
    assert out.image_embeddings.shape == (3, 24) and out.text_embeddings.shape == (3, 24)
    assert_close(out.image_embeddings.norm(dim=-1), torch.ones(3))
    assert_close(out.text_embeddings.norm(dim=-1), torch.ones(3))
    assert float(out.logit_scale) == pytest.approx(math.log(1 / 0.07))
    assert spec.init_state() is None
    unnorm = spec.encode_image(p, torch.randn(2, 3, 16, 16), normalize=False)
    assert not torch.allclose(unnorm.norm(dim=-1), torch.ones(2))


def test_text_pools_at_the_end_of_text_token():
    spec = tiny()
    p = spec.init(key=pr.key(0))
    t = tokens(2, 1)
    eot = int(t.argmax())
    after = t.clone()
    after[0, eot + 1:] = 3  # tokens after the end-of-text token are invisible (causal) and not pooled
    assert_close(spec.encode_text(p, t), spec.encode_text(p, after))
    hidden = spec.text.hidden_states(p["text"], t)
    assert_close(spec.encode_text(p, t, normalize=False), hidden[:, eot] @ p["text"]["text_projection"])


def test_init_follows_openais_scheme():
    spec = build("clip_small")
    p = spec.init(key=pr.key(0))
    d, n = 256, 4
    layer = p["text"]["transformer"]["layers"][0]
    stds = {
        "attn": (layer["self_attn"]["in_proj_weight"], d**-0.5),
        "proj": (layer["self_attn"]["out_proj"]["weight"], d**-0.5 * (2 * n) ** -0.5),
        "fc": (layer["linear1"]["weight"], (2 * d) ** -0.5),
        "c_proj": (layer["linear2"]["weight"], d**-0.5 * (2 * n) ** -0.5),
        "token": (p["text"]["token_embedding"]["weight"], 0.02),
        "pos": (p["text"]["positional_embedding"], 0.01),
        "text_proj": (p["text"]["text_projection"], d**-0.5),
        "cls": (p["visual"]["embeddings"]["position_embeddings"], d**-0.5),
        "img_proj": (p["visual"]["proj"], d**-0.5),
    }
    for name, (w, std) in stds.items():
        assert float(w.std()) == pytest.approx(std, rel=0.06), name
    rn = RESNET.init(key=pr.key(1))
    assert all(float(b["bn3"]["weight"].abs().sum()) == 0 for s in range(1, 5) for b in rn[f"layer{s}"])
    assert float(rn["attnpool"]["q_proj"]["weight"].std()) == pytest.approx(256**-0.5, rel=0.06)


def test_bad_inputs_name_expected_and_got():
    spec = build("clip_tiny")
    p = spec.init(key=pr.key(0))
    with pytest.raises(ValueError, match=r"images: expected shape \(B, 3, 64, 64\), got \(2, 3, 32, 32\)"):
        spec.encode_image(p, torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"images: expected shape \(B, 3, 64, 64\), got \(3, 64, 64\)"):
        spec.encode_image(p, torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match=r"tokens: expected shape \(B, T\) with 1 <= T <= 32 \(context_length 32\), "
                                         r"got \(2, 77\)"):
        spec.encode_text(p, torch.zeros(2, 77, dtype=torch.long))
    with pytest.raises(TypeError, match="tokens: expected dtype"):
        spec.encode_text(p, torch.zeros(2, 32))
    rn = tiny(RESNET)
    with pytest.raises(ValueError, match=r"ModifiedResNet: images: expected shape \(B, 3, 64, 64\), got \(1, 3, 96, 96\)"):
        rn.encode_image(rn.init(key=pr.key(0)), torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match="a ViT image tower has no state"):
        spec(p, torch.randn(2, 3, 64, 64), tokens(0, 2, 32, 49408), {"visual": {}})
    with pytest.raises(ValueError, match="divisible by patch_size"):
        clip_vision_transformer(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="the towers must share embed_dim: visual has 24, text has 16"):
        CLIP(visual=VIT, text=dataclasses.replace(TEXT, embed_dim=16))
    with pytest.raises(TypeError, match="visual: expected CLIPVisionTransformer or ModifiedResNet, got "
                                        "VisionTransformer"):
        CLIP(visual=VIT.encoder, text=TEXT)
    with pytest.raises(ValueError, match="unknown CLIP model 'ViT-Z-1'"):
        build("ViT-Z-1")


@settings(max_examples=3, deadline=None)
@given(st.integers(0, 2**31), st.integers(2, 3))
def test_generic_checks_vision_text_and_clip(seed, b):
    vit, text = VIT, TEXT
    x, t = pr.normal(pr.key(seed), (b, 3, 16, 16)), tokens(seed, b)
    check_spec(vit, vit.init(key=pr.key(seed)), [x], vmap_inputs=[x[:, None]])
    check_spec(text, text.init(key=pr.key(seed)), [t], vmap_inputs=[t[:, None]])
    clip = tiny()
    check_spec(clip, clip.init(key=pr.key(seed)), [x, t], vmap_inputs=[x[:, None], t[:, None]])


def test_generic_checks_resnet_tower():
    rn = RESNET
    x = pr.normal(pr.key(0), (2, 3, 64, 64))
    check_spec(rn, rn.init(key=pr.key(1)), [x], vmap_inputs=[x[:, None]], atol=1e-5)


def test_resnet_training_mode_updates_state_and_shell_buffers():
    spec = tiny(RESNET)
    p, s = spec.init(key=pr.key(0)), spec.init_state()
    x, t = pr.normal(pr.key(1), (4, 3, 64, 64)), tokens(2, 4)
    out, s2 = spec(p, x, t, s, training=True)
    assert int(s2["visual"]["bn1"]["num_batches_tracked"]) == 1 and int(s["visual"]["bn1"]["num_batches_tracked"]) == 0
    _, same = spec(p, x, t, s2)  # eval: running statistics, state returned as is
    assert same is s2
    # A stateful spec always returns (out, state): state=None starts from fresh statistics.
    out_fresh, s_fresh = spec(p, x, t, training=True)
    assert_close(out_fresh, out) and int(s_fresh["visual"]["bn1"]["num_batches_tracked"]) == 1
    assert_close(s_fresh, s2)
    eval_out, eval_state = spec(p, x, t)
    assert_close(eval_state, spec.init_state()) and eval_out.image_embeddings.shape == (4, 24)
    frozen = tiny(dataclasses.replace(RESNET, frozen_bn=True))
    _, s3 = frozen(p, x, t, s, training=True)
    assert s3 is s
    shell = pnn.CLIP.from_params(spec, p).train()
    shell(x, t)
    assert int(shell.state["visual"]["layer2"][1]["bn2"]["num_batches_tracked"]) == 1
    assert_close(shell.state["visual"]["bn3"]["running_mean"], s2["visual"]["bn3"]["running_mean"])
    shell.eval()
    assert_close(shell.encode_image(x), spec.encode_image(p, x, state=shell.state))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31), st.integers(1, 5), st.sampled_from([None, 1, 3, 8]))
def test_trimmed_tokens_give_the_padded_embeddings_and_gradients(seed, b, multiple):
    spec = tiny()
    p = spec.init(key=pr.key(seed))
    t = tokens(seed + 1, b)
    eot = t.argmax(-1)
    t = torch.where(torch.arange(8) > eot[:, None], 0, t)  # padding after each row's end-of-text token
    short = trim_padding(t, multiple)
    width = int(eot.max()) + 1
    assert short.shape == (b, width if multiple is None else min(8, -(-width // multiple) * multiple))
    assert torch.equal(short, t[:, :short.shape[1]]) and not t[:, short.shape[1]:].any()
    assert_close(spec.encode_text(p, short), spec.encode_text(p, t), atol=1e-6)

    def loss(params, toks):
        return spec.encode_text(params, toks, normalize=False).square().sum()

    p64 = pytree.cast(p, torch.float64)  # float64: equal to rounding (float32 gradients reach 1e2 here)
    assert_close(torch.func.grad(loss)(p64, short), torch.func.grad(loss)(p64, t), atol=1e-9, rtol=1e-9)


def test_trim_padding_errors_and_edges():
    with pytest.raises(ValueError, match=r"trim_padding: tokens: expected shape \(B, T\), got \(8,\)"):
        trim_padding(torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple_of: expected a positive int or None, got 0"):
        trim_padding(torch.zeros(2, 8, dtype=torch.long), 0)
    assert trim_padding(torch.zeros(0, 8, dtype=torch.long)).shape == (0, 8)


@pytest.mark.parametrize("vision", [VIT, RESNET], ids=["vit", "resnet"])
def test_per_sample_gradients_through_image_tower_equal_a_loop(vision):
    spec = tiny(vision)
    params = {"clip": spec.init(key=pr.key(0)), "head": {"weight": pr.normal(pr.key(1), (5, 24)) * 0.1}}
    b = 3
    x = pr.normal(pr.key(2), (b, 3, vision.image_size, vision.image_size))
    y = pr.randint(pr.key(3), (b,), 0, 5)

    def loss(p, batch):  # per-example cross-entropy of a linear head on the image embedding
        logits = spec.encode_image(p["clip"], batch["x"]) @ p["head"]["weight"].T
        return torch.nn.functional.cross_entropy(logits, batch["y"], reduction="none")

    g = per_sample_grads(loss, params, {"x": x, "y": y}, trainable=["clip.visual", "head"])
    for i in range(b):
        gi = torch.func.grad(lambda p: loss(p, {"x": x[i:i + 1], "y": y[i:i + 1]}).sum())(params)
        flat_g, flat_i = pytree.flatten(g), pytree.flatten(gi)
        for k, v in flat_g.items():
            torch.testing.assert_close(v[i], flat_i[k], rtol=1e-4, atol=1e-6, msg=k)
    assert g["clip"]["text"]["text_projection"] is None  # frozen: not computed


def test_compile_fullgraph_matches_eager():
    spec = build("clip_tiny")
    p = spec.init(key=pr.key(0))
    x, t = pr.normal(pr.key(1), (2, 3, 64, 64)), tokens(2, 2, 32, 49408)
    torch._dynamo.reset()
    img = torch.compile(spec.encode_image, fullgraph=True)
    txt = torch.compile(spec.encode_text, fullgraph=True)
    assert_close(img(p, x), spec.encode_image(p, x), atol=1e-5)
    assert_close(txt(p, t), spec.encode_text(p, t), atol=1e-5)


def test_compile_fullgraph_resnet_aot():
    spec = tiny(RESNET)
    p, s = spec.init(key=pr.key(0)), spec.init_state()
    x = pr.normal(pr.key(1), (2, 3, 64, 64))
    torch._dynamo.reset()
    f = torch.compile(lambda p, x, s: spec.encode_image(p, x, state=s), fullgraph=True, backend="aot_eager")
    assert_close(f(p, x, s), spec.encode_image(p, x, state=s), atol=1e-5)


def test_patch_dropout_uses_the_key():
    spec = tiny(clip_vision_transformer(image_size=16, patch_size=4, width=32, layers=2, heads=2, embed_dim=24,
                                        patch_dropout=0.5))
    p = spec.init(key=pr.key(0))
    x = pr.normal(pr.key(1), (2, 3, 16, 16))
    assert spec.visual.features(p["visual"], x, key=pr.key(2)).shape == (2, 1 + 8, 32)
    assert_close(spec.encode_image(p, x, key=pr.key(3)), spec.encode_image(p, x, key=pr.key(3)))
    assert not torch.allclose(spec.encode_image(p, x, key=pr.key(3)), spec.encode_image(p, x))


def test_shells_names_and_methods():
    model = pnn.CLIP("clip_tiny", key=pr.key(0))
    assert sorted(model.state_dict()) == sorted(pytree.flatten(model.params))
    assert model.spec == build("clip_tiny")
    x, t = pr.normal(pr.key(1), (2, 3, 64, 64)), tokens(2, 2, 32, 49408)
    model.eval()
    out = model(x, t)
    assert_close(out.image_embeddings, model.encode_image(x))
    assert_close(out.text_embeddings, model.spec.encode_text(model.params, t))
    model.encode_text(t).sum().backward()  # the methods use the live parameters
    assert model.text.token_embedding.weight.grad is not None
    vit = pnn.CLIPVisionTransformer.from_params(model.spec.visual, model.params["visual"])
    assert_close(vit(x), model.spec.encode_image(model.params, x, normalize=False))
    assert pnn.CLIPVisionTransformer.from_name("clip_tiny", key=pr.key(0))(x).shape == (2, 128)
    txt = pnn.CLIPTextTransformer.from_name("clip_tiny", key=pr.key(0))
    assert txt(t).shape == (2, 128)
    with pytest.raises(ValueError, match="ModifiedResNet"):
        pnn.CLIPModifiedResNet.from_name("clip_tiny")
    assert pnn.CLIP(build("clip_tiny"), key=pr.key(0)).spec == model.spec
    assert model.trim_text(t).shape[1] <= t.shape[1]  # the public trimming the zero-shot classifier uses
    assert torch.equal(model.trim_text(t), trim_padding(t))
