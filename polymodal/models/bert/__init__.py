"""The BERT family (BERT, RoBERTa, DistilBERT, MiniLM): builders, masked-LM / classifier models,
Hugging Face and TorchMultimodal converters, local Hugging Face folders, a DP fine-tuning task.

>>> from polymodal.core import random as pr
>>> enc = build("bert_tiny")
>>> sorted(enc.init(key=pr.key(0)))
['embeddings', 'encoder', 'pooler']
"""

from ...core.encoders.bert import BERTOutput, BERTTextEmbeddings, BERTTextEncoder, bert_text_encoder
from ...core.encoders.bert_heads import MaskedLMHead, SequenceClassificationHead
from .builders import (
    BUILDERS, bert_base_uncased, bert_large_uncased, bert_tiny, build, distilbert_base_uncased, minilm_l6_h384,
    roberta_base, tmm_albef_text_encoder, tmm_flava_text_encoder,
)
from .model import BERTClassifier, BERTForMaskedLM, bert_classifier, bert_for_masked_lm

__all__ = [
    "BERTOutput", "BERTTextEmbeddings", "BERTTextEncoder", "bert_text_encoder", "MaskedLMHead",
    "SequenceClassificationHead", "BUILDERS", "build", "bert_base_uncased", "bert_large_uncased", "roberta_base",
    "distilbert_base_uncased", "minilm_l6_h384", "tmm_flava_text_encoder", "tmm_albef_text_encoder", "bert_tiny",
    "BERTClassifier", "BERTForMaskedLM", "bert_classifier", "bert_for_masked_lm",
]
