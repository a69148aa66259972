"""The BERT encoder, embeddings and heads as specs: shell, vmap, grad, compile, round trip; bad input."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from polymodal.core import random as pr
from polymodal.core.encoders.bert import bert_text_encoder
from polymodal.models.bert import bert_classifier, bert_for_masked_lm, bert_tiny
from tests.checks import check_spec


def _ids(b, t, vocab=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (b, t), generator=g)
    ids[:, 0] = 2
    return ids


@settings(max_examples=3, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(2, 6))
def test_encoder_check_spec(b, t):
    enc = bert_tiny()
    ids = _ids(b, t)
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, t - 1:] = 0
    check_spec(enc, enc.init(key=pr.key(0)), [ids, mask, torch.zeros_like(ids)], compile=b == 2)


def test_classifier_and_mlm_check_spec():
    ids = _ids(2, 5)
    clf = bert_classifier(bert_tiny(), num_labels=3)
    check_spec(clf, clf.init(key=pr.key(1)), [ids], compile=False)
    mlm = bert_for_masked_lm(bert_tiny())
    check_spec(mlm, mlm.init(key=pr.key(2)), [ids], compile=False)


def test_roberta_positions_and_padding_mask():
    enc = bert_tiny(pad_token_id=1, position_offset=True, type_vocab_size=1)
    ids = torch.tensor([[0, 5, 6, 2, 1, 1], [0, 7, 2, 1, 1, 1]])
    # fairseq's make_positions by hand: real tokens count from pad+1, padding stays at pad
    assert enc.embeddings.position_ids(ids).tolist() == [[2, 3, 4, 5, 1, 1], [2, 3, 4, 1, 1, 1]]
    p = enc.init(key=pr.key(0))
    full = enc(p, ids).last_hidden_state
    short = enc(p, ids[:1, :4]).last_hidden_state  # the pad id masks padding out of attention
    torch.testing.assert_close(full[:1, :4], short, atol=1e-5, rtol=1e-5)


def test_cross_attention_every_k():
    enc = bert_text_encoder(vocab_size=40, hidden_size=16, num_layers=4, num_heads=2, intermediate_size=32,
                            cross_attention_every=2, dim_kv=12)
    p = enc.init(key=pr.key(0))
    assert "multihead_attn" in p["encoder"]["layers"][0] and "multihead_attn" not in p["encoder"]["layers"][1]
    out = enc(p, _ids(2, 5, 40), encoder_hidden_states=torch.randn(2, 7, 12),
              encoder_attention_mask=torch.ones(2, 7), return_attention_weights=True)
    assert [None if w is None else tuple(w.shape) for w in out.cross_attentions] == [(2, 2, 5, 7), None, (2, 2, 5, 7), None]


def test_bad_input_errors():
    enc = bert_tiny()
    p = enc.init(key=pr.key(0))
    ids = _ids(2, 5)
    with pytest.raises(ValueError, match=r"vocabulary size is 64.*to 99"):
        enc(p, torch.tensor([[2, 99]]))
    with pytest.raises(ValueError, match=r"attention_mask: expected shape \(2, 5\).*got \(2, 4\)"):
        enc(p, ids, torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"token_type_ids: expected shape \(2, 5\).*got \(5,\)"):
        enc(p, ids, None, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"no token types"):
        d = bert_tiny(type_vocab_size=0, pooler=False)
        d(d.init(key=pr.key(0)), ids, None, torch.zeros_like(ids))


def test_declared_block_stacks_are_the_ones_the_seam_runs():
    from polymodal.core.layers.seam import record_stacks
    from polymodal.train.distributed.sharding import block_stacks
    for spec, expected in ((bert_tiny(), ["encoder.layers"]),
                           (bert_classifier(bert_tiny(), 3), ["bert.encoder.layers"]),
                           (bert_for_masked_lm(bert_tiny()), ["bert.encoder.layers"])):
        params = spec.init(key=pr.key(0))
        assert block_stacks(spec, params) == expected
        assert sorted(record_stacks(lambda p: spec(p, _ids(2, 4)), params)) == expected


def test_dropout_follows_the_key():
    enc = bert_tiny(dropout=0.3)
    p, ids = enc.init(key=pr.key(0)), _ids(2, 5)
    a, b = (enc(p, ids, key=pr.key(k)).last_hidden_state for k in (1, 1))
    c = enc(p, ids, key=pr.key(2)).last_hidden_state
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(enc(p, ids).last_hidden_state, enc(p, ids).last_hidden_state)  # key=None: no dropout
