"""The shared Vision Transformer: torchvision and TorchMultimodal parity (pre- and post-norm, mask
token, attention pooler), MAE masking, position-table resizing against open_clip, generic checks."""

import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from checks import check_spec, copy_into, randomize
from polymodal.core import pytree
from polymodal.core import random as pr
from polymodal.core.encoders.vit import (
    VisionTransformer, resize_position_embeddings, vision_transformer, vit_b_16, vit_h_14, vit_l_16,
)

TOL = dict(rtol=1e-5, atol=1e-5)


def rand(seed, *shape):
    return pr.normal(pr.key(seed), shape)




def _layer_map(k, names, prefix):
    head, i, rest = k.split(".", 2)
    for ours, theirs in names.items():
        if rest.startswith(ours):
            return prefix(i) + theirs + rest[len(ours):]
    raise KeyError(k)


TV_NAMES = {"self_attn.in_proj_weight": "self_attention.in_proj_weight", "self_attn.in_proj_bias":
            "self_attention.in_proj_bias", "self_attn.out_proj": "self_attention.out_proj", "linear1": "mlp.0",
            "linear2": "mlp.3", "norm1": "ln_1", "norm2": "ln_2"}
TMM_NAMES = {"self_attn.in_proj_weight": "attention.input_proj.weight", "self_attn.in_proj_bias": "attention.input_proj.bias",
             "self_attn.out_proj": "attention.output_proj", "linear1": "feedforward.model.0",
             "linear2": "feedforward.model.2", "norm1": "attention_layernorm", "norm2": "feedforward_layernorm"}


def to_torchvision(k):
    fixed = {"embeddings.cls_token": "class_token", "embeddings.position_embeddings": "encoder.pos_embedding"}
    if k in fixed:
        return fixed[k]
    if k.startswith("embeddings.conv_projection."):
        return "conv_proj." + k.rsplit(".", 1)[1]
    if k.startswith("transformer.norm."):
        return "encoder.ln." + k.rsplit(".", 1)[1]
    return _layer_map(k[len("transformer."):], TV_NAMES, lambda i: f"encoder.layers.encoder_layer_{i}.")


def to_torchmultimodal(k):
    if k.startswith("embeddings."):
        return k
    if k.startswith("pooler."):
        return k.replace("attn.out_proj", "attn.output_proj")
    if k.startswith("transformer.norm."):
        return "encoder.final_layer_norm." + k.rsplit(".", 1)[1]
    return _layer_map(k[len("transformer."):], TMM_NAMES, lambda i: f"encoder.layer.{i}.")


@given(st.integers(1, 3), st.sampled_from([(16, 4), (24, 8)]), st.integers(0, 2**31))
@settings(max_examples=4, deadline=None)
def test_matches_torchvision(b, size_patch, seed):
    from torchvision.models.vision_transformer import VisionTransformer as TV

    size, patch = size_patch
    spec = vision_transformer(image_size=size, patch_size=patch, width=32, layers=2, heads=4, mlp_dim=48)
    p = randomize(spec.init(key=pr.key(seed)), seed)
    ref = TV(size, patch, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=48).eval()
    ref.heads = torch.nn.Identity()
    copy_into(ref, p, to_torchvision)
    x = rand(seed + 1, b, 3, size, size)
    out = spec(p, x)
    with torch.no_grad():
        want_all = ref.encoder(torch.cat([ref.class_token.expand(b, -1, -1), ref._process_input(x)], dim=1))
        want = ref(x)
    torch.testing.assert_close(out.last_hidden_state, want_all, **TOL)
    torch.testing.assert_close(out.pooled, want, **TOL)
    fast = spec(p, x, pooled_only=True)  # the last block computes the class token only
    assert fast.last_hidden_state.shape == (b, 1, 32)
    torch.testing.assert_close(fast.pooled, want, **TOL)


def _tmm(norm_first, pooler=None, masking=False):
    from torchmultimodal.modules.encoders.vision_transformer import VisionTransformer as TMMViT
    from torchmultimodal.modules.layers.patch_embedding import PatchEmbeddings
    from torchmultimodal.modules.layers.transformer import TransformerEncoder

    emb = PatchEmbeddings(image_size=16, patch_size=4, hidden_size=32, use_image_masking=masking)
    enc = TransformerEncoder(2, 32, 4, 48, activation=torch.nn.GELU, layer_norm_eps=1e-6, norm_first=norm_first,
                             final_layer_norm_eps=1e-6 if norm_first else None)
    return TMMViT(emb, enc, pooler).eval()


def test_matches_torchmultimodal_pre_norm_mask_token_and_attention_pool():
    from torchmultimodal.modules.layers.attention_pooler import AttentionPooler as TMMPooler

    spec = vision_transformer(image_size=16, patch_size=4, width=32, layers=2, heads=4, mlp_dim=48, pool="map",
                              pool_heads=2, mask_token=True)
    p = randomize(spec.init(key=pr.key(0)), 0)
    ref = _tmm(True, TMMPooler(32, 32, 2, n_queries=1, layer_norm_eps=1e-6), masking=True)
    copy_into(ref, p, to_torchmultimodal)
    x, mask = rand(1, 2, 3, 16, 16), pr.bernoulli(pr.key(2), 0.4, (2, 16))
    out = spec(p, x, mask, return_hidden_states=True)
    want = ref(x, image_patches_mask=mask)
    torch.testing.assert_close(out.last_hidden_state, want.last_hidden_state, **TOL)
    torch.testing.assert_close(out.pooled, want.pooler_output[:, 0], **TOL)
    for a, b in zip(out.hidden_states, want.hidden_states, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    assert not torch.allclose(spec(p, x).pooled, out.pooled)  # the mask token did replace patches


def test_matches_torchmultimodal_post_norm_gap():
    spec = vision_transformer(image_size=16, patch_size=4, width=32, layers=2, heads=4, mlp_dim=48, norm_first=False,
                              pool="gap")
    assert not spec.transformer.final_norm
    p = randomize(spec.init(key=pr.key(3)), 3)
    ref = _tmm(False)
    copy_into(ref, p, to_torchmultimodal)
    x = rand(4, 2, 3, 16, 16)
    out = spec(p, x)
    want = ref(x).last_hidden_state
    torch.testing.assert_close(out.last_hidden_state, want, **TOL)
    torch.testing.assert_close(out.pooled, want[:, 1:].mean(1), **TOL)  # the mean of the patch tokens


def test_mae_masking_keeps_the_embeddings_of_the_kept_patches():
    spec = vision_transformer(image_size=16, patch_size=4, width=16, layers=1, heads=2, cls_token=False,
                              position="sincos", pool="none", mask_ratio=0.75)
    p = spec.init(key=pr.key(0))
    x = rand(1, 3, 3, 16, 16)
    out = spec(p, x, key=pr.key(5))
    assert out.pooled is None and out.last_hidden_state.shape == (3, 4, 16)
    assert out.mask.shape == (3, 16) and out.mask.sum(-1).tolist() == [12.0, 12.0, 12.0]
    # The kept rows are the full embedding's rows where mask == 0, in the order ids_restore undoes.
    full = spec.embeddings(p["embeddings"], x).embeddings
    kept = torch.argsort(out.ids_restore, dim=-1)[:, :4]
    assert torch.equal(out.mask.gather(1, kept), torch.zeros(3, 4))
    inputs = spec(p, x, key=pr.key(5), return_hidden_states=True).hidden_states[0]
    torch.testing.assert_close(inputs, full.gather(1, kept[..., None].expand(3, 4, 16)))
    assert torch.equal(spec(p, x, key=pr.key(5)).mask, out.mask)  # same key, same mask
    # sin-cos positions get no gradient
    g = torch.func.grad(lambda q: spec(q, x, key=pr.key(5)).last_hidden_state.sum())(p)
    assert torch.equal(g["embeddings"]["position_embeddings"], torch.zeros_like(p["embeddings"]["position_embeddings"]))


def test_resize_position_embeddings_matches_open_clip():
    from open_clip.model import resize_pos_embed

    for old, new in (((4, 4), (6, 6)), ((6, 6), (3, 5)), ((7, 7), (7, 7))):
        table = rand(0, 1 + old[0] * old[1], 24)
        sd = {"visual.positional_embedding": table.clone()}
        resize_pos_embed(sd, types.SimpleNamespace(visual=types.SimpleNamespace(grid_size=new)))
        got = resize_position_embeddings(table, new)
        assert got.shape == (1 + new[0] * new[1], 24)
        torch.testing.assert_close(got, sd["visual.positional_embedding"], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"expected 1 \+ 3 \* 3 rows, got 17"):
        resize_position_embeddings(rand(0, 17, 8), (4, 4), old_grid=(3, 3))


def test_resized_spec_runs_at_the_new_size_and_keeps_the_rest():
    spec = vision_transformer(image_size=16, patch_size=4, width=16, layers=1, heads=2)
    p = spec.init(key=pr.key(0))
    big, q = spec.resized(p, 24)
    assert big.embeddings.image_size == (24, 24) and q["embeddings"]["position_embeddings"].shape == (1, 37, 16)
    want = resize_position_embeddings(p["embeddings"]["position_embeddings"], (6, 6))
    assert torch.equal(q["embeddings"]["position_embeddings"], want)
    assert q["transformer"] is p["transformer"]
    assert big(q, rand(1, 2, 3, 24, 24)).pooled.shape == (2, 16)
    # The class token keeps its position row; resizing to the same size is the identity.
    assert torch.equal(spec.resized(p, 16)[1]["embeddings"]["position_embeddings"], p["embeddings"]["position_embeddings"])
    fixed = vision_transformer(image_size=16, patch_size=4, width=16, layers=1, heads=2, position="sincos")
    _, fq = fixed.resized(fixed.init(key=pr.key(0)), 8)
    assert fq["embeddings"]["position_embeddings"].shape == (1, 5, 16)


@pytest.mark.parametrize("pool", ["cls", "gap", "map"])
def test_check_spec(pool):
    spec = vision_transformer(image_size=8, patch_size=4, width=16, layers=2, heads=2, pool=pool)
    check_spec(spec, randomize(spec.init(key=pr.key(0)), 0), [rand(1, 2, 3, 8, 8)], compile=pool == "cls")


def test_errors_name_expected_and_got():
    base = vision_transformer(image_size=8, patch_size=4, width=16, layers=1, heads=2)
    with pytest.raises(ValueError, match="pool: expected one of"):
        VisionTransformer(base.embeddings, base.transformer, "max")
    with pytest.raises(ValueError, match="pooler: expected an AttentionPooler exactly when pool='map'"):
        VisionTransformer(base.embeddings, base.transformer, "map")
    with pytest.raises(ValueError, match=r"hidden_size \(16\) must equal transformer width \(32\)"):
        VisionTransformer(base.embeddings, vision_transformer(width=32, layers=1, heads=2).transformer)
    with pytest.raises(ValueError, match="pool='cls' needs"):
        vision_transformer(image_size=8, patch_size=4, width=16, layers=1, heads=2, cls_token=False)
    with pytest.raises(ValueError, match=r"expected shape \(B, 3, 8, 8\), got \(2, 3, 16, 16\)"):
        base(base.init(key=pr.key(0)), torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="pooled_only needs pool='cls'"):
        spec = vision_transformer(image_size=8, patch_size=4, width=16, layers=1, heads=2, pool="gap")
        spec(spec.init(key=pr.key(0)), torch.zeros(1, 3, 8, 8), pooled_only=True)


def test_published_sizes():
    # Dosovitskiy et al. 2021, Table 1: ViT-B 86M, ViT-L 307M, ViT-H 632M parameters.
    for build, millions in ((vit_b_16, 86), (vit_l_16, 307), (vit_h_14, 632)):
        with torch.device("meta"):
            n = sum(v.numel() for v in pytree.leaves(build().init(key=pr.key(0))))
        assert abs(n / 1e6 - millions) / millions < 0.02, (build.__name__, n)
