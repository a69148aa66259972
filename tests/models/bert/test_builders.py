"""Published BERT-family builders: parameter counts equal the references built on the meta device."""

import pytest
import torch

from polymodal.core.convert import meta_init
from polymodal.core.pytree import flatten
from polymodal.models.bert import builders as B
from polymodal.models.bert.model import bert_for_masked_lm

transformers = pytest.importorskip("transformers")


def _ours(spec) -> int:
    return sum(v.numel() for v in flatten(meta_init(spec)).values())


def _theirs(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _hf(name):
    t = transformers
    return {
        "bert_base_uncased": lambda: t.BertModel(t.BertConfig()),
        "bert_large_uncased": lambda: t.BertModel(t.BertConfig(hidden_size=1024, num_hidden_layers=24,
                                                               num_attention_heads=16, intermediate_size=4096)),
        "roberta_base": lambda: t.RobertaModel(t.RobertaConfig(vocab_size=50265, max_position_embeddings=514,
                                                               type_vocab_size=1, pad_token_id=1)),
        "distilbert_base_uncased": lambda: t.DistilBertModel(t.DistilBertConfig()),
        "minilm_l6_h384": lambda: t.BertModel(t.BertConfig(hidden_size=384, num_hidden_layers=6,
                                                           num_attention_heads=12, intermediate_size=1536)),
    }[name]


@pytest.mark.parametrize("name", ["bert_base_uncased", "bert_large_uncased", "roberta_base",
                                  "distilbert_base_uncased", "minilm_l6_h384"])
def test_counts_equal_transformers(name):
    with torch.device("meta"):
        ref = _hf(name)()
    assert _ours(B.BUILDERS[name]()) == _theirs(ref)


def test_masked_lm_count_equals_transformers():
    with torch.device("meta"):
        ref = transformers.BertForMaskedLM(transformers.BertConfig())
    # HF's decoder weight is the tied word table (counted once by parameters()); its decoder bias is cls.predictions.bias
    assert _ours(bert_for_masked_lm(B.bert_base_uncased())) == _theirs(ref)


def test_torchmultimodal_counts():
    from torchmultimodal.models.flava.text_encoder import flava_text_encoder
    from torchmultimodal.modules.encoders.bert_text_encoder import bert_text_encoder
    with torch.device("meta"):
        flava, albef = flava_text_encoder(), bert_text_encoder()
    assert _ours(B.tmm_flava_text_encoder()) == _theirs(flava)
    assert _ours(B.tmm_albef_text_encoder()) == _theirs(albef)


def test_unknown_builder_names_choices():
    with pytest.raises(ValueError, match="bert_base_uncased"):
        B.build("bert-huge")
