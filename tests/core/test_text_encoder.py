"""The shared text transformer: open_clip parity (causal end-of-text pooling, bidirectional with a
padding mask, class-token pooling), mask-aware mean, short rows, attention_mask == pad_id, checks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from checks import check_spec, copy_into, randomize
from polymodal.core import random as pr
from polymodal.core.encoders.text import TextTransformer, text_transformer

TOL = dict(rtol=1e-5, atol=1e-5)
NAMES = {"self_attn.in_proj_weight": "attn.in_proj_weight", "self_attn.in_proj_bias": "attn.in_proj_bias",
         "self_attn.out_proj": "attn.out_proj", "linear1": "mlp.c_fc", "linear2": "mlp.c_proj", "norm1": "ln_1",
         "norm2": "ln_2"}




def to_open_clip(k):
    if not k.startswith("transformer.layers."):
        return k
    i, rest = k[len("transformer.layers."):].split(".", 1)
    for ours, theirs in NAMES.items():
        if rest.startswith(ours):
            return f"transformer.resblocks.{i}.{theirs}{rest[len(ours):]}"
    raise KeyError(k)


def tokens_of(seed, b, t, vocab=60, pad=0):
    """Rows of real ids in [1, vocab - 2], an end-of-text id (vocab - 1, the largest) and padding."""
    ids = pr.randint(pr.key(seed), (b, t), 1, vocab - 1)
    lengths = pr.randint(pr.key(seed + 1), (b,), 1, t + 1)
    pos = torch.arange(t)
    ids = torch.where(pos == (lengths[:, None] - 1), vocab - 1, ids)
    return torch.where(pos >= lengths[:, None], pad, ids), pos < lengths[:, None]


def _open_clip(**kw):
    from open_clip.transformer import TextTransformer as OC

    return OC(context_length=8, vocab_size=60, width=32, heads=2, layers=2, output_dim=None, act_layer=torch.nn.GELU,
              output_tokens=True, **kw).eval()


@given(st.integers(1, 3), st.integers(1, 8), st.integers(0, 2**31))
@settings(max_examples=5, deadline=None)
def test_causal_end_of_text_matches_open_clip(b, t, seed):
    spec = text_transformer(vocab_size=60, context_length=8, width=32, layers=2, heads=2)
    p = randomize(spec.init(key=pr.key(seed)), seed)
    ref = _open_clip()
    copy_into(ref, p, to_open_clip)
    tokens, _ = tokens_of(seed, b, 8)
    pooled, hidden = ref(tokens)  # open_clip takes full-context rows only
    tokens = tokens[:, :max(t, int(tokens.argmax(-1).max()) + 1)]  # ours: shorter rows, as long as the eot stays
    out = spec(p, tokens)
    torch.testing.assert_close(out.last_hidden_state, hidden[:, :tokens.shape[1]], **TOL)  # causal: same states
    torch.testing.assert_close(out.pooled, pooled, **TOL)
    torch.testing.assert_close(spec(p, tokens, pooled_only=True).pooled, pooled, **TOL)


@pytest.mark.parametrize("pool, oc_pool", [("eot", "eos"), ("cls", "first")])
def test_bidirectional_with_padding_matches_open_clip(pool, oc_pool):
    spec = text_transformer(vocab_size=60, context_length=8, width=32, layers=2, heads=2, causal=False, pool=pool,
                            eot_id=59, pad_id=0)
    p = randomize(spec.init(key=pr.key(1)), 1)
    ref = _open_clip(no_causal_mask=True, use_pad_mask=True, pad_id=0, pool_type=oc_pool, eos_id=59)
    copy_into(ref, p, to_open_clip)
    tokens, valid = tokens_of(3, 4, 8)
    pooled, hidden = ref(tokens)
    out = spec(p, tokens)
    torch.testing.assert_close(out.last_hidden_state[valid], hidden[valid], **TOL)  # padded queries differ in how
    torch.testing.assert_close(out.pooled, pooled, **TOL)  # NaN-free softmaxes are written; real ones agree
    torch.testing.assert_close(spec(p, tokens, pooled_only=True).pooled, pooled, **TOL)
    # An attention_mask gives the pad_id's mask; without either, padding is attended to.
    free = TextTransformer(spec.token_embedding, spec.transformer, 8, pool, 59)
    torch.testing.assert_close(free(p, tokens, valid.long()).pooled, pooled, **TOL)
    assert not torch.allclose(free(p, tokens).pooled, pooled, **TOL)


def test_mean_pool_counts_real_tokens_only():
    spec = text_transformer(vocab_size=60, context_length=8, width=32, layers=1, heads=2, causal=False, pool="mean",
                            pad_id=0)
    p = randomize(spec.init(key=pr.key(2)), 2)
    ref = _open_clip(no_causal_mask=True, use_pad_mask=True, pad_id=0, pool_type="none")
    ref.transformer.resblocks = ref.transformer.resblocks[:1]
    copy_into(ref, p, to_open_clip)
    tokens, valid = tokens_of(5, 3, 8)
    _, hidden = ref(tokens)
    want = torch.stack([hidden[i][valid[i]].mean(0) for i in range(3)])  # by hand, row by row
    torch.testing.assert_close(spec(p, tokens).pooled, want, **TOL)


def test_check_spec_and_vmap_of_unbatched_rows():
    spec = text_transformer(vocab_size=60, context_length=8, width=16, layers=2, heads=2, causal=False, pad_id=0,
                            pool="mean")
    tokens, _ = tokens_of(7, 3, 6)
    check_spec(spec, randomize(spec.init(key=pr.key(0)), 0), [tokens])
    causal = text_transformer(vocab_size=60, context_length=8, width=16, layers=2, heads=2)
    check_spec(causal, randomize(causal.init(key=pr.key(1)), 1), [tokens], {"pooled_only": True})


def test_errors_name_expected_and_got():
    spec = text_transformer(vocab_size=60, context_length=8, width=16, layers=1, heads=2)
    p = spec.init(key=pr.key(0))
    with pytest.raises(ValueError, match=r"tokens: expected shape \(B, T\) with 1 <= T <= 8 \(context_length 8\), "
                                         r"got \(2, 9\)"):
        spec(p, torch.zeros(2, 9, dtype=torch.long))
    with pytest.raises(TypeError, match="tokens: expected dtype"):
        spec(p, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"attention_mask: expected shape \(2, 4\), got \(2, 3\)"):
        spec(p, torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 3))
    with pytest.raises(ValueError, match="pool: expected one of"):
        TextTransformer(spec.token_embedding, spec.transformer, 8, "max")
    with pytest.raises(ValueError, match="pooled_only needs pool 'eot' or 'cls'"):
        TextTransformer(spec.token_embedding, spec.transformer, 8, "mean")(p, torch.ones(1, 3, dtype=torch.long),
                                                                          pooled_only=True)
