"""Multimodal GPT and generation: cache == full pass, start token learns, masks, sampling."""

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from checks import check_spec
from polymodal import nn as pnn
from polymodal.core import pytree
from polymodal.core import random as pr
from polymodal.models.gpt import MultimodalGPT, filter_logits, generate, multimodal_gpt, sample_logits

seeds = st.integers(0, 2**31)


def model_and_params(seed, in_shape=(3,), out_shape=(2, 2), layers=2):
    gpt = multimodal_gpt(7, 5, in_shape, out_shape, d_model=16, num_heads=2, num_layers=layers)
    p = gpt.init(key=pr.key(seed))
    p["to_logit"]["weight"] = pr.normal(pr.key(seed + 1), p["to_logit"]["weight"].shape)  # non-zero head
    return gpt, p


def ids(seed, b, n, vocab):
    return pr.randint(pr.key(seed), (b, n), 0, vocab)


@given(seeds, st.integers(1, 3), st.integers(1, 3))
def test_incremental_decoding_equals_full_pass(seed, b, layers):
    gpt, p = model_and_params(seed, layers=layers)
    x_in, x_out = ids(seed + 2, b, 3, 7), ids(seed + 3, b, 4, 5)
    full = gpt(p, x_in, x_out).logits  # position 3 + t predicts out token t
    logits, cache = gpt.prefill(p, x_in)
    steps = [logits]
    for t in range(3):
        logits, cache = gpt.step(p, x_out[:, t], t, cache)
        steps.append(logits)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 3:], rtol=1e-5, atol=1e-4)


def test_logits_mask_and_targets():
    gpt, p = model_and_params(0)
    out = gpt(p, ids(1, 2, 3, 7), ids(2, 2, 4, 5)).logits
    neg = torch.finfo(out.dtype).min
    assert torch.all(out[:, :3, 7:] == neg) and torch.all(out[:, 3:, :7] == neg)
    assert torch.all(out[:, :3, :7] > neg) and torch.all(out[:, 3:, 7:] > neg)
    t = gpt.targets(torch.tensor([[1, 2, 3]]), torch.tensor([[0, 4, 1, 2]]))
    assert t.tolist() == [[1, 2, 3, 7, 11, 8, 9]]


def test_start_token_receives_gradient_and_training_step_learns():
    gpt, p = model_and_params(0, layers=1)
    x_in, x_out = ids(1, 4, 3, 7), ids(2, 4, 4, 5)

    def loss(p):
        logits = gpt(p, x_in, x_out).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), gpt.targets(x_in, x_out).flatten())

    g = torch.func.grad(loss)(p)
    assert g["sos"].abs().sum() > 0  # TorchMultimodal's SOS gets none
    assert all(t.abs().sum() > 0 for t in pytree.leaves(g))  # every parameter learns
    leaves = {k: v.clone().requires_grad_() for k, v in pytree.flatten(p).items()}
    opt = torch.optim.Adam(leaves.values(), lr=1e-2)
    first = None
    for _ in range(30):
        l = loss(pytree.unflatten(leaves))
        first = first if first is not None else l.item()
        opt.zero_grad()
        l.backward()
        opt.step()
    assert l.item() < 0.5 * first


@given(seeds, st.sampled_from([None, 2]), st.sampled_from([None, 0.7]), st.sampled_from([0.0, 1.0, 0.5]))
def test_generation_with_and_without_cache_agree(seed, top_k, top_p, temperature):
    gpt, p = model_and_params(seed)
    x_in = ids(seed + 5, 2, 3, 7)
    k = pr.key(seed + 6)
    a = generate(gpt, p, x_in, key=k, top_k=top_k, top_p=top_p, temperature=temperature)
    b = generate(gpt, p, x_in, key=k, top_k=top_k, top_p=top_p, temperature=temperature, use_cache=False)
    assert torch.equal(a, b) and a.shape == (2, 4)
    assert a.min() >= 0 and a.max() < 5
    assert torch.equal(a, generate(gpt, p, x_in, key=k, top_k=top_k, top_p=top_p, temperature=temperature))


def test_greedy_generation_is_argmax_of_full_pass():
    gpt, p = model_and_params(4)
    x_in = ids(1, 2, 3, 7)
    out = generate(gpt, p, x_in, key=None)
    logits = gpt(p, x_in, out).logits[:, 3:]
    assert torch.equal(logits.argmax(-1) - 7, out)


def test_filters_and_sampling_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]])
    neg = torch.finfo(logits.dtype).min
    assert (filter_logits(logits, top_k=2) > neg).tolist() == [[True, True, False, False, False]]
    probs = logits.softmax(-1)[0]  # 0.61, 0.22, 0.14, ...
    keep = filter_logits(logits, top_p=0.8) > neg
    assert keep.tolist() == [[True, True, False, False, False]]
    assert probs[:2].sum() >= 0.8 > probs[:1].sum()
    # Gumbel-max sampling from keys follows the softmax
    draws = torch.stack([sample_logits(logits[0], key=pr.key(i)) for i in range(4000)])
    freq = torch.bincount(draws, minlength=5).float() / 4000
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)
    keys = pr.split(pr.key(0), 3)
    batched = torch.func.vmap(lambda k: sample_logits(logits[0], key=k))(keys)
    assert torch.equal(batched, torch.stack([sample_logits(logits[0], key=k) for k in keys]))
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=0.0)


def test_generic_checks_and_shell():
    gpt, p = model_and_params(0, layers=1)
    check_spec(gpt, p, [ids(1, 2, 3, 7), ids(2, 2, 4, 5)], atol=1e-5)
    shell = pnn.MultimodalGPT(**{f.name: getattr(gpt, f.name) for f in dataclasses.fields(gpt)}, key=pr.key(0))
    assert shell.spec == gpt and sorted(shell.state_dict()) == sorted(pytree.flatten(shell.params))
    with pytest.raises(ValueError, match="exceeds"):
        generate(gpt, p, ids(1, 1, 3, 7), max_new_tokens=9)
    with pytest.raises(ValueError, match=r"in_ids: expected shape \(B, L_in\)"):
        gpt(p, torch.zeros(1, 2, 3, dtype=torch.long))


def test_builder_keeps_the_parameter_layout_and_checks_widths():
    gpt = multimodal_gpt(7, 5, (3,), (2, 2), d_model=16, num_heads=2, num_layers=1, in_dim=8)
    shapes = {k: tuple(v.shape) for k, v in pytree.flatten(gpt.init(key=pr.key(0))).items()}
    assert shapes["in_embed.weight"] == (7, 8) and shapes["in_proj.weight"] == (16, 8)
    assert shapes["out_embed.weight"] == (5, 16) and "out_proj.weight" not in shapes
    assert shapes["in_pos.embedding.d_0"] == (3, 16) and shapes["out_pos.embedding.d_1"] == (2, 8)
    assert shapes["to_logit.weight"] == (12, 16) and shapes["sos"] == (16,)
    assert (gpt.num_in_tokens, gpt.num_out_tokens, gpt.in_shape, gpt.out_shape, gpt.d_model) == (7, 5, (3,), (2, 2), 16)
    assert gpt.block_stacks() == ["decoder.layers"]
    with pytest.raises(ValueError, match=r"the in embeddings must be d_model \(16\) wide, got token width 8"):
        dataclasses.replace(gpt, in_proj=None)
