"""MultiHeadAttention and attention: parity (torch.nn, TorchMultimodal), properties, generic checks, errors."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torchmultimodal.modules.layers.multi_head_attention import MultiHeadAttentionWithCache, MultiHeadSelfAttention

from checks import check_spec, copy_into
from polymodal import nn as pnn
from polymodal.core import random as pr
from polymodal.core.pytree import flatten
from polymodal.core.layers import MultiHeadAttention, attention, merge_heads, split_heads

seeds = st.integers(0, 2**32)
heads = st.integers(1, 3)
head_dims = st.integers(1, 5)
lens = st.integers(1, 6)
batch = st.integers(1, 3)


def x_of(seed, *shape):
    return pr.normal(pr.key(seed), shape)


def some_mask(seed, *shape):
    """A random bool mask (True = attend) whose rows each keep at least their last key."""
    m = pr.uniform(pr.key(seed), shape) < 0.6
    return m | (torch.arange(shape[-1]) == shape[-1] - 1)


def with_biases(spec, seed):
    """Params with non-zero biases (the torch init zeroes them, which would hide bias bugs)."""
    p = spec.init(key=pr.key(seed))
    return {k: ({kk: vv + 0.1 * x_of(seed + 7, *vv.shape) for kk, vv in v.items()} if isinstance(v, dict)
                else v + 0.1 * x_of(seed + 9, *v.shape)) for k, v in p.items()}


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@given(batch, lens, lens, heads, head_dims, st.booleans(), st.sampled_from([None, "bool", "float"]),
       st.booleans(), st.booleans(), seeds)
def test_matches_torch_multihead_attention(b, t, s, h, dh, bias, mask_kind, padding, cross, seed):
    d = h * dh
    spec = MultiHeadAttention(d, h, bias=bias, out_bias=bias)
    p = with_biases(spec, seed)
    ref = torch.nn.MultiheadAttention(d, h, bias=bias, batch_first=True).train()  # train: no native fast path
    copy_into(ref, p)  # same key names, strict
    x = x_of(seed + 1, b, t, d)
    kv = x_of(seed + 2, b, s, d) if cross else x
    sk = kv.shape[1]
    mask = {None: None, "bool": some_mask(seed + 3, t, sk), "float": x_of(seed + 3, t, sk)}[mask_kind]
    kpm = ~some_mask(seed + 4, b, sk) if padding else None
    ref_mask = ~mask if mask_kind == "bool" else mask  # torch.nn's bool masks say True = masked
    want, want_w = ref(x, kv, kv, key_padding_mask=kpm, attn_mask=ref_mask, average_attn_weights=False)
    got = spec(p, x, kv if cross else None, attn_mask=mask, key_padding_mask=kpm, need_weights=True)
    torch.testing.assert_close(got.output, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.weights, want_w, rtol=1e-5, atol=1e-6)
    fast = spec(p, x, kv if cross else None, attn_mask=mask, key_padding_mask=kpm)  # SDPA path
    assert fast.weights is None and fast.cache is None
    torch.testing.assert_close(fast.output, want, rtol=1e-5, atol=1e-5)


@given(batch, lens, lens, heads, head_dims, st.integers(1, 7), seeds)
def test_cross_attention_with_other_kv_width_matches_torch(b, t, s, h, dh, extra, seed):
    d, dkv = h * dh, h * dh + extra
    spec = MultiHeadAttention(d, h, dim_kv=dkv)
    assert not spec.fused
    p = with_biases(spec, seed)
    ref = torch.nn.MultiheadAttention(d, h, kdim=dkv, vdim=dkv, batch_first=True).train()
    ref.load_state_dict({
        "q_proj_weight": p["q_proj"]["weight"], "k_proj_weight": p["k_proj"]["weight"],
        "v_proj_weight": p["v_proj"]["weight"], "out_proj.weight": p["out_proj"]["weight"],
        "out_proj.bias": p["out_proj"]["bias"],
        "in_proj_bias": torch.cat([p[n]["bias"] for n in ("q_proj", "k_proj", "v_proj")]),
    })
    x, kv = x_of(seed + 1, b, t, d), x_of(seed + 2, b, s, dkv)
    torch.testing.assert_close(spec(p, x, kv).output, ref(x, kv, kv)[0], rtol=1e-5, atol=1e-5)


def _tmm_names(k):
    return k.replace("out_proj", "output_proj")


@given(batch, lens, heads, head_dims, st.booleans(), seeds)
def test_matches_torchmultimodal_with_cache(b, t, h, dh, add_bias, seed):
    d = h * dh
    spec = MultiHeadAttention(d, h, fused_qkv=False, bias=add_bias)
    p = with_biases(spec, seed)
    ref = MultiHeadAttentionWithCache(d, d, h, add_bias=add_bias).eval()
    copy_into(ref, p, _tmm_names)
    x = x_of(seed + 1, b, t, d)
    want = ref(x, x, x, is_causal=True, use_cache=True)
    got = spec(p, x, is_causal=True, use_cache=True)
    torch.testing.assert_close(got.output, want.attn_output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((got.cache["k"], got.cache["v"]), want.past_key_value)
    # One new token with TorchMultimodal's past_key_value: a single query sees every position, which
    # is exactly our bottom-right causal mask (TorchMultimodal passes is_causal=False here).
    y = x_of(seed + 2, b, 1, d)
    want2 = ref(y, y, y, past_key_value=want.past_key_value, use_cache=True)
    got2 = spec(p, y, cache=got.cache, is_causal=True)
    torch.testing.assert_close(got2.output, want2.attn_output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((got2.cache["k"], got2.cache["v"]), want2.past_key_value)


@given(batch, lens, lens, heads, head_dims, st.integers(1, 7), seeds)
def test_cross_attention_matches_torchmultimodal(b, t, s, h, dh, dkv, seed):
    d = h * dh
    spec = MultiHeadAttention(d, h, dim_kv=dkv, fused_qkv=False)
    p = with_biases(spec, seed)
    ref = MultiHeadAttentionWithCache(d, dkv, h).eval()
    copy_into(ref, p, _tmm_names)
    x, kv = x_of(seed + 1, b, t, d), x_of(seed + 2, b, s, dkv)
    torch.testing.assert_close(spec(p, x, kv).output, ref(x, kv, kv), rtol=1e-5, atol=1e-5)


@given(batch, lens, heads, head_dims, st.sampled_from([None, "bool", "float", "causal"]), seeds)
def test_matches_torchmultimodal_self_attention(b, t, h, dh, mask_kind, seed):
    d = h * dh
    spec = MultiHeadAttention(d, h)
    p = with_biases(spec, seed)
    ref = MultiHeadSelfAttention(d, h).eval()
    copy_into(ref, p, lambda k: {"in_proj_weight": "input_proj.weight", "in_proj_bias": "input_proj.bias"}.get(
        k, _tmm_names(k)))
    x = x_of(seed + 1, b, t, d)
    mask = {"bool": some_mask(seed + 3, b, 1, t, t), "float": x_of(seed + 3, b, h, t, t)}.get(mask_kind)
    causal = mask_kind == "causal"
    want = ref(x, attn_mask=mask, is_causal=causal)
    torch.testing.assert_close(spec(p, x, attn_mask=mask, is_causal=causal).output, want, rtol=1e-5, atol=1e-5)


# --- properties ---------------------------------------------------------------------------------


@given(batch, lens, lens, heads, head_dims, seeds)
def test_permutation_equivariance(b, t, s, h, dh, seed):
    d = h * dh
    spec = MultiHeadAttention(d, h)
    p = with_biases(spec, seed)
    x, kv = x_of(seed + 1, b, t, d), x_of(seed + 2, b, s, d)
    out = spec(p, x, kv).output
    perm_kv = pr.permutation(pr.key(seed + 3), s)
    torch.testing.assert_close(spec(p, x, kv[:, perm_kv]).output, out, rtol=1e-5, atol=1e-6)  # keys+values together
    perm_q = pr.permutation(pr.key(seed + 4), t)
    torch.testing.assert_close(spec(p, x[:, perm_q], kv).output, out[:, perm_q], rtol=1e-5, atol=1e-6)
    self_out = spec(p, x).output  # self-attention: permuting tokens permutes the outputs
    torch.testing.assert_close(spec(p, x[:, perm_q]).output, self_out[:, perm_q], rtol=1e-5, atol=1e-6)


@given(batch, st.integers(2, 7), heads, head_dims, st.booleans(), seeds)
def test_causal_outputs_ignore_future_tokens(b, t, h, dh, weights, seed):
    d = h * dh
    spec = MultiHeadAttention(d, h, is_causal=True)
    p = with_biases(spec, seed)
    x = x_of(seed + 1, b, t, d)
    cut = int(pr.randint(pr.key(seed + 2), (), 1, t))
    x2 = torch.cat([x[:, :cut], x_of(seed + 3, b, t - cut, d)], dim=1)
    a, a2 = spec(p, x, need_weights=weights), spec(p, x2, need_weights=weights)
    torch.testing.assert_close(a.output[:, :cut], a2.output[:, :cut], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a.output[:, cut:], a2.output[:, cut:])


@given(batch, st.integers(1, 6), st.integers(1, 3), heads, head_dims, st.sampled_from([None, 1]),
       st.booleans(), seeds)
def test_incremental_decoding_equals_full_causal_pass(b, t, prompt, h, dh, kv_heads, fused, seed):
    d = h * dh
    spec = MultiHeadAttention(d, h, num_kv_heads=kv_heads, fused_qkv=fused, is_causal=True)
    p = with_biases(spec, seed)
    x = x_of(seed + 1, b, prompt + t, d)
    full = spec(p, x).output
    first = spec(p, x[:, :prompt], use_cache=True)
    outs, cache = [first.output], first.cache
    for i in range(prompt, prompt + t):  # one token at a time
        step = spec(p, x[:, i:i + 1], cache=cache)
        outs.append(step.output)
        cache = step.cache
    assert cache["k"].shape == (b, spec.kv_heads, prompt + t, dh)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-5, atol=1e-5)


def test_cross_attention_cache_is_reused_with_kv_none():
    spec = MultiHeadAttention(8, 2, dim_kv=8)
    p = with_biases(spec, 0)
    x, mem = x_of(1, 2, 3, 8), x_of(2, 2, 5, 8)
    first = spec(p, x[:, :1], mem, use_cache=True)
    assert first.cache["static"].shape == (2, 0)
    later = spec(p, x[:, 1:], cache=first.cache)  # kv=None: reuses the memory's keys/values
    torch.testing.assert_close(later.output, spec(p, x[:, 1:], mem).output)
    assert later.cache["k"] is first.cache["k"]
    self_spec = MultiHeadAttention(8, 2)  # a self-attention cache (no "static") is appended to
    c = self_spec(p, x[:, :1], use_cache=True).cache
    assert self_spec(p, x[:, 1:], cache=c).cache["k"].shape[2] == 3


@given(batch, lens, lens, st.sampled_from([(2, 1), (4, 2), (3, 3), (6, 2)]), head_dims, st.booleans(), seeds)
def test_grouped_query_attention_equals_repeated_heads(b, t, s, hs, dh, weights, seed):
    h, hkv = hs
    q, k, v = x_of(seed, b, h, t, dh), x_of(seed + 1, b, hkv, s, dh), x_of(seed + 2, b, hkv, s, dh)
    rep = lambda z: z.repeat_interleave(h // hkv, dim=1)  # noqa: E731
    out, w = attention(q, k, v, need_weights=weights)
    want, want_w = attention(q, rep(k), rep(v), need_weights=weights)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    # the spec: GQA projections equal full-head projections with each kv head's rows repeated
    spec = MultiHeadAttention(h * dh, h, num_kv_heads=hkv, fused_qkv=False)
    full = MultiHeadAttention(h * dh, h, fused_qkv=False)
    p = with_biases(spec, seed)
    rep_rows = lambda z: z.unflatten(0, (hkv, -1)).repeat_interleave(h // hkv, 0).flatten(0, 1)  # noqa: E731
    pf = {**p, "k_proj": {n: rep_rows(z) for n, z in p["k_proj"].items()},
          "v_proj": {n: rep_rows(z) for n, z in p["v_proj"].items()}}
    x = x_of(seed + 3, b, t, h * dh)
    torch.testing.assert_close(spec(p, x).output, full(pf, x).output, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("need_weights", [False, True])
def test_fully_masked_rows_are_zero_and_gradients_finite(need_weights):
    q, k, v = x_of(0, 2, 2, 3, 4), x_of(1, 2, 2, 5, 4), x_of(2, 2, 2, 5, 4)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1] = True  # example 1: every key is padding
    out, w = attention(q, k, v, key_padding_mask=kpm, need_weights=need_weights)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and out[0].abs().sum() > 0
    if need_weights:
        assert torch.equal(w[1], torch.zeros_like(w[1]))
    fm = torch.zeros(3, 5)
    fm[0] = float("-inf")  # a float mask whose first query row is fully masked
    qg = q.clone().requires_grad_()
    out2, _ = attention(qg, k, v, mask=fm, need_weights=need_weights)
    assert torch.equal(out2[:, :, 0], torch.zeros_like(out2[:, :, 0]))
    (g,) = torch.autograd.grad(out2.sum(), qg)
    assert torch.isfinite(g).all()
    # causal with more queries than keys: the first Tq - Tk queries see nothing
    out3, _ = attention(x_of(3, 1, 1, 7, 4), k[:1, :1], v[:1, :1], is_causal=True, need_weights=need_weights)
    assert torch.equal(out3[:, :, :2], torch.zeros_like(out3[:, :, :2])) and out3[:, :, 2:].abs().sum() > 0


@given(batch, lens, lens, st.integers(2, 4), head_dims, seeds)
def test_head_mask_removes_a_head(b, t, s, h, dh, seed):
    q, k, v = x_of(seed, b, h, t, dh), x_of(seed + 1, b, h, s, dh), x_of(seed + 2, b, h, s, dh)
    off = int(pr.randint(pr.key(seed + 3), (), 0, h))
    hm = torch.ones(h)
    hm[off] = 0.0
    out, w = attention(q, k, v, head_mask=hm, need_weights=True)
    full, _ = attention(q, k, v)
    assert torch.equal(out[:, off], torch.zeros_like(out[:, off])) and torch.equal(w[:, off], torch.zeros_like(w[:, off]))
    keep = [i for i in range(h) if i != off]
    torch.testing.assert_close(out[:, keep], full[:, keep], rtol=1e-5, atol=1e-6)
    # through the spec: masking a head equals zeroing its columns of the output projection
    spec = MultiHeadAttention(h * dh, h)
    p = with_biases(spec, seed)
    x = x_of(seed + 4, b, t, h * dh)
    w_out = p["out_proj"]["weight"].unflatten(1, (h, dh)).clone()
    w_out[:, off] = 0.0
    p_off = {**p, "out_proj": {"weight": w_out.flatten(1), "bias": p["out_proj"]["bias"]}}
    torch.testing.assert_close(spec(p, x, head_mask=hm).output, spec(p_off, x).output, rtol=1e-5, atol=1e-6)


@given(st.floats(0.05, 0.9), seeds)
def test_dropout_is_keyed(rate, seed):
    spec = MultiHeadAttention(8, 2, dropout=rate)
    p = with_biases(spec, seed)
    x = x_of(seed + 1, 3, 6, 8)
    k = pr.key(seed + 2)
    a, b = spec(p, x, key=k, need_weights=True), spec(p, x, key=k, need_weights=True)
    assert torch.equal(a.output, b.output) and torch.equal(a.weights, b.weights)
    c = spec(p, x, key=pr.key(seed + 3))
    assert not torch.equal(a.output, c.output)
    plain = MultiHeadAttention(8, 2)(p, x)
    torch.testing.assert_close(spec(p, x).output, plain.output, rtol=0, atol=0)  # key=None: no dropout
    ref = MultiHeadAttention(8, 2)(p, x, need_weights=True).weights
    kept = a.weights != 0
    torch.testing.assert_close(a.weights[kept], (ref / (1 - rate))[kept])  # survivors rescaled
    assert abs(kept.float().mean() - (1 - rate)) < 0.2


def test_split_merge_heads_and_unbatched_calls():
    x = x_of(0, 2, 5, 12)
    assert split_heads(x, 3).shape == (2, 3, 5, 4)
    assert torch.equal(merge_heads(split_heads(x, 3)), x)
    assert torch.equal(split_heads(x, 3)[:, 1], x[..., 4:8])
    spec = MultiHeadAttention(12, 3, dim_kv=6, num_kv_heads=1)
    p = with_biases(spec, 0)
    kv, kpm = x_of(1, 2, 4, 6), torch.tensor([[False] * 4, [False, False, True, True]])
    batched = spec(p, x, kv, key_padding_mask=kpm, need_weights=True, use_cache=True)
    one = spec(p, x[1], kv[1], key_padding_mask=kpm[1], need_weights=True, use_cache=True)
    torch.testing.assert_close(one.output, batched.output[1])
    torch.testing.assert_close(one.weights, batched.weights[1])
    assert one.cache["k"].shape == (1, 4, 4) and one.cache["static"].shape == (0,)


@pytest.mark.parametrize("cfg", [
    dict(), dict(fused_qkv=False, bias=False), dict(num_kv_heads=1, is_causal=True), dict(dim_kv=5),
    dict(head_dim=3, out_bias=False, weight_init="trunc_normal"),
])
@given(batch, lens, seeds)
def test_check_spec(cfg, b, t, seed):
    spec = MultiHeadAttention(8, 2, **cfg)
    p = with_biases(spec, seed)
    x = x_of(seed + 1, b, t, 8)
    inputs = [x, x_of(seed + 2, b, t + 1, 5)] if "dim_kv" in cfg else [x]
    check_spec(spec, p, inputs, compile=b == 1, atol=1e-5)
    if "dim_kv" not in cfg:  # the math path (weights) and explicit causal flag
        check_spec(spec, p, [x], {"need_weights": True, "is_causal": True}, compile=False, atol=1e-5)
    shell = pnn.MultiHeadAttention(8, 2, **cfg)
    assert sorted(shell.state_dict()) == sorted(flatten(spec.init(key=pr.key(0))))


def test_torch_init_matches_torch_statistics_and_shell_loads_torch_state_dict():
    p = MultiHeadAttention(64, 4).init(key=pr.key(0))
    bound = (6 / (64 + 192)) ** 0.5  # xavier_uniform over the (3D, D) in-projection, as torch
    assert p["in_proj_weight"].abs().max() <= bound and p["in_proj_weight"].abs().max() > 0.9 * bound
    assert torch.equal(p["in_proj_bias"], torch.zeros(192)) and torch.equal(p["out_proj"]["bias"], torch.zeros(64))
    ref = torch.nn.MultiheadAttention(64, 4, batch_first=True)
    shell = pnn.MultiHeadAttention(64, 4)
    shell.load_state_dict(ref.state_dict())  # strict: same names and shapes
    x = x_of(1, 2, 3, 64)
    torch.testing.assert_close(shell.eval()(x).output, ref.train()(x, x, x)[0], rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise_named_errors():
    spec = MultiHeadAttention(64, 4)
    p = spec.init(key=pr.key(0))
    with pytest.raises(ValueError, match=r"MultiHeadAttention: x: expected shape \(B, T, 64\), got \(2, 5, 32\)"):
        spec(p, torch.ones(2, 5, 32))
    with pytest.raises(ValueError, match=r"x: expected shape \(B, T, 64\), got \(64,\)"):
        spec(p, torch.ones(64))
    with pytest.raises(ValueError, match=r"kv: expected shape \(2, S, 64\), got \(3, 4, 64\)"):
        spec(p, torch.ones(2, 5, 64), torch.ones(3, 4, 64))
    with pytest.raises(ValueError, match=r"key_padding_mask: expected shape \(2, S\), got \(5,\)"):
        spec(p, torch.ones(2, 5, 64), key_padding_mask=torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"cache\['k'\]: expected shape \(2, 4, S, 16\), got \(2, 4, 3, 8\)"):
        spec(p, torch.ones(2, 1, 64), cache={"k": torch.ones(2, 4, 3, 8), "v": torch.ones(2, 4, 3, 8)})
    with pytest.raises(ValueError, match=r"dim_kv=32 != dim_q=64"):
        MultiHeadAttention(64, 4, dim_kv=32)(MultiHeadAttention(64, 4, dim_kv=32).init(key=pr.key(0)), torch.ones(2, 5, 64))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        MultiHeadAttention(10, 4)
    with pytest.raises(ValueError, match=r"num_kv_heads \(3\) must divide num_heads \(4\)"):
        MultiHeadAttention(64, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match=r"attention: k: expected shape \(2, Hkv dividing 4, Tk, 8\), got \(2, 3, 5, 8\)"):
        attention(torch.ones(2, 4, 5, 8), torch.ones(2, 3, 5, 8), torch.ones(2, 3, 5, 8))
    with pytest.raises(ValueError, match=r"attention: q: expected shape \(B, H, T, D\), got \(4, 5, 8\)"):
        attention(torch.ones(4, 5, 8), torch.ones(4, 5, 8), torch.ones(4, 5, 8))
    with pytest.raises(TypeError, match="floating-point"):
        spec(p, torch.ones(2, 5, 64, dtype=torch.int64))
