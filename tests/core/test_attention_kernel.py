"""The attention kernel: SDPA fast path with a vmap batching rule (no per-example fallback), gradients,
compile, and agreement with the math formula."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch.func import grad, vmap

from checks import assert_close
from polymodal.core import random as pr
from polymodal.core.pytree import tree_map
from polymodal.core.layers import MultiHeadAttention, attention, sdpa
from polymodal.core.layers.attention_kernel import math_sdpa

seeds = st.integers(0, 2**32)
FLASH = "aten::_scaled_dot_product_flash_attention_for_cpu"


def x_of(seed, *shape):
    return pr.normal(pr.key(seed), shape)


def count_ops(fn, *names):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    events = [e.name for e in prof.events()]
    return [sum(e == n for e in events) for n in names]


def per_sample_setup(seed, cfg, n=3, t=5):
    spec = MultiHeadAttention(8, 2, **cfg)
    p = spec.init(key=pr.key(seed))
    p = {k: ({kk: vv + 0.1 * x_of(seed + 1, *vv.shape) for kk, vv in v.items()} if isinstance(v, dict)
             else v + 0.1 * x_of(seed + 2, *v.shape)) for k, v in p.items()}
    x = x_of(seed + 3, n, t, 8)
    kpm = torch.zeros(n, t, dtype=torch.bool)
    kpm[0, -2:] = True  # example 0 has two padded keys

    def loss(params, xi, mi):  # one example: xi (T, 8), mi (T,)
        y = spec(params, xi, key_padding_mask=mi).output
        return (y * torch.cos(torch.arange(y.numel(), dtype=y.dtype)).reshape(y.shape)).sum()

    return p, x, kpm, loss


@pytest.mark.parametrize("cfg", [dict(), dict(is_causal=True), dict(num_kv_heads=1), dict(fused_qkv=False)])
def test_per_sample_grads_vmap_has_no_fallback_and_equals_loop(cfg):
    p, x, kpm, loss = per_sample_setup(0, cfg)
    looped = [grad(loss)(p, x[i], kpm[i]) for i in range(len(x))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "performance drop ... batching rule" warning fails the test
        batched = vmap(grad(loss), in_dims=(None, 0, 0))(p, x, kpm)
    (calls,) = count_ops(lambda: vmap(grad(loss), in_dims=(None, 0, 0))(p, x, kpm), FLASH)
    # The profiler sees the batched call (entering the rule) and the one kernel call on the folded
    # batch; a per-example fallback would show 1 + len(x) = 4.
    assert calls == 2
    for i, g in enumerate(looped):
        assert_close(tree_map(lambda t: t[i], batched), g, atol=1e-5, msg=f"example {i}")


def test_per_sample_grads_under_compile_fullgraph():
    p, x, kpm, loss = per_sample_setup(1, dict(is_causal=True))
    looped = [grad(loss)(p, x[i], kpm[i]) for i in range(len(x))]
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*CUDA.*")
        f = torch.compile(vmap(grad(loss), in_dims=(None, 0, 0)), fullgraph=True, backend="aot_eager")
        batched = f(p, x, kpm)
    for i, g in enumerate(looped):
        assert_close(tree_map(lambda t: t[i], batched), g, atol=1e-5, msg=f"example {i}")


@given(st.integers(1, 3), st.integers(1, 3), st.sampled_from([(2, 1), (2, 2), (4, 2)]), st.integers(1, 6),
       st.integers(1, 6), st.integers(1, 8), st.sampled_from(["none", "bias", "batched_bias", "bool"]), seeds)
def test_vmap_grad_of_sdpa_equals_loop_for_every_mask_kind(n, b, hs, tq, tk, d, mask_kind, seed):
    h, hkv = hs
    q, k, v = x_of(seed, n, b, h, tq, d), x_of(seed + 1, n, b, hkv, tk, d), x_of(seed + 2, n, b, hkv, tk, d)
    mask, mdim = {"none": (None, None), "bias": (x_of(seed + 3, h, tq, tk), None),
                  "batched_bias": (x_of(seed + 3, n, b, 1, tq, tk), 0),
                  "bool": (pr.uniform(pr.key(seed + 3), (n, tq, tk)) < 0.7, 0)}[mask_kind]
    argnums = (0, 1, 2, 3) if mask is not None and mask.is_floating_point() else (0, 1, 2)

    def loss(q, k, v, m, f):
        o = f(q, k, v, m)
        return (o * torch.sin(torch.arange(o.numel(), dtype=o.dtype)).reshape(o.shape)).sum()

    def ref(q, k, v, m):  # the math formula, without transforms
        mm = None if m is None else (torch.where(m, 0.0, float("-inf")) if m.dtype == torch.bool else m)
        return math_sdpa(q, k, v, mm)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = vmap(grad(loss, argnums=argnums), in_dims=(0, 0, 0, mdim, None))(q, k, v, mask, sdpa)
    pick = lambda i: mask if mdim is None else mask[i]  # noqa: E731
    want = [grad(loss, argnums=argnums)(q[i], k[i], v[i], pick(i), ref) for i in range(n)]
    for j in range(len(argnums)):
        torch.testing.assert_close(got[j], torch.stack([w[j] for w in want]), rtol=1e-4, atol=1e-5)


@given(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.booleans(), seeds)
def test_sdpa_matches_torch_and_math(b, tq, tk, causal, seed):
    q, k, v = x_of(seed, b, 2, tq, 4), x_of(seed + 1, b, 2, tk, 4), x_of(seed + 2, b, 2, tk, 4)
    mask = x_of(seed + 3, b, 1, tq, tk)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(sdpa(q, k, v, mask), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(math_sdpa(q, k, v, mask), want, rtol=1e-5, atol=1e-6)
    if causal and tq == tk:
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        torch.testing.assert_close(sdpa(q, k, v, is_causal=True), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_sdpa_dtypes(dtype):
    q, k, v = (x_of(i, 2, 2, 5, 8).to(dtype) for i in range(3))
    m = pr.uniform(pr.key(4), (2, 1, 5, 5)) < 0.7
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=m | torch.eye(5, dtype=torch.bool))
    got = sdpa(q, k, v, m | torch.eye(5, dtype=torch.bool))
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    per_example = vmap(lambda a, b, c: sdpa(a, b, c, None, True))(q[:, None], k[:, None], v[:, None])[:, 0]
    torch.testing.assert_close(per_example, F.scaled_dot_product_attention(q, k, v, is_causal=True))


def test_fast_path_is_used_and_math_path_only_when_asked():
    q, k, v = x_of(0, 2, 2, 5, 4), x_of(1, 2, 2, 5, 4), x_of(2, 2, 2, 5, 4)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    flash, softmax = count_ops(lambda: attention(q, k, v, key_padding_mask=kpm, is_causal=True), FLASH, "aten::_softmax")
    assert (flash, softmax) == (1, 0)
    flash, softmax = count_ops(lambda: attention(q, k, v, need_weights=True), FLASH, "aten::_softmax")
    assert (flash, softmax) == (0, 1)
    (flash,) = count_ops(lambda: attention(q, k, v, dropout=0.5, key=None), FLASH)  # no key: no dropout, fast
    assert flash == 1


def test_torch_sdpa_itself_is_batched_after_import():
    # The rules are registered on torch's kernels: plain F.scaled_dot_product_attention is batched too.
    q = x_of(0, 4, 2, 2, 5, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = vmap(grad(lambda q: F.scaled_dot_product_attention(q, q, q, is_causal=True).pow(2).sum()))(q)
    want = torch.stack([grad(lambda q: math_sdpa(q, q, q, None, True).pow(2).sum())(q[i]) for i in range(4)])
    torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{FLASH[6:]}", "FuncTorchBatched")


def test_nested_vmap_and_grad_of_vmap():
    q, k, v = x_of(0, 3, 2, 2, 4, 8), x_of(1, 3, 2, 1, 6, 8), x_of(2, 3, 2, 1, 6, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nested = vmap(vmap(sdpa))(q[:, :, None], k[:, :, None], v[:, :, None])[:, :, 0]
        g = grad(lambda q: vmap(sdpa)(q, k, v).pow(2).sum())(q)
    torch.testing.assert_close(nested, math_sdpa(q, k, v), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g, grad(lambda q: math_sdpa(q, k, v).pow(2).sum())(q), rtol=1e-4, atol=1e-5)


def test_other_layouts_fall_back_to_torch_sdpa_with_zero_rows():
    q, k, v = x_of(0, 2, 2, 3, 4), x_of(1, 2, 2, 5, 4), x_of(2, 2, 2, 5, 6)  # Dv != D: no CPU flash kernel
    m = torch.ones(2, 1, 3, 5, dtype=torch.bool)
    m[0, 0, 1] = False
    out = sdpa(q, k, v, m)
    assert out.shape == (2, 2, 3, 6) and torch.equal(out[0, :, 1], torch.zeros(2, 6))
    torch.testing.assert_close(out, math_sdpa(q, k, v, torch.where(m, 0.0, float("-inf"))), rtol=1e-5, atol=1e-6)


def test_vmap_dropout_keys_per_example():
    spec = MultiHeadAttention(8, 2, dropout=0.5)
    p = spec.init(key=pr.key(0))
    x, keys = x_of(1, 3, 4, 8), pr.split(pr.key(2), 3)
    out = vmap(lambda xi, ki: spec(p, xi, key=ki).output)(x, keys)
    loop = torch.stack([spec(p, x[i], key=keys[i]).output for i in range(3)])
    torch.testing.assert_close(out, loop, rtol=1e-5, atol=1e-6)
