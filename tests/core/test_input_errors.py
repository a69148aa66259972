"""Public entry points refuse bad input with an error naming what was expected and what arrived."""

from __future__ import annotations

import math

import pytest
import torch

from polymodal.core import random as pr
from polymodal.core.layers import MLP, Conv, Embedding, LayerNorm, Linear
from polymodal.core.layers.attention import MultiHeadAttention, attention
from polymodal.core.losses.contrastive import contrastive_loss_with_temperature
from polymodal.models.clip import build


@pytest.fixture(scope="module")
def tiny_clip():
    spec = build("clip_tiny")
    return spec, spec.init(key=pr.key(0))


# ---------------------------------------------------------------- ids outside the vocabulary


@pytest.mark.parametrize("bad", [10, -1, 99])
def test_embedding_ids_outside_vocabulary(bad):
    emb = Embedding(10, 4)
    p = emb.init(key=pr.key(0))
    ids = torch.tensor([[1, 2, bad]])
    with pytest.raises(ValueError, match=rf"Embedding: ids: expected ids in \[0, 10\) .* got ids from {min(1, bad)} to "
                                         rf"{max(2, bad)}"):
        emb(p, ids)
    assert emb(p, torch.tensor([[0, 9]])).shape == (1, 2, 4)  # both ends of the range are fine


def test_embedding_value_check_stays_out_of_transforms():
    """Under vmap and torch.compile the ids are not read (no graph break, no data-dependent branch)."""
    emb = Embedding(10, 4)
    p = emb.init(key=pr.key(0))
    ids = torch.tensor([[1, 2], [3, 4]])
    torch.testing.assert_close(torch.func.vmap(lambda i: emb(p, i))(ids), emb(p, ids))
    compiled = torch.compile(lambda i: emb(p, i), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(ids), emb(p, ids))


def test_value_checks_stand_aside_for_fake_tensors(tiny_clip):
    """Shape inference with fake tensors (torch.export, the JAX bridge) has no values to read."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    spec, p = tiny_clip
    with FakeTensorMode(allow_non_fake_inputs=True):
        tokens = torch.zeros(2, 5, dtype=torch.long)  # fake: all-padding rows would be refused if real
        assert spec.encode_text(p, tokens).shape == (2, 128)


def test_clip_text_ids_outside_vocabulary(tiny_clip):
    spec, p = tiny_clip
    tokens = torch.tensor([[49406, 320, 49408, 0]])  # 49408 is one past CLIP's vocabulary
    with pytest.raises(ValueError, match=r"expected ids in \[0, 49408\) .* got ids from 0 to 49408"):
        spec.encode_text(p, tokens)


# ---------------------------------------------------------------- empty text, batch sizes, empty batch


def test_empty_text_row(tiny_clip):
    spec, p = tiny_clip
    with pytest.raises(ValueError, match=r"tokens: expected shape \(B, T\) with 1 <= T <= 32 .* got \(2, 0\)"):
        spec.encode_text(p, torch.zeros(2, 0, dtype=torch.long))


def test_all_padding_text_row(tiny_clip):
    """A row with no end-of-text token would pool a padding position: refused, naming the row."""
    spec, p = tiny_clip
    tokens = torch.tensor([[49406, 320, 49407, 0], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"tokens: expected every row to hold a non-zero token .* got empty rows \[1\]"):
        spec.encode_text(p, tokens)
    assert spec.encode_text(p, tokens[:1]).shape == (1, 128)


def test_mismatched_image_text_batches_in_the_loss(tiny_clip):
    spec, p = tiny_clip
    images, tokens = torch.randn(3, 3, 64, 64), torch.tensor([[49406, 320, 49407]] * 2)
    out = spec(p, images, tokens)  # zero-shot shape: 3 images against 2 prompts is allowed
    assert out.image_embeddings.shape == (3, 128) and out.text_embeddings.shape == (2, 128)
    with pytest.raises(ValueError, match=r"contrastive loss: emb_b: expected shape \(3, 128\) \(as emb_a\), "
                                         r"got \(2, 128\)"):
        contrastive_loss_with_temperature(out.image_embeddings, out.text_embeddings, out.logit_scale)


def test_contrastive_loss_over_an_empty_batch():
    with pytest.raises(ValueError, match=r"contrastive loss: emb_a: expected at least one pair, shape \(B >= 1, D\), "
                                         r"got \(0, 8\)"):
        contrastive_loss_with_temperature(torch.zeros(0, 8), torch.zeros(0, 8), math.log(10.0))


# ---------------------------------------------------------------- attention masks


@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4, 4), (7,), (1, 1, 1, 4, 4)])
def test_attention_mask_of_the_wrong_shape(shape):
    mha = MultiHeadAttention(8, 2)
    p = mha.init(key=pr.key(0))
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match=r"attention: mask: expected a shape broadcastable to \(B, H, Tq, Tk\) = "
                                         rf"\(2, 2, 4, 4\), got {re_shape(shape)}"):
        mha(p, x, attn_mask=torch.ones(shape, dtype=torch.bool))
    ok = torch.ones(4, 4, dtype=torch.bool).tril()
    torch.testing.assert_close(mha(p, x, attn_mask=ok).output, mha(p, x, is_causal=True).output, rtol=1e-5, atol=1e-6)
    q = torch.randn(2, 2, 4, 3)
    with pytest.raises(ValueError, match="attention: mask: expected a shape broadcastable"):
        attention(q, q, q, mask=torch.ones(shape, dtype=torch.bool))


def re_shape(shape) -> str:
    return r"\(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + r"\)"


# ---------------------------------------------------------------- params missing a key


def test_linear_without_its_bias():
    lin = Linear(3, 2)
    p = lin.init(key=pr.key(0))
    with pytest.raises(ValueError, match=r"Linear: params: expected keys \['bias', 'weight'\], got \['weight'\] "
                                         r"\(missing \['bias'\]\)"):
        lin({"weight": p["weight"]}, torch.ones(3))
    with pytest.raises(ValueError, match=r"Linear: params: .*\['bias'\] given, but the spec was built without them"):
        Linear(3, 2, bias=False)(p, torch.ones(3))


def test_conv_and_layernorm_missing_keys():
    conv = Conv(2, 3, 4, 3)
    with pytest.raises(ValueError, match=r"Conv: params: expected keys \['bias', 'weight'\], got \['weight'\]"):
        conv({"weight": conv.init(key=pr.key(0))["weight"]}, torch.ones(1, 3, 5, 5))
    ln = LayerNorm(4)
    with pytest.raises(ValueError, match=r"LayerNorm: params: expected keys \['bias', 'weight'\], got \[\]"):
        ln({}, torch.ones(2, 4))
    assert LayerNorm(4, affine=False)({}, torch.ones(2, 4)).shape == (2, 4)


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_input_dtype_against_float32_params(dtype, tiny_clip):
    lin = Linear(3, 2)
    p = lin.init(key=pr.key(0))
    with pytest.raises(TypeError, match=rf"Linear: x: expected dtype torch.float32 \(the params' dtype\), got {dtype}"):
        lin(p, torch.ones(5, 3, dtype=dtype))
    spec, cp = tiny_clip
    with pytest.raises(TypeError, match=rf"Conv: x: expected dtype torch.float32 \(the params' dtype\), got {dtype}"):
        spec.encode_image(cp, torch.ones(1, 3, 64, 64, dtype=dtype))


def test_layernorm_float64_input_against_float32_params():
    ln = LayerNorm(4)
    p = ln.init(key=None)
    with pytest.raises(TypeError, match=r"LayerNorm: x: expected dtype torch.float32 \(the params' dtype\), "
                                        r"got torch.float64"):
        ln(p, torch.ones(2, 4, dtype=torch.float64))
    y = ln(p, torch.ones(2, 4, dtype=torch.bfloat16))  # torch's mixed mode: 16-bit input, float32 affine
    assert y.dtype == torch.bfloat16


def test_autocast_keeps_working(tiny_clip):
    lin = Linear(3, 2)
    p = lin.init(key=pr.key(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(p, torch.ones(5, 3, dtype=torch.bfloat16))
        spec, cp = tiny_clip
        z = spec.encode_image(cp, torch.ones(1, 3, 64, 64))
    assert y.dtype == torch.bfloat16 and z.shape == (1, 128)


# ---------------------------------------------------------------- negative sizes


@pytest.mark.parametrize("make, field", [
    (lambda: Linear(-1, 3), "in_features"), (lambda: Linear(3, -2), "out_features"),
    (lambda: Embedding(-5, 4), "num_embeddings"), (lambda: LayerNorm(-4), "dim"),
    (lambda: Conv(2, 3, -8, 3), "out_channels"), (lambda: Linear(2.5, 3), "in_features"),
    (lambda: MultiHeadAttention(-8, 2), "dim_q"), (lambda: MLP(4, 2, hidden_dims=(8, -1)), r"hidden_dims\[1\]"),
])
def test_negative_layer_sizes(make, field):
    with pytest.raises(ValueError, match=rf": {field}: expected an int >= 0, got "):
        make()
