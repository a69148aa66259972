"""Transformer options for other families: non-causal decoders (DETR), cross-attending encoders
(ALBEF's fusion encoder, BLIP-2's Q-Former), DETR's position embeddings on queries and keys, and
per-layer (cross-)attention weights. References: torch.nn, TorchMultimodal's layers and MDETR."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from checks import check_spec, copy_into, randomize
from polymodal.core import pytree
from polymodal.core import random as pr
from polymodal.core.layers.attention import MultiHeadAttention
from polymodal.core.layers.transformer import (
    TransformerDecoder, TransformerDecoderLayer, TransformerEncoder, TransformerEncoderLayer,
)

seeds = st.integers(0, 2**31)
few = settings(max_examples=8, deadline=None)
TOL = dict(rtol=1e-5, atol=1e-5)


def rand(seed, *shape):
    return pr.normal(pr.key(seed), shape)




# --------------------------------------------------------------------- non-causal decoder


@few
@given(st.booleans(), st.integers(1, 3), seeds)
def test_non_causal_decoder_layer_matches_torch(norm_first, b, seed):
    spec = TransformerDecoderLayer(16, 4, 32, norm_first=norm_first, is_causal=False)
    p = randomize(spec.init(key=pr.key(seed)), seed)
    ref = torch.nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=norm_first).eval()
    copy_into(ref, p)
    x, mem = rand(seed + 1, b, 5, 16), rand(seed + 2, b, 7, 16)
    pad = torch.zeros(b, 7, dtype=torch.bool)
    pad[:, 5:] = True
    with torch.no_grad():
        torch.testing.assert_close(spec(p, x, mem)[0], ref(x, mem), **TOL)  # no tgt_mask: queries see each other
        torch.testing.assert_close(spec(p, x, mem, memory_key_padding_mask=pad)[0],
                                   ref(x, mem, memory_key_padding_mask=pad), **TOL)
    assert TransformerDecoderLayer(16, 4).is_causal  # the default keeps the causal decoder


# --------------------------------------------------------------------- cross-attending encoder layers


@few
@given(st.booleans(), st.integers(1, 3), seeds)
def test_cross_attention_encoder_layer_matches_torch_non_causal_decoder_layer(norm_first, b, seed):
    # an encoder layer that cross-attends is torch's decoder layer without a target mask, names included
    spec = TransformerEncoderLayer(16, 4, 32, norm_first=norm_first, cross_attention=True)
    p = randomize(spec.init(key=pr.key(seed)), seed)
    assert sorted(p) == ["linear1", "linear2", "multihead_attn", "norm1", "norm2", "norm3", "self_attn"]
    ref = torch.nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=norm_first).eval()
    copy_into(ref, p)
    x, mem = rand(seed + 1, b, 4, 16), rand(seed + 2, b, 6, 16)
    pad = torch.arange(6) >= 4
    pad = pad.expand(b, 6)
    with torch.no_grad():
        torch.testing.assert_close(spec(p, x, mem, memory_key_padding_mask=pad)[0],
                                   ref(x, mem, memory_key_padding_mask=pad), **TOL)


def _tmm_decoder_state_dict(params, every):
    """Our stack's params under TorchMultimodal's TransformerDecoder names (q/k/v projections split)."""
    sd = {}
    for k, v in pytree.flatten(params).items():
        if k.startswith("norm."):
            sd["final_layer_norm." + k[5:]] = v
            continue
        _, i, rest = k.split(".", 2)
        pre = f"layer.{i}."
        if "in_proj" in rest:
            which = "attention" if rest.startswith("self") else "cross_attention"
            for part, name in zip(v.chunk(3), ("q_proj", "k_proj", "v_proj")):
                sd[f"{pre}{which}.{name}.{rest.rsplit('_', 1)[1]}"] = part
            continue
        rest = (rest.replace("self_attn.out_proj", "attention.output_proj").replace("multihead_attn.", "cross_attention.")
                .replace("out_proj", "output_proj").replace("linear1", "feedforward.model.0")
                .replace("linear2", "feedforward.model.2"))
        has_cross = int(i) % every == 0
        head, _, tail = rest.partition(".")
        head = {"norm1": "attention_layernorm", "norm2": "cross_attention_layernorm" if has_cross else "feedforward_layernorm",
                "norm3": "feedforward_layernorm"}.get(head, head)
        sd[pre + head + "." + tail] = v
    return sd


@pytest.mark.parametrize("norm_first,dim_kv", [(True, 16), (False, 16), (True, 12), (False, 12)])
def test_cross_attention_every_k_encoder_matches_torchmultimodal(norm_first, dim_kv):
    # TorchMultimodal's decoder without a self-attention mask is a Q-Former-style encoder (cross every 2nd layer)
    from torchmultimodal.modules.layers.transformer import TransformerDecoder as TMMDecoder

    ref = TMMDecoder(4, 16, 4, 32, layer_norm_eps=1e-5, norm_first=norm_first, dim_kv=dim_kv,
                     cross_attention_interval=2, final_layer_norm_eps=1e-5 if norm_first else None).eval()
    spec = TransformerEncoder(TransformerEncoderLayer(16, 4, 32, norm_first=norm_first, dim_kv=dim_kv), 4,
                              final_norm=norm_first, cross_attention_every=2)
    p = randomize(spec.init(key=pr.key(3)), 3)
    missing, unexpected = ref.load_state_dict(_tmm_decoder_state_dict(p, 2), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    x, mem = rand(1, 2, 5, 16), rand(2, 2, 6, dim_kv)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 3:] = True
    with torch.no_grad():
        torch.testing.assert_close(spec(p, x, mem).last_hidden_state, ref(x, mem).last_hidden_state, **TOL)
        # TorchMultimodal's stack does not pass cross_attention_mask on to its layers: run them by hand
        h = x
        for layer in ref.layer:
            h = layer(h, mem, cross_attention_mask=~pad[:, None, None, :])[0]
        want = ref.final_layer_norm(h) if norm_first else h
        got = spec(p, x, mem, memory_key_padding_mask=pad).last_hidden_state
    torch.testing.assert_close(got, want, **TOL)


@few
@given(st.integers(1, 5), st.integers(1, 3), st.booleans(), seeds)
def test_cross_attention_every_k_equals_a_hand_loop_of_layers(layers, every, norm_first, seed):
    layer = TransformerEncoderLayer(8, 2, 16, norm_first=norm_first, dim_kv=6)
    spec = TransformerEncoder(layer, layers, cross_attention_every=every, final_norm=True)
    p = randomize(spec.init(key=pr.key(seed)), seed)
    x, mem = rand(seed + 1, 2, 3, 8), rand(seed + 2, 2, 4, 6)
    pad = torch.tensor([[False] * 4, [False, False, True, True]])
    out = spec(p, x, mem, memory_key_padding_mask=pad, return_attention_weights=True, return_hidden_states=True)
    h, selfs, crosses = x, [], []
    for i, lp in enumerate(p["layers"]):
        cross = i % every == 0
        assert ("multihead_attn" in lp) == cross and ("norm3" in lp) == cross
        one = TransformerEncoderLayer(8, 2, 16, norm_first=norm_first, dim_kv=6, cross_attention=cross)
        if cross:
            h, (ws, wc) = one(lp, h, mem, memory_key_padding_mask=pad, need_weights=True)
        else:
            h, ws = one(lp, h, need_weights=True)
            wc = None
        torch.testing.assert_close(out.hidden_states[i + 1], h)
        selfs.append(ws)
        crosses.append(wc)
    h = layer._norm()(p["norm"], h)
    torch.testing.assert_close(out.last_hidden_state, h)
    for a, b in zip(out.attentions, selfs):
        torch.testing.assert_close(a, b)
    assert [w is None for w in out.cross_attentions] == [c is None for c in crosses]
    for a, b in zip(out.cross_attentions, crosses):
        if b is not None:
            torch.testing.assert_close(a, b)
            assert a.shape == (2, 2, 3, 4)
            torch.testing.assert_close(a.sum(-1), torch.ones(2, 2, 3))
            assert torch.all(a[1, ..., 2:] == 0)  # padded memory positions get no weight


@settings(max_examples=4, deadline=None)
@given(st.booleans(), st.booleans(), seeds)
def test_cross_attention_encoder_check_spec(norm_first, with_pos, seed):
    spec = TransformerEncoder(TransformerEncoderLayer(8, 2, 16, norm_first=norm_first, dim_kv=6), 2,
                              cross_attention_every=1, final_norm=norm_first)
    p = randomize(spec.init(key=pr.key(seed)), seed)
    x, mem = rand(seed + 1, 2, 3, 8), rand(seed + 2, 2, 4, 6)
    kwargs = {"pos": rand(seed + 3, 3, 8), "memory_pos": rand(seed + 4, 4, 6)} if with_pos else {}
    check_spec(spec, p, [x, mem], kwargs, compile=seed % 2 == 0, atol=1e-5)


def test_encoder_cross_attention_errors():
    spec = TransformerEncoder(TransformerEncoderLayer(8, 2, 16, dim_kv=6), 2, cross_attention_every=2)
    p = spec.init(key=pr.key(0))
    with pytest.raises(ValueError, match=r"layers \[0\] cross-attend; expected memory"):
        spec(p, torch.ones(1, 3, 8))
    plain = TransformerEncoder(TransformerEncoderLayer(8, 2, 16), 2)
    with pytest.raises(ValueError, match="no layer cross-attends"):
        plain(plain.init(key=pr.key(0)), torch.ones(1, 3, 8), torch.ones(1, 4, 8))
    with pytest.raises(ValueError, match=r"kv: expected shape \(1, S, 6\), got \(1, 4, 8\)"):
        spec(p, torch.ones(1, 3, 8), torch.ones(1, 4, 8))
    with pytest.raises(ValueError, match=r"query_pos: expected a shape broadcastable to \(1, 3, 8\), got \(4, 8\)"):
        spec(p, torch.ones(1, 3, 8), torch.ones(1, 4, 6), pos=torch.ones(4, 8))


# --------------------------------------------------------------------- DETR / MDETR position embeddings


def _mdetr_state_dict(params, decoder: bool, prefix: str = ""):
    out = {}
    for k, v in pytree.flatten(params).items():
        k = k.replace("linear1", "mlp.model.0").replace("linear2", "mlp.model.2")
        k = k.replace("multihead_attn", "cross_attn_image")
        if decoder:
            parts = k.split(".")
            j = 2 if parts[0] == "layers" else 0
            parts[j] = {"norm2": "norm3", "norm3": "norm4"}.get(parts[j], parts[j])
            k = ".".join(parts)
        out[prefix + k] = v
    return out


def _seq_first(t):
    return None if t is None else t.transpose(0, 1)


@few
@given(st.integers(1, 3), st.integers(1, 5), seeds)
def test_encoder_layer_with_pos_matches_mdetr(b, t, seed):
    from torchmultimodal.models.mdetr.transformer import TransformerEncoderLayer as MDETREncoderLayer

    spec = TransformerEncoderLayer(16, 4, 32)
    p = randomize(spec.init(key=pr.key(seed)), seed)
    ref = MDETREncoderLayer(16, 4, 32, dropout=0.0).eval()
    assert not ref.load_state_dict(_mdetr_state_dict(p, False), strict=True).missing_keys
    x, pos = rand(seed + 1, b, t, 16), rand(seed + 2, b, t, 16)
    pad = (torch.arange(t) >= max(t - 1, 1)).expand(b, t)
    with torch.no_grad():
        want = _seq_first(ref(_seq_first(x), src_key_padding_mask=pad, pos=_seq_first(pos)))
    torch.testing.assert_close(spec(p, x, key_padding_mask=pad, pos=pos)[0], want, **TOL)


@few
@given(st.integers(1, 3), seeds)
def test_decoder_layer_with_pos_and_query_pos_matches_mdetr(b, seed):
    from torchmultimodal.models.mdetr.transformer import TransformerDecoderLayer as MDETRDecoderLayer

    spec = TransformerDecoderLayer(16, 4, 32, is_causal=False)
    p = randomize(spec.init(key=pr.key(seed)), seed)
    ref = MDETRDecoderLayer(16, 4, 32, dropout=0.0).eval()
    ref.load_state_dict(_mdetr_state_dict(p, True), strict=True)
    tgt, mem = rand(seed + 1, b, 3, 16), rand(seed + 2, b, 6, 16)
    pos, query_pos = rand(seed + 3, b, 6, 16), rand(seed + 4, b, 3, 16)
    pad = (torch.arange(6) >= 4).expand(b, 6)
    with torch.no_grad():
        want = _seq_first(ref(_seq_first(tgt), _seq_first(mem), memory_key_padding_mask=pad, pos=_seq_first(pos),
                              query_pos=_seq_first(query_pos)))
    got = spec(p, tgt, mem, memory_key_padding_mask=pad, pos=pos, query_pos=query_pos)[0]
    torch.testing.assert_close(got, want, **TOL)


def test_stacks_with_positions_match_mdetr_encoder_and_decoder():
    from torchmultimodal.models.mdetr.transformer import TransformerDecoder as MDETRDecoder
    from torchmultimodal.models.mdetr.transformer import TransformerDecoderLayer as MDETRDecoderLayer
    from torchmultimodal.models.mdetr.transformer import TransformerEncoder as MDETREncoder
    from torchmultimodal.models.mdetr.transformer import TransformerEncoderLayer as MDETREncoderLayer

    enc = TransformerEncoder(TransformerEncoderLayer(16, 4, 32), 2)
    dec = TransformerDecoder(TransformerDecoderLayer(16, 4, 32, is_causal=False), 3, final_norm=True)
    pe, pd = randomize(enc.init(key=pr.key(1)), 1), randomize(dec.init(key=pr.key(2)), 200)
    ref_enc = MDETREncoder(MDETREncoderLayer(16, 4, 32, dropout=0.0), 2).eval()
    ref_dec = MDETRDecoder(MDETRDecoderLayer(16, 4, 32, dropout=0.0), 3, torch.nn.LayerNorm(16),
                           return_intermediate=False).eval()
    ref_enc.load_state_dict(_mdetr_state_dict(pe, False), strict=True)
    ref_dec.load_state_dict(_mdetr_state_dict(pd, True), strict=True)
    src, pos = rand(3, 2, 7, 16), rand(4, 2, 7, 16)
    queries = rand(5, 4, 16)  # DETR's learned object queries: (N, D), broadcast over the batch
    tgt = torch.zeros(2, 4, 16)
    pad = torch.tensor([[False] * 7, [False] * 5 + [True] * 2])
    memory = enc(pe, src, key_padding_mask=pad, pos=pos).last_hidden_state
    out = dec(pd, tgt, memory, memory_key_padding_mask=pad, pos=pos, query_pos=queries)
    with torch.no_grad():
        ref_mem = ref_enc(_seq_first(src), src_key_padding_mask=pad, pos=_seq_first(pos))
        want = ref_dec(_seq_first(tgt), ref_mem, memory_key_padding_mask=pad, pos=_seq_first(pos),
                       query_pos=queries[:, None].expand(4, 2, 16))
    torch.testing.assert_close(memory, _seq_first(ref_mem), **TOL)
    torch.testing.assert_close(out.last_hidden_state, _seq_first(want), **TOL)


@settings(max_examples=4, deadline=None)
@given(st.booleans(), seeds)
def test_positions_check_spec(norm_first, seed):
    spec = TransformerDecoder(TransformerDecoderLayer(8, 2, 16, is_causal=False, norm_first=norm_first), 2)
    p = randomize(spec.init(key=pr.key(seed)), seed)
    x, mem = rand(seed + 1, 2, 3, 8), rand(seed + 2, 2, 5, 8)
    check_spec(spec, p, [x, mem], {"pos": rand(seed + 3, 5, 8), "query_pos": rand(seed + 4, 3, 8)},
               compile=seed % 2 == 0, atol=1e-5)


@few
@given(st.booleans(), seeds)
def test_attention_positions_go_to_queries_and_keys_not_values(cross, seed):
    mha = MultiHeadAttention(16, 4)
    p = randomize(mha.init(key=pr.key(seed)), seed)
    ref = torch.nn.MultiheadAttention(16, 4, batch_first=True).eval()
    copy_into(ref, p)
    x = rand(seed + 1, 2, 3, 16)
    kv = rand(seed + 2, 2, 5, 16) if cross else x
    qp, kp = rand(seed + 3, 2, 3, 16), rand(seed + 4, 2, kv.shape[1], 16)
    with torch.no_grad():
        want = ref(x + qp, kv + kp, kv, need_weights=False)[0]
    got = mha(p, x, kv if cross else None, query_pos=qp, key_pos=kp).output
    torch.testing.assert_close(got, want, **TOL)


@few
@given(st.integers(1, 3), st.integers(1, 3), st.integers(0, 2), seeds)
def test_cached_decoding_with_query_pos_equals_the_full_pass(layers, prompt, every, seed):
    spec = TransformerDecoder(TransformerDecoderLayer(16, 4, 32, norm_first=True, dim_kv=12), layers,
                              cross_attention_every=every, final_norm=True)
    p = randomize(spec.init(key=pr.key(seed)), seed)
    n = prompt + 3
    x, mem = rand(seed + 1, 2, n, 16), rand(seed + 2, 2, 4, 12)
    qpos, mpos = rand(seed + 3, 2, n, 16), rand(seed + 4, 2, 4, 12)
    full = spec(p, x, mem, pos=mpos, query_pos=qpos).last_hidden_state
    out = spec(p, x[:, :prompt], mem, pos=mpos, query_pos=qpos[:, :prompt], use_cache=True)
    steps, cache = [out.last_hidden_state], out.cache
    for t in range(prompt, n):
        out = spec(p, x[:, t:t + 1], mem, pos=mpos, query_pos=qpos[:, t:t + 1], cache=cache)
        steps.append(out.last_hidden_state)
        cache = out.cache
    torch.testing.assert_close(torch.cat(steps, 1), full, **TOL)


def test_decoder_returns_self_and_cross_weights_per_layer():
    spec = TransformerDecoder(TransformerDecoderLayer(8, 2, 16, dim_kv=6), 3, cross_attention_every=2)
    p = spec.init(key=pr.key(0))
    out = spec(p, rand(1, 2, 4, 8), rand(2, 2, 5, 6), return_attention_weights=True)
    assert [tuple(w.shape) for w in out.attentions] == [(2, 2, 4, 4)] * 3
    assert torch.all(out.attentions[0].triu(1) == 0)  # causal by default
    assert [None if w is None else tuple(w.shape) for w in out.cross_attentions] == [(2, 2, 4, 5), None, (2, 2, 4, 5)]
    plain = TransformerEncoder(TransformerEncoderLayer(8, 2, 16), 2)
    out = plain(plain.init(key=pr.key(0)), rand(3, 1, 4, 8), return_attention_weights=True)
    assert out.cross_attentions is None and len(out.attentions) == 2


@few
@given(st.booleans(), st.integers(0, 2), seeds)
def test_select_with_cross_attention_equals_rows_of_the_full_output(norm_first, row, seed):
    spec = TransformerEncoder(TransformerEncoderLayer(8, 2, 16, norm_first=norm_first, dim_kv=6), 2,
                              cross_attention_every=1)
    p = randomize(spec.init(key=pr.key(seed)), seed)
    x, mem = rand(seed + 1, 2, 3, 8), rand(seed + 2, 2, 4, 6)
    pad = torch.tensor([[False] * 4, [False, True, True, True]])
    full = spec(p, x, mem, memory_key_padding_mask=pad).last_hidden_state
    one = spec(p, x, mem, memory_key_padding_mask=pad, select=row).last_hidden_state
    torch.testing.assert_close(one, full[:, row:row + 1], **TOL)


def test_encoder_layer_memory_errors():
    fusion = TransformerEncoderLayer(8, 2, 16, cross_attention=True, dim_kv=6)
    with pytest.raises(ValueError, match=r"cross_attention=True needs memory \(B, S, 6\), got None"):
        fusion(fusion.init(key=pr.key(0)), torch.ones(1, 3, 8))
    plain = TransformerEncoderLayer(8, 2, 16)
    with pytest.raises(ValueError, match="memory was given but this layer has no cross-attention"):
        plain(plain.init(key=pr.key(0)), torch.ones(1, 3, 8), torch.ones(1, 4, 8))
