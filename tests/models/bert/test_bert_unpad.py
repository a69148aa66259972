"""The unpadded encoder path (``unpad=True``, core/encoders/bert_unpad.py): real positions equal a
`transformers` BertModel's and the padded path's (outputs, hidden states, attention rows, gradients),
padded positions are zeros (where transformers computes the pad queries), under the shell,
``torch.compile`` (dynamic output shapes) and ``vmap`` (which falls back to the padded path)."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import polymodal.nn as pnn
from polymodal.core import random as pr
from polymodal.core.encoders.bert_unpad import pack_index, packed_layer, unpack
from polymodal.core.pytree import flatten
from polymodal.models.bert import bert_text_encoder
from polymodal.models.bert.convert import from_huggingface
from tests.checks import randomize

t = pytest.importorskip("transformers")
SMALL = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _batch(lengths, t_max=7):
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(t_max) < torch.tensor(lengths)[:, None]).long()
    ids = torch.randint(3, 60, (len(lengths), t_max), generator=g).masked_fill(mask == 0, 0)
    ids[:, 0] = 2
    return ids, mask


def _small(**kw):
    spec = bert_text_encoder(vocab_size=60, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                             max_position_embeddings=40, **kw)
    return spec, randomize(spec.init(key=pr.key(0)), 1)


def test_unpad_equals_transformers_at_real_positions_and_is_zero_at_padding():
    torch.manual_seed(0)
    ref = t.BertModel(t.BertConfig(**SMALL, attn_implementation="eager")).eval()
    spec, params = from_huggingface(ref.state_dict(), ref.config.to_dict())
    spec = dataclasses.replace(spec, unpad=True)
    ids, mask = _batch([7, 4, 1])
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    got = spec(params, ids, mask, return_hidden_states=True, return_attention_weights=True)
    real = mask[..., None].bool()
    for a, b in zip((got.last_hidden_state,) + got.hidden_states, (want.last_hidden_state,) + want.hidden_states):
        torch.testing.assert_close(a * real, b * real, atol=1e-5, rtol=1e-5)
        assert (a[~mask.bool()] == 0).all()  # transformers has the pad queries' attention output there
    assert not (want.last_hidden_state[~mask.bool()] == 0).all()
    torch.testing.assert_close(got.pooled, want.pooler_output, atol=1e-5, rtol=1e-5)
    rows = mask[:, None, :, None] * mask[:, None, None, :]  # real queries x real keys
    for a, b in zip(got.attentions, want.attentions, strict=True):
        torch.testing.assert_close(a * rows, b * rows, atol=1e-5, rtol=1e-5)


@settings(max_examples=6, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=4), st.booleans())
def test_unpad_equals_padded_path_values_and_gradients(lengths, pre_norm):
    spec, params = _small(norm_first=pre_norm)
    fast = dataclasses.replace(spec, unpad=True)
    ids, mask = _batch(lengths, 6)
    real = mask[..., None].to(torch.float32)
    probe = torch.randn(len(lengths), 6, 32, generator=torch.Generator().manual_seed(3)) * real

    def loss(s):
        return lambda p: (s(p, ids, mask).last_hidden_state * probe).sum()

    torch.testing.assert_close(loss(fast)(params), loss(spec)(params), atol=1e-5, rtol=1e-5)
    g_fast, g_pad = flatten(torch.func.grad(loss(fast))(params)), flatten(torch.func.grad(loss(spec))(params))
    for k in g_pad:
        torch.testing.assert_close(g_fast[k], g_pad[k], atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # compiling takes ~20-50 s on the shared 2-core machine
def test_compiled_with_dynamic_output_shapes():
    spec, params = _small(unpad=True)
    ids, mask = _batch([6, 3])
    want = spec(params, ids, mask).last_hidden_state
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(lambda p, i, m: spec(p, i, m).last_hidden_state, fullgraph=True)
        torch.testing.assert_close(compiled(params, ids, mask), want, atol=1e-5, rtol=1e-5)
        ids2, mask2 = _batch([5, 2, 1])  # another token count: no recompile needed for correctness
        torch.testing.assert_close(compiled(params, ids2, mask2), spec(params, ids2, mask2).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)


def test_shell_vmap_and_fallbacks():
    spec, params = _small(unpad=True)
    ids, mask = _batch([6, 3])
    want = spec(params, ids, mask).last_hidden_state
    shell = pnn.BERTTextEncoder.from_params(spec, params).eval()
    torch.testing.assert_close(shell(ids, mask).last_hidden_state, want)
    # vmap over examples (per-sample gradients) takes the padded path: same values at real positions
    per = torch.func.vmap(lambda i, m: spec(params, i, m).last_hidden_state)(ids, mask)
    torch.testing.assert_close(per * mask[..., None], want, atol=1e-5, rtol=1e-5)
    # no mask at all (mask_padding=False, no attention_mask): nothing to skip, the padded path
    no_mask = dataclasses.replace(spec, mask_padding=False)
    torch.testing.assert_close(no_mask(params, ids).last_hidden_state,
                               dataclasses.replace(no_mask, unpad=False)(params, ids).last_hidden_state)


def test_pack_helpers_and_bad_input():
    valid = torch.tensor([[True, False, True], [False, False, True]])
    idx = pack_index(valid)
    assert idx.tolist() == [0, 2, 5]
    x = torch.arange(6.0).reshape(2, 3, 1)
    torch.testing.assert_close(unpack(x.flatten(0, 1)[idx], idx, 2, 3), x * valid[..., None])
    spec, params = _small()
    layer = dataclasses.replace(spec.encoder.layer, drop_path=0.1)
    with pytest.raises(ValueError, match="drop_path"):
        packed_layer(layer, params["encoder"]["layers"][0], torch.zeros(3, 32), idx, (2, 3), ~valid)
    cross, cparams = _small(cross_attention_every=1, unpad=True)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        cross(cparams, *_batch([3, 2]))
