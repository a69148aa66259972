"""Parity with randomly initialised `transformers` and TorchMultimodal models: same hidden states,
pooled outputs and logits (1e-5) on padded batches of different lengths; exact round trips; one error
naming every mismatched key."""

import dataclasses

import pytest
import torch

from polymodal.core.pytree import flatten
from polymodal.models.bert import bert_text_encoder, builders as B
from polymodal.models.bert.convert import (
    from_huggingface, from_torchmultimodal, to_huggingface, to_torchmultimodal,
)

t = pytest.importorskip("transformers")
SMALL = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _batch(pad: int, types: bool, start: int = 2):
    """Three rows of lengths 7, 4 and 1 padded with ``pad`` (ids avoid the pad id), mask, token types."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 60, (3, 7), generator=g)
    ids[:, 0] = start
    lengths = torch.tensor([7, 4, 1])
    mask = (torch.arange(7) < lengths[:, None]).long()
    ids = ids.masked_fill(mask == 0, pad)
    tt = (torch.arange(7) >= 3).long().expand(3, 7) * mask if types else None
    return ids, mask, tt


def _hf(kind):
    torch.manual_seed(0)
    if kind == "bert":
        return t.BertModel(t.BertConfig(**SMALL))
    if kind == "roberta":
        return t.RobertaModel(t.RobertaConfig(**SMALL | {"max_position_embeddings": 42}, pad_token_id=1,
                                              type_vocab_size=1))
    return t.DistilBertModel(t.DistilBertConfig(vocab_size=60, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                max_position_embeddings=40, dropout=0.0, attention_dropout=0.0))


def _randomise(module):
    """Non-trivial LayerNorms and biases (HF initialises them to 1 / 0)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "LayerNorm" in name or "layer_norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


@pytest.mark.parametrize("kind,types", [("bert", True), ("bert", False), ("roberta", False), ("distilbert", False)])
def test_huggingface_encoder_parity(kind, types):
    ref = _randomise(_hf(kind))
    sd = ref.state_dict()
    spec, params = from_huggingface(sd, ref.config.to_dict())
    pad = 1 if kind == "roberta" else 0
    ids, mask, tt = _batch(pad, types, start=0 if kind == "roberta" else 2)
    kw = {} if tt is None else {"token_type_ids": tt}
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, output_hidden_states=True, **kw)
    got = spec(params, ids, mask, tt, return_hidden_states=True)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=1e-5)
    for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if kind != "distilbert":
        torch.testing.assert_close(got.pooled, want.pooler_output, atol=1e-5, rtol=1e-5)
    back = to_huggingface(params, spec)
    assert list(back) == [k for k in sd if "position_ids" not in k and "token_type_ids" not in k] or \
        set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in back)
    # without config.json: the architecture from the shapes (heads = hidden // 64 is the only guess)
    spec2, _ = from_huggingface(sd, {"num_attention_heads": 4, "n_heads": 4})
    assert spec2.encoder.num_layers == 2 and spec2.embeddings.type_vocab_size == (0 if kind == "distilbert" else
                                                                                  1 if kind == "roberta" else 2)


def test_attention_weights_equal_transformers():
    ref = _randomise(t.BertModel(t.BertConfig(**SMALL, attn_implementation="eager")))
    spec, params = from_huggingface(ref.state_dict(), ref.config.to_dict())
    ids, mask, tt = _batch(0, True)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, token_type_ids=tt, output_attentions=True).attentions
    got = spec(params, ids, mask, tt, return_attention_weights=True).attentions
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a * mask[:, None, None, :], b * mask[:, None, None, :], atol=1e-5, rtol=1e-5)


def test_masked_lm_and_classifier_parity():
    torch.manual_seed(0)
    mlm = _randomise(t.BertForMaskedLM(t.BertConfig(**SMALL)))
    clf = _randomise(t.BertForSequenceClassification(t.BertConfig(**SMALL, num_labels=3)))
    ids, mask, tt = _batch(0, True)
    for ref in (mlm, clf):
        sd = ref.state_dict()
        spec, params = from_huggingface(sd, ref.config.to_dict())
        with torch.no_grad():
            want = ref(input_ids=ids, attention_mask=mask, token_type_ids=tt).logits
        torch.testing.assert_close(spec(params, ids, mask, tt), want, atol=1e-5, rtol=1e-5)
        back = to_huggingface(params, spec)
        assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
        type(ref)(ref.config).load_state_dict(back, strict=True)
    # an encoder read out of the masked-LM checkpoint (prefix "bert.", head ignored)
    spec, params = from_huggingface(mlm.state_dict(), mlm.config.to_dict(), model="encoder")
    with torch.no_grad():
        want = mlm.bert(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
    torch.testing.assert_close(spec(params, ids, mask, tt).last_hidden_state, want, atol=1e-5, rtol=1e-5)


def test_pretraining_checkpoint_with_legacy_names():
    """BertForPreTraining's keys (MLM + next-sentence heads, pooler) with TensorFlow-era LayerNorm
    gamma/beta names, as in the hub's bert-base-uncased: read as an encoder and as a masked LM."""
    ref = _randomise(t.BertForPreTraining(t.BertConfig(**SMALL)))
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
          for k, v in ref.state_dict().items()}
    ids, mask, tt = _batch(0, True)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    spec, params = from_huggingface(sd, ref.config.to_dict(), model="encoder")
    torch.testing.assert_close(spec(params, ids, mask, tt).pooled, ref.bert(ids, mask, tt).pooler_output,
                               atol=1e-5, rtol=1e-5)
    spec, params = from_huggingface(sd, ref.config.to_dict())  # auto: the masked-LM head
    torch.testing.assert_close(spec(params, ids, mask, tt), want.prediction_logits, atol=1e-5, rtol=1e-5)


def _cross_batch():
    g = torch.Generator().manual_seed(2)
    memory = torch.randn(3, 5, 32, generator=g)
    memory_mask = (torch.arange(5) < torch.tensor([5, 3, 2])[:, None]).long()
    return memory, memory_mask


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("unpad", [False, True])
def test_cross_attention_parity(causal, unpad):
    """Hidden states of a cross-attending BertModel (``add_cross_attention``) given ``encoder_hidden_states``
    and ``encoder_attention_mask``. HF's cross-attention needs ``is_decoder=True``, whose self-attention is
    causal (``causal=True``, read from config.json as ``is_causal``); ALBEF's fusion encoder is the same
    layers with bidirectional self-attention, which HF gives with ``config.is_decoder`` switched off after
    building (the layers keep their cross-attention) and the self-attention's ``is_causal`` cleared."""
    ref = _randomise(t.BertModel(t.BertConfig(**SMALL, is_decoder=True, add_cross_attention=True)))
    sd = ref.state_dict()
    spec, params = from_huggingface(sd, ref.config.to_dict())
    assert spec.encoder.cross_attention_every == 1 and spec.encoder.layer.is_causal
    if not causal:
        ref.config.is_decoder = False
        for layer in ref.encoder.layer:
            layer.attention.self.is_causal = False
        spec, _ = from_huggingface(sd, ref.config.to_dict())
        assert not spec.encoder.layer.is_causal
    spec = dataclasses.replace(spec, unpad=unpad)
    ids, mask, tt = _batch(0, True)
    memory, memory_mask = _cross_batch()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, token_type_ids=tt, encoder_hidden_states=memory,
                   encoder_attention_mask=memory_mask, use_cache=False)
    got = spec(params, ids, mask, tt, encoder_hidden_states=memory, encoder_attention_mask=memory_mask)
    real = mask[..., None].bool() if unpad else torch.ones(1, dtype=torch.bool)  # unpad: zeros at padding
    torch.testing.assert_close(got.last_hidden_state * real, want.last_hidden_state * real, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.pooled, want.pooler_output, atol=1e-5, rtol=1e-5)
    back = to_huggingface(params, spec)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_cross_attention_layout_with_memory_width():
    """A memory narrower than the text (ALBEF / BLIP-2 ``dim_kv``): HF's cross-attention key/value take
    ``hidden_size`` inputs, so only those two shapes differ (HF has no such option; its ``encoder_width``
    config entry is ignored)."""
    from polymodal.core import random as pr
    spec_kv = bert_text_encoder(vocab_size=60, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                max_position_embeddings=40, cross_attention_every=1, dim_kv=24)
    ref_kv = t.BertModel(t.BertConfig(**SMALL, is_decoder=True, add_cross_attention=True, encoder_width=24))
    params = spec_kv.init(key=pr.key(0))
    sd_kv = to_huggingface(params, spec_kv)
    assert {k: tuple(v.shape) for k, v in sd_kv.items() if "crossattention" in k} == \
        {k: (v.shape[0], 24) if "crossattention.self.key.weight" in k or "crossattention.self.value.weight" in k
         else tuple(v.shape) for k, v in ref_kv.state_dict().items() if "crossattention" in k}
    spec2, back = from_huggingface(sd_kv)
    assert spec2.encoder.layer.dim_kv == 24 and flatten(back).keys() == flatten(params).keys()
    assert all(torch.equal(flatten(back)[k], v) for k, v in flatten(params).items())


@pytest.mark.parametrize("kind", ["roberta", "distilbert"])
def test_roberta_and_distilbert_masked_lm_parity(kind):
    """RobertaForMaskedLM (``lm_head.dense / layer_norm / decoder / bias``) and DistilBertForMaskedLM
    (``vocab_transform``, ``vocab_layer_norm``, ``vocab_projector``): logits within 1e-5, exact round trips,
    and the written state dict loads strictly."""
    torch.manual_seed(0)
    if kind == "roberta":  # hidden_act gelu_new: RobertaLMHead still applies exact GELU
        ref = t.RobertaForMaskedLM(t.RobertaConfig(**SMALL | {"max_position_embeddings": 42}, pad_token_id=1,
                                                   type_vocab_size=1, hidden_act="gelu_new"))
    else:
        ref = t.DistilBertForMaskedLM(t.DistilBertConfig(vocab_size=60, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                         max_position_embeddings=40, dropout=0.0,
                                                         attention_dropout=0.0))
    ref = _randomise(ref)
    sd = ref.state_dict()
    spec, params = from_huggingface(sd, ref.config.to_dict())
    assert type(spec).__name__ == "BERTForMaskedLM"
    ids, mask, _ = _batch(1 if kind == "roberta" else 0, False, start=0 if kind == "roberta" else 2)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(spec(params, ids, mask), want, atol=1e-5, rtol=1e-5)
    back = to_huggingface(params, spec)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    type(ref)(ref.config).load_state_dict(back, strict=True)
    # an untied decoder is refused, naming the key
    dec = "lm_head.decoder.weight" if kind == "roberta" else "vocab_projector.weight"
    bad = dict(sd) | {dec: sd[dec] + 1}
    with pytest.raises(ValueError, match=dec.replace(".", r"\.")):
        from_huggingface(bad, ref.config.to_dict())
    # the encoder alone out of the masked-LM checkpoint (head ignored)
    enc, enc_params = from_huggingface(sd, ref.config.to_dict(), model="encoder")
    base = ref.roberta if kind == "roberta" else ref.distilbert
    with torch.no_grad():
        torch.testing.assert_close(enc(enc_params, ids, mask).last_hidden_state,
                                   base(input_ids=ids, attention_mask=mask).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_mismatched_checkpoint_names_every_key():
    sd = dict(_hf("bert").state_dict())
    spec, _ = from_huggingface(sd)
    del sd["encoder.layer.1.output.dense.bias"]
    sd["encoder.layer.0.extra.weight"] = torch.zeros(1)
    sd["pooler.dense.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError) as e:
        from_huggingface(sd, spec=spec)
    msg = str(e.value)
    assert "encoder.layer.1.output.dense.bias" in msg and "encoder.layer.0.extra.weight" in msg
    assert "pooler.dense.weight: expected (32, 32), got (3, 3)" in msg


@pytest.mark.parametrize("flava", [False, True])
def test_torchmultimodal_parity(flava):
    from torchmultimodal.models.flava.text_encoder import flava_text_encoder
    from torchmultimodal.modules.encoders.bert_text_encoder import bert_text_encoder as tmm_bert
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=60,
                 max_position_embeddings=40)
    torch.manual_seed(0)
    if flava:
        ref, spec = flava_text_encoder(**small), B.tmm_flava_text_encoder(
            hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, vocab_size=60, max_position_embeddings=40)
    else:
        ref, spec = tmm_bert(**small, dropout=0.1), B.tmm_albef_text_encoder(  # its MLP then has a Dropout (model.3)
            hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, vocab_size=60, max_position_embeddings=40)
    ref = _randomise(ref)
    sd = ref.state_dict()
    params = from_torchmultimodal(sd, spec)
    ids, mask, tt = _batch(0, True)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    got = spec(params, ids, mask, tt)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=1e-5)
    if flava:
        torch.testing.assert_close(got.pooled, want.pooler_output, atol=1e-5, rtol=1e-5)
    back = to_torchmultimodal(params, spec, mlp_dropout=not flava)
    assert any(".feedforward.model.3." in k for k in sd) == (not flava)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    assert set(flatten(params)) == set(flatten(spec.init(key=__import__("polymodal").core.random.key(0))))
