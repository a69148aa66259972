"""Generation on the preallocated KV cache (``core/encoders/gpt_decode.py``): step logits equal the full
pass, sampled tokens equal the joint-vocabulary sampler of the growing-cache path and the no-cache
path for the same key, and the compiled step gives the same tokens.

The reference sampler below is the generation loop before the static cache (``MultimodalGPT.prefill``
/ ``step`` with ``torch.cat`` caches, ``sample_logits`` over the joint vocabulary with that step's
Gumbel noise): the output-vocabulary-only logits must sample the same tokens.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from polymodal.core import random as pr
from polymodal.core.encoders import gpt_decode
from polymodal.core.encoders.gpt_generate import generate, sample_logits
from polymodal.core.layers import linear_kernel as lk
from polymodal.models.mugen import text_video_gpt

TEXT_TOKENS, TEXT_LEN, LATENT, CODES = 11, 4, (2, 2, 3), 9


def model(seed=0, layers=2):
    spec = text_video_gpt(TEXT_TOKENS, TEXT_LEN, LATENT, CODES, 8, d_model=24, num_heads=2, num_layers=layers)
    p = spec.init(key=pr.key(seed))
    p["to_logit"]["weight"] = pr.normal(pr.key(seed + 1), p["to_logit"]["weight"].shape)  # non-zero head
    return spec, p


def ids(seed, b, n, vocab):
    return pr.randint(pr.key(seed), (b, n), 0, vocab)


def joint_vocabulary_sampler(spec, p, x_in, key, temperature=1.0, top_k=None, top_p=None):
    n, b = spec.out_len, x_in.shape[0]
    noise = None if key is None else pr.uniform(key, (n, b, spec.vocab))
    out = []
    with torch.no_grad():
        logits, cache = spec.prefill(p, x_in)
        for t in range(n):
            tok = sample_logits(logits, key=key, temperature=temperature, top_k=top_k, top_p=top_p,
                                uniform=None if noise is None else noise[t]) - spec.num_in_tokens
            out.append(tok)
            if t + 1 < n:
                logits, cache = spec.step(p, tok, t, cache)
    return torch.stack(out, 1)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 4), h=st.integers(1, 4), dh=st.integers(1, 40), n=st.integers(1, 50), spare=st.integers(0, 5),
       seed=st.integers(0, 2**16))
def test_gemv_attention_equals_sdpa_over_cache_views(b, h, dh, n, spare, seed):
    g = torch.Generator().manual_seed(seed)
    buf = torch.randn(2, b, h, n + spare, dh, generator=g) * 3
    q = torch.randn(b, h, 1, dh, generator=g)
    k, v = buf[0][:, :, :n], buf[1][:, :, :n]  # views of a larger buffer, as decoding reads them
    torch.testing.assert_close(gpt_decode._gemv_attention(q, k, v), F.scaled_dot_product_attention(q, k, v),
                               rtol=1e-5, atol=1e-5)


def test_attention_dispatch(monkeypatch):
    calls = []
    gemv = gpt_decode._gemv_attention
    monkeypatch.setattr(gpt_decode, "_gemv_attention", lambda *a: calls.append(a[1].shape) or gemv(*a))
    for b, h, n, dh in [(4, 8, 200, 96), (4, 4, 200, 24), (4, 8, 200, 64), (4, 8, 1024, 96)]:
        kv = torch.randn(2, b, h, n + 3, dh)
        q = torch.randn(b, h, 1, dh)
        attend = gpt_decode._single_query_attention(kv, n)
        torch.testing.assert_close(attend(q, kv[0], kv[1]), F.scaled_dot_product_attention(q, kv[0, :, :, :n],
                                                                                            kv[1, :, :, :n]),
                                   rtol=1e-5, atol=1e-5)
    # MUGEN's GPT at batch 4 (96-wide heads, 614 K cached elements) only: narrower heads (the tiny GPT's 24, or
    # 64) and caches past 2^20 elements stay on SDPA
    assert calls == [(4, 8, 200, 96)]


@pytest.mark.parametrize("gemv", [False, True])
def test_static_cache_step_logits_equal_the_full_pass(gemv, monkeypatch):
    if gemv:  # every step's attention through the matrix-vector form (the tiny model is under its thresholds)
        monkeypatch.setattr(gpt_decode, "GEMV_ATTENTION_MIN_HEAD_DIM", 0)
        monkeypatch.setattr(gpt_decode, "GEMV_ATTENTION_ELEMENTS", (0, 1 << 40))
    spec, p = model(0)
    assert gpt_decode.supports(spec)
    x_in, x_out = ids(1, 3, TEXT_LEN, TEXT_TOKENS), ids(2, 3, spec.out_len, CODES)
    full = spec(p, x_in, x_out).logits[:, TEXT_LEN:, spec.num_in_tokens:]  # position L_in + t predicts out token t
    pl = gpt_decode.plan(spec, p)
    with torch.no_grad():
        logits, kv = gpt_decode.prefill(spec, p, pl, x_in, spec.out_len)
        steps = [logits]
        for t in range(spec.out_len - 1):
            steps.append(gpt_decode.decode_step(pl, x_out[:, t], t, kv, 1 + TEXT_LEN))
    assert len(kv) == 2 and kv[0].shape == (2, 3, 2, 1 + TEXT_LEN + spec.out_len - 1, 12)
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-5, atol=1e-5)
    # the masked variant (the compiled graph's) attends over the whole buffer: same logits
    with torch.no_grad():
        logits, kv = gpt_decode.prefill(spec, p, pl, x_in, spec.out_len)
        masked = [logits] + [gpt_decode.decode_step_masked(pl, x_out[:, t], torch.tensor(t), kv, 1 + TEXT_LEN)
                             for t in range(spec.out_len - 1)]
    torch.testing.assert_close(torch.stack(masked, 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, 4, None), (1.3, None, 0.8),
                                                     (1.0, 3, 0.9), (0.0, None, None)])
def test_static_cache_samples_equal_the_joint_vocabulary_sampler_and_the_full_pass(temperature, top_k, top_p):
    spec, p = model(3)
    x_in = ids(4, 3, TEXT_LEN, TEXT_TOKENS)
    for seed in range(3):
        key = pr.key(10 + seed)
        got = generate(spec, p, x_in, key=key, temperature=temperature, top_k=top_k, top_p=top_p)
        want = joint_vocabulary_sampler(spec, p, x_in, key, temperature, top_k, top_p)
        assert torch.equal(got, want)
        assert torch.equal(got, generate(spec, p, x_in, key=key, temperature=temperature, top_k=top_k, top_p=top_p,
                                         use_cache=False))


def test_repeated_prompts_are_prefilled_once(monkeypatch):
    spec, p = model(5)
    x_in = ids(6, 2, TEXT_LEN, TEXT_TOKENS)[[0, 1, 0, 0]]  # one prompt three times (three samples), another once
    pl = gpt_decode.plan(spec, p)
    with torch.no_grad():
        each = [gpt_decode.prefill(spec, p, pl, x_in[i:i + 1], spec.out_len) for i in range(4)]
        rows, layer = [], gpt_decode._prefill_layer
        monkeypatch.setattr(gpt_decode, "_prefill_layer", lambda pl_, w, x, *a, **k: rows.append(x.shape[0])
                            or layer(pl_, w, x, *a, **k))
        logits, kv = gpt_decode.prefill(spec, p, pl, x_in, spec.out_len)
    assert rows == [2, 2]  # both blocks ran on the two distinct prompts only
    torch.testing.assert_close(logits, torch.cat([e[0] for e in each]), rtol=1e-5, atol=1e-6)
    for i, buf in enumerate(kv):  # every row holds its own prompt's keys and values, in a buffer of its own
        torch.testing.assert_close(buf, torch.cat([e[1][i] for e in each], 1), rtol=1e-5, atol=1e-6)
    for key in (pr.key(7), pr.key(8)):  # and samples as the reference sampler does on the repeated rows
        assert torch.equal(generate(spec, p, x_in, key=key), joint_vocabulary_sampler(spec, p, x_in, key))


def test_packed_weights_decode_the_same_tokens():
    # d_model 240, codes 560 wide: q/k/v, the MLP, the logits and the codes' projection (240 x 560) are over
    # linear_kernel.MIN_PACK elements, so plan(rows=B) packs them for oneDNN
    spec = text_video_gpt(TEXT_TOKENS, TEXT_LEN, LATENT, 600, 560, d_model=240, num_heads=4, num_layers=2)
    p = spec.init(key=pr.key(0))
    p["to_logit"]["weight"] = pr.normal(pr.key(1), p["to_logit"]["weight"].shape) * 0.2
    x_in, x_out = ids(2, 3, TEXT_LEN, TEXT_TOKENS), ids(3, 3, spec.out_len, 600)
    pl = gpt_decode.plan(spec, p, rows=3)
    packed = [t for t in [pl.logit_weight, pl.out_proj[0], *[t for w in pl.layers for t in w]]
              if isinstance(t, lk.Packed)]
    assert len(packed) == (3 * 2 + 2 if lk.available() else 0)
    full = spec(p, x_in, x_out).logits[:, TEXT_LEN:, spec.num_in_tokens:]
    with torch.no_grad():
        logits, kv = gpt_decode.prefill(spec, p, pl, x_in, spec.out_len)
        steps = [logits] + [gpt_decode.decode_step(pl, x_out[:, t], t, kv, 1 + TEXT_LEN)
                            for t in range(spec.out_len - 1)]
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-4, atol=1e-4)
    key = pr.key(4)
    tokens = generate(spec, p, x_in, key=key, top_k=50)
    assert torch.equal(tokens, generate(spec, p, x_in, key=key, top_k=50, use_cache=False))
    with lk.frozen_weights() as scope:  # calls after the first reuse the scope's packed copies: the same tokens
        for _ in range(2):
            assert torch.equal(generate(spec, p, x_in, key=key, top_k=50), tokens)
    # q/k/v, the MLP, the codes' projection and the logits rows (a slice of to_logit taken at each call: kept by
    # its base and place)
    assert sum(isinstance(k, tuple) and "pack" in k for k in scope._cache) == len(packed)


@pytest.mark.parametrize("use_cache", [True, False])
def test_progress_bar_counts_the_tokens(use_cache, capsys):
    spec, p = model(2)
    x_in = ids(3, 2, TEXT_LEN, TEXT_TOKENS)
    quiet = generate(spec, p, x_in, key=pr.key(4), use_cache=use_cache)
    assert capsys.readouterr().err == ""  # no bar by default (progress=False), nor on None off a terminal
    assert torch.equal(generate(spec, p, x_in, key=pr.key(4), use_cache=use_cache, progress=None), quiet)
    assert capsys.readouterr().err == ""
    assert torch.equal(generate(spec, p, x_in, key=pr.key(4), use_cache=use_cache, progress=True), quiet)
    err = capsys.readouterr().err
    assert "generate" in err and f"/{spec.out_len} " in err  # a bar over the out_len tokens (cleared at the end)


def test_unsupported_stacks_fall_back_to_the_growing_cache(monkeypatch):
    spec, p = model(5)
    x_in = ids(6, 2, TEXT_LEN, TEXT_TOKENS)
    fast = generate(spec, p, x_in, key=pr.key(7), top_k=5)
    monkeypatch.setattr(gpt_decode, "supports", lambda m: False)
    assert torch.equal(fast, generate(spec, p, x_in, key=pr.key(7), top_k=5))
    with pytest.raises(ValueError, match="pre-norm"):
        gpt_decode.plan(spec, p)


def test_generation_checks_its_sampling_arguments():
    spec, p = model(0, layers=1)
    x_in = ids(1, 1, TEXT_LEN, TEXT_TOKENS)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        generate(spec, p, x_in, key=pr.key(0), top_k=0)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        generate(spec, p, x_in, key=pr.key(0), top_p=1.5)


@pytest.mark.slow  # torch.compile of the decoding step: ~10 s of CPU
def test_compiled_step_gives_the_eager_tokens():
    spec, p = model(8, layers=1)
    x_in = ids(9, 2, TEXT_LEN, TEXT_TOKENS)
    eager = generate(spec, p, x_in, key=pr.key(1), top_p=0.9)
    assert torch.equal(generate(spec, p, x_in, key=pr.key(1), top_p=0.9, compile=True), eager)
    assert torch.equal(generate(spec, p, x_in, key=pr.key(2), compile=True),
                       generate(spec, p, x_in, key=pr.key(2)))
