"""Published BERT-family configurations (parameter counts equal the references) and a tiny preset.

>>> from polymodal.core.convert import meta_init
>>> from polymodal.core.pytree import flatten
>>> sum(v.numel() for v in flatten(meta_init(bert_base_uncased())).values())
109482240
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...core.encoders.bert import BERTTextEncoder, bert_text_encoder
from .model import BERTClassifier, BERTForMaskedLM, bert_classifier, bert_for_masked_lm

__all__ = [
    "bert_base_uncased", "bert_large_uncased", "roberta_base", "distilbert_base_uncased", "minilm_l6_h384",
    "tmm_flava_text_encoder", "tmm_albef_text_encoder", "bert_tiny", "bert_tiny_classifier",
    "minilm_l6_h384_classifier", "bert_base_uncased_mlm", "BUILDERS", "build",
]


def bert_base_uncased(**kw) -> BERTTextEncoder:
    """BERT-base (Devlin et al. 2019, Section 3: L=12, H=768, A=12; 110M): 109,482,240 params with the pooler."""
    return bert_text_encoder(**kw)


def bert_large_uncased(**kw) -> BERTTextEncoder:
    """BERT-large (Devlin et al. 2019, Section 3: L=24, H=1024, A=16; 340M): 335,141,888 params."""
    return bert_text_encoder(**(dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096) | kw))


def roberta_base(**kw) -> BERTTextEncoder:
    """RoBERTa-base (Liu et al. 2019, BERT-base sizes; BPE vocabulary 50,265, positions offset by the
    padding id 1, one token type, LayerNorm eps 1e-5): 124,645,632 params."""
    return bert_text_encoder(**(dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                             layer_norm_eps=1e-5, position_offset=True) | kw))


def distilbert_base_uncased(**kw) -> BERTTextEncoder:
    """DistilBERT-base (Sanh et al. 2019, Section 3: 6 layers of BERT-base, no token types, no pooler): 66,362,880."""
    return bert_text_encoder(**(dict(num_layers=6, type_vocab_size=0, pooler=False) | kw))


def minilm_l6_h384(**kw) -> BERTTextEncoder:
    """The layout of sentence-transformers' all-MiniLM-L6-v2 (Wang et al. 2020, MiniLM: L=6, H=384, A=12,
    BERT's uncased vocabulary): 22,713,216 params."""
    return bert_text_encoder(**(dict(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536) | kw))


def tmm_flava_text_encoder(**kw) -> BERTTextEncoder:
    """TorchMultimodal's ``flava_text_encoder`` (Singh et al. 2022, FLAVA, Section 3.1: ViT-B/16-sized text
    encoder): pre-norm blocks, a final LayerNorm and the tanh pooler; 109,483,776 params."""
    return bert_text_encoder(**(dict(norm_first=True, final_norm=True) | kw))


def tmm_albef_text_encoder(**kw) -> BERTTextEncoder:
    """TorchMultimodal's ``bert_text_encoder`` defaults, ALBEF's text encoder (Li et al. 2021, Section 3:
    the first 6 layers of BERT-base): post-norm, no pooler."""
    return bert_text_encoder(**(dict(num_layers=6, pooler=False) | kw))


def bert_tiny(**kw) -> BERTTextEncoder:
    """A 2-layer, width-32 BERT over the synthetic task's vocabulary: trains on 2 CPU cores."""
    args = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                max_position_embeddings=64) | kw
    return bert_text_encoder(**args)


def bert_tiny_classifier(num_labels: int = 3, **kw) -> BERTClassifier:
    """:func:`bert_tiny` + a ``num_labels`` classifier on its pooled output (the ``tiny`` training preset)."""
    return bert_classifier(bert_tiny(**kw), num_labels)


def minilm_l6_h384_classifier(num_labels: int = 3, **kw) -> BERTClassifier:
    """:func:`minilm_l6_h384` + a classifier (the ``minilm`` training preset)."""
    return bert_classifier(minilm_l6_h384(**kw), num_labels)


def bert_base_uncased_mlm(**kw) -> BERTForMaskedLM:
    """``BertForMaskedLM`` over :func:`bert_base_uncased`: 109,514,298 params."""
    return bert_for_masked_lm(bert_base_uncased(**kw))


BUILDERS: dict[str, Callable[..., Any]] = {f.__name__: f for f in (
    bert_base_uncased, bert_large_uncased, roberta_base, distilbert_base_uncased, minilm_l6_h384,
    tmm_flava_text_encoder, tmm_albef_text_encoder, bert_tiny, bert_tiny_classifier, minilm_l6_h384_classifier,
    bert_base_uncased_mlm)}


def build(name: str, **kw) -> Any:
    """A registered builder by name (``"bert_base_uncased"``; dashes allowed)."""
    key = name.replace("-", "_")
    if key not in BUILDERS:
        raise ValueError(f"unknown BERT builder {name!r}; expected one of {sorted(BUILDERS)}")
    return BUILDERS[key](**kw)
