"""Transformer layers/stacks: parity with torch.nn and TorchMultimodal, cache == no cache, the seam."""

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from checks import assert_close, check_spec, copy_into, randomize
from polymodal.core import pytree
from polymodal.core import random as pr
from polymodal.core.layers.pooling import AttentionPooler, CascadedAttentionPooler, cls_pool, eot_pool, mean_pool
from polymodal.core.layers.seam import checkpoint_policy, compose, use_policy
from polymodal.core.layers.transformer import (
    TransformerDecoder, TransformerDecoderLayer, TransformerEncoder, TransformerEncoderLayer, drop_path_rates,
)

seeds = st.integers(0, 2**31)


def rand(seed, *shape):
    return pr.normal(pr.key(seed), shape)




@given(st.booleans(), st.sampled_from(["relu", "gelu"]), st.integers(1, 3), st.integers(1, 6), seeds)
def test_encoder_layer_matches_torch(norm_first, act, b, t, seed):
    spec = TransformerEncoderLayer(16, 4, 32, activation=act, norm_first=norm_first)
    p = randomize(spec.init(key=pr.key(seed)), seed)
    ref = torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, activation=act, batch_first=True,
                                           norm_first=norm_first).eval()
    copy_into(ref, p)
    x = rand(seed + 99, b, t, 16)
    pad = torch.zeros(b, t, dtype=torch.bool)
    pad[:, t - 1:] = t > 1
    with torch.no_grad():
        torch.testing.assert_close(spec(p, x)[0], ref(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(spec(p, x, key_padding_mask=pad)[0], ref(x, src_key_padding_mask=pad),
                                   rtol=1e-5, atol=1e-5)
    check_spec(spec, p, [x], compile=b == 1, atol=1e-5)


@given(st.booleans(), st.integers(1, 3), seeds)
def test_encoder_stack_matches_torch(norm_first, layers, seed):
    layer = TransformerEncoderLayer(16, 2, 24, norm_first=norm_first)
    spec = TransformerEncoder(layer, layers, final_norm=True)
    p = randomize(spec.init(key=pr.key(seed)), seed)
    ref = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0, batch_first=True, norm_first=norm_first),
        layers, norm=torch.nn.LayerNorm(16), enable_nested_tensor=False).eval()
    copy_into(ref, p)
    x = rand(seed + 1, 2, 5, 16)
    out = spec(p, x, return_hidden_states=True, return_attention_weights=True)
    torch.testing.assert_close(out.last_hidden_state, ref(x), rtol=1e-5, atol=1e-5)
    assert len(out.hidden_states) == layers + 1 and torch.equal(out.hidden_states[0], x)
    assert len(out.attentions) == layers and out.attentions[0].shape == (2, 2, 5, 5)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(2, 2, 5))


def test_encoder_matches_torchmultimodal():
    from torchmultimodal.modules.layers.transformer import TransformerEncoder as TMMEncoder

    for norm_first in (True, False):
        ref = TMMEncoder(2, 16, 4, 32, activation=torch.nn.GELU, layer_norm_eps=1e-12, norm_first=norm_first,
                         final_layer_norm_eps=1e-12 if norm_first else None).eval()
        layer = TransformerEncoderLayer(16, 4, 32, activation="gelu", norm_first=norm_first, layer_norm_eps=1e-12,
                                        fp32_norm=True)
        spec = TransformerEncoder(layer, 2, final_norm=norm_first)
        p = randomize(spec.init(key=pr.key(0)), 0)
        names = {"self_attn.in_proj_weight": "attention.input_proj.weight", "self_attn.in_proj_bias": "attention.input_proj.bias",
                 "self_attn.out_proj": "attention.output_proj", "linear1": "feedforward.model.0",
                 "linear2": "feedforward.model.2", "norm1": "attention_layernorm", "norm2": "feedforward_layernorm"}

        def to_tmm(k):
            if k.startswith("norm."):
                return "final_layer_norm." + k[5:]
            head, i, rest = k.split(".", 2)
            for ours, theirs in names.items():
                if rest.startswith(ours):
                    return f"layer.{i}.{theirs}{rest[len(ours):]}"
            raise KeyError(k)

        copy_into(ref, p, to_tmm)
        x = rand(1, 2, 6, 16)
        out = spec(p, x, return_hidden_states=True)
        want = ref(x, return_hidden_states=True)
        torch.testing.assert_close(out.last_hidden_state, want.last_hidden_state, rtol=1e-5, atol=1e-5)
        for a, b in zip(out.hidden_states, want.hidden_states):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@given(st.booleans(), st.integers(1, 3), seeds)
def test_decoder_layer_matches_torch(norm_first, b, seed):
    spec = TransformerDecoderLayer(16, 4, 32, norm_first=norm_first)
    p = randomize(spec.init(key=pr.key(seed)), seed)
    ref = torch.nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=norm_first).eval()
    copy_into(ref, p)
    x, mem = rand(seed + 1, b, 5, 16), rand(seed + 2, b, 7, 16)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        torch.testing.assert_close(spec(p, x, mem)[0], ref(x, mem, tgt_mask=causal), rtol=1e-5, atol=1e-5)


@given(st.integers(1, 4), st.integers(0, 2), st.integers(1, 4), st.integers(1, 4), seeds)
def test_decoder_cache_equals_full_pass(layers, every, prompt, new, seed):
    spec = TransformerDecoder(TransformerDecoderLayer(16, 4, 32, norm_first=True, dim_kv=12), layers,
                              cross_attention_every=every, final_norm=True)
    p = randomize(spec.init(key=pr.key(seed)), seed)
    x, mem = rand(seed + 1, 2, prompt + new, 16), rand(seed + 2, 2, 3, 12)
    full = spec(p, x, mem).last_hidden_state
    out = spec(p, x[:, :prompt], mem, use_cache=True)
    steps = [out.last_hidden_state]
    cache = out.cache
    for t in range(prompt, prompt + new):  # one token at a time
        out = spec(p, x[:, t:t + 1], mem, cache=cache)
        cache = out.cache
        steps.append(out.last_hidden_state)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    assert cache[0]["self"]["k"].shape[2] == prompt + new
    assert [("cross" in c) for c in cache] == [every > 0 and i % every == 0 for i in range(layers)]


def test_decoder_matches_torchmultimodal_cross_every_k():
    from torchmultimodal.modules.layers.transformer import TransformerDecoder as TMMDecoder

    ref = TMMDecoder(3, 16, 4, 32, layer_norm_eps=1e-5, norm_first=True, cross_attention_interval=2,
                     final_layer_norm_eps=1e-5).eval()
    spec = TransformerDecoder(TransformerDecoderLayer(16, 4, 32, norm_first=True), 3, cross_attention_every=2,
                              final_norm=True)
    p = randomize(spec.init(key=pr.key(3)), 3)
    flat = pytree.flatten(p)
    sd = {}
    for k, v in flat.items():
        if k.startswith("norm."):
            sd["final_layer_norm." + k[5:]] = v
            continue
        _, i, rest = k.split(".", 2)
        pre = f"layer.{i}."
        if rest.startswith(("self_attn.in_proj", "multihead_attn.in_proj")):
            which = "attention" if rest.startswith("self") else "cross_attention"
            for part, name in zip(v.chunk(3), ("q_proj", "k_proj", "v_proj")):
                sd[f"{pre}{which}.{name}.{rest.rsplit('_', 1)[1]}"] = part
            continue
        rest = (rest.replace("self_attn.out_proj", "attention.output_proj")
                .replace("multihead_attn.out_proj", "cross_attention.output_proj")
                .replace("linear1", "feedforward.model.0").replace("linear2", "feedforward.model.2"))
        has_cross = int(i) % 2 == 0
        rest = {"norm1": "attention_layernorm", "norm2": "cross_attention_layernorm" if has_cross else "feedforward_layernorm",
                "norm3": "feedforward_layernorm"}.get(rest.split(".")[0], rest.split(".")[0]) + (
            "." + rest.split(".", 1)[1] if "." in rest else "")
        sd[pre + rest] = v
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    x, mem = rand(1, 2, 5, 16), rand(2, 2, 4, 16)
    causal = torch.tril(torch.ones(5, 5, dtype=torch.bool))
    want = ref(x, mem, attention_mask=causal).last_hidden_state
    torch.testing.assert_close(spec(p, x, mem).last_hidden_state, want, rtol=1e-5, atol=1e-5)


@given(st.booleans(), st.booleans(), st.booleans(), st.integers(1, 3), st.integers(1, 7), st.integers(1, 3), seeds)
def test_select_equals_rows_of_the_full_output_values_and_grads(norm_first, causal, per_row, b, t, layers, seed):
    layer = TransformerEncoderLayer(16, 4, 32, activation="gelu", norm_first=norm_first, is_causal=causal)
    spec = TransformerEncoder(layer, layers, final_norm=True)
    p = randomize(spec.init(key=pr.key(seed)), seed)
    x = rand(seed + 99, b, t, 16)
    pad = torch.zeros(b, t, dtype=torch.bool)
    pad[:, t - 1:] = t > 1  # the last key is padding (when there is more than one)
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, max(t - 1, 1), (b,), generator=g) if per_row else int(torch.randint(0, t, (), generator=g))
    pos_rows = pos if per_row else torch.full((b,), pos)

    def both(p, x):
        full = spec(p, x, key_padding_mask=pad).last_hidden_state
        sel = spec(p, x, key_padding_mask=pad, select=pos).last_hidden_state
        return full[torch.arange(b), pos_rows][:, None], sel

    want, got = both(p, x)
    assert got.shape == (b, 1, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    gw = torch.func.grad(lambda p, x: both(p, x)[0].square().sum(), argnums=(0, 1))(p, x)
    gg = torch.func.grad(lambda p, x: both(p, x)[1].square().sum(), argnums=(0, 1))(p, x)
    assert_close(gg, gw, rtol=1e-4, atol=1e-4)  # float32 sums in another order; a wrong row would be O(1) off
    # per example under vmap (the unbatched path): the same rows
    if per_row:
        one = torch.func.vmap(lambda x1, m1, s1: spec(p, x1, key_padding_mask=m1, select=s1).last_hidden_state)
        torch.testing.assert_close(one(x, pad, pos), want, rtol=1e-5, atol=1e-5)


def test_select_errors():
    spec = TransformerEncoder(TransformerEncoderLayer(8, 2, 16, norm_first=True), 2)
    p, x = spec.init(key=pr.key(0)), torch.ones(2, 3, 8)
    with pytest.raises(ValueError, match="return_hidden_states"):
        spec(p, x, select=0, return_hidden_states=True)
    with pytest.raises(ValueError, match=r"position in \[0, 3\), got 3"):
        spec(p, x, select=3)
    with pytest.raises(ValueError, match=r"integer positions of shape \(2,\), got torch.float32"):
        spec(p, x, select=torch.zeros(2))
    with pytest.raises(ValueError, match="attn_mask"):
        spec(p, x, select=0, attn_mask=torch.ones(3, 3, dtype=torch.bool))


def test_drop_path_rates_and_identity_at_zero():
    assert drop_path_rates(0.3, 4) == pytest.approx([0.0, 0.1, 0.2, 0.3])
    spec = TransformerEncoder(TransformerEncoderLayer(8, 2, 16, norm_first=True), 4, drop_path_max=0.3)
    assert [spec.layer_at(i).drop_path for i in range(4)] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    p = spec.init(key=pr.key(0))
    x = rand(0, 3, 4, 8)
    zero = dataclasses.replace(spec, drop_path_max=0.0)
    # rate 0 with a key equals the deterministic pass (no other dropout configured)
    torch.testing.assert_close(zero(p, x, key=pr.key(1)).last_hidden_state, zero(p, x).last_hidden_state)
    y1 = spec(p, x, key=pr.key(1)).last_hidden_state
    assert torch.equal(y1, spec(p, x, key=pr.key(1)).last_hidden_state)


def test_seam_policies_give_identical_outputs_and_grads():
    spec = TransformerEncoder(TransformerEncoderLayer(16, 4, 32, norm_first=True, dropout=0.1), 3, final_norm=True)
    p = spec.init(key=pr.key(0))
    x = rand(1, 2, 5, 16)
    loss = lambda p: spec(p, x, key=pr.key(2)).last_hidden_state.pow(2).sum()  # noqa: E731
    base_l, base_g = loss(p), torch.func.grad(loss)(p)
    calls = []

    def counting(call, i, params, h, k, e):
        calls.append(i)
        return call(params, h, k, e)

    for policy in (counting, checkpoint_policy(), checkpoint_policy(every=2), compose(checkpoint_policy(), counting)):
        with use_policy(policy):
            leaves = {k: v.detach().clone().requires_grad_() for k, v in pytree.flatten(p).items()}
            l = loss(pytree.unflatten(leaves))
            l.backward()
        torch.testing.assert_close(l, base_l, rtol=0, atol=0)
        assert_close(pytree.unflatten({k: v.grad for k, v in leaves.items()}), base_g, rtol=1e-6, atol=1e-6)
    assert calls[:3] == [0, 1, 2]
    # checkpoint recomputes: the composed counting policy runs again in backward
    assert len(calls) == 3 + 3 + 3


def test_pooling_helpers():
    x = rand(0, 2, 4, 3)
    assert torch.equal(cls_pool(x), x[:, 0])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(mean_pool(x, mask)[0], x[0, :2].mean(0))
    torch.testing.assert_close(mean_pool(x, mask)[1], x[1].mean(0))
    ids = torch.tensor([[5, 9, 2, 0], [3, 4, 7, 9]])
    assert torch.equal(eot_pool(x, ids), torch.stack([x[0, 1], x[1, 3]]))
    assert torch.equal(eot_pool(x, ids, eot_id=7)[1], x[1, 2])


def test_attention_pooler_matches_torchmultimodal():
    from torchmultimodal.modules.layers.attention_pooler import AttentionPooler as TMMPooler
    from torchmultimodal.modules.layers.attention_pooler import CascadedAttentionPooler as TMMCascade

    spec = CascadedAttentionPooler((AttentionPooler(12, 16, 4, num_queries=5), AttentionPooler(16, 16, 4, num_queries=1)))
    p = randomize(spec.init(key=pr.key(0)), 0)
    ref = TMMCascade([TMMPooler(12, 16, 4, n_queries=5), TMMPooler(16, 16, 4, n_queries=1)]).eval()
    copy_into(ref, p, lambda k: k.replace("attn.out_proj", "attn.output_proj"))
    x = rand(1, 2, 7, 12)
    outs = spec(p, x)
    for a, b in zip(outs, ref(x)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert outs[0].shape == (2, 5, 16) and outs[1].shape == (2, 1, 16)
    check_spec(spec.poolers[0], p["poolers"][0], [x], compile=False)


def test_bad_inputs_name_what_was_expected():
    spec = TransformerEncoderLayer(16, 4, 32)
    with pytest.raises(ValueError, match=r"expected shape \(\.\.\., 16\), got \(2, 3, 8\)"):
        spec(spec.init(key=pr.key(0)), torch.ones(2, 3, 8))
    dec = TransformerDecoder(TransformerDecoderLayer(16, 4, 32), 2)
    with pytest.raises(ValueError, match="needs memory"):
        dec(dec.init(key=pr.key(0)), torch.ones(1, 2, 16))
    with pytest.raises(ValueError, match="cache with 2 layers"):
        dec(dec.init(key=pr.key(0)), torch.ones(1, 2, 16), torch.ones(1, 2, 16), cache=[{}])


def test_stack_shells_state_dict_and_torch_parity():
    from polymodal import nn as pnn

    torch.manual_seed(0)
    enc = pnn.TransformerEncoder(TransformerEncoderLayer(16, 4, 32, norm_first=True), 2, final_norm=True).eval()
    ref = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True,
                                                                       norm_first=True),
                                      2, norm=torch.nn.LayerNorm(16), enable_nested_tensor=False).eval()
    assert sorted(enc.state_dict()) == sorted(ref.state_dict())
    ref.load_state_dict(enc.state_dict())
    x = rand(0, 2, 5, 16)
    torch.testing.assert_close(enc(x).last_hidden_state, ref(x), rtol=1e-5, atol=1e-5)
    dec = pnn.TransformerDecoder(TransformerDecoderLayer(16, 4, 32), 2, cross_attention_every=2)
    assert "layers.0.multihead_attn.in_proj_weight" in dec.state_dict()
    assert not any(k.startswith("layers.1.multihead_attn") for k in dec.state_dict())
    pool = pnn.AttentionPooler(12, 16, 4, num_queries=3)
    assert pool(rand(1, 2, 7, 12)).shape == (2, 3, 16)
