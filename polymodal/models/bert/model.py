"""BERT-family models over the shared encoder: masked-LM pretraining and sequence classification.

Params keep Hugging Face's layout where names agree: :class:`BERTForMaskedLM` is ``bert.*`` +
``predictions.*`` (HF ``cls.predictions.*``), :class:`BERTClassifier` is ``bert.*`` + ``classifier.*``
(exactly ``BertForSequenceClassification``'s keys apart from the encoder's layer names).

>>> import torch
>>> from polymodal.core import random as pr
>>> from polymodal.models.bert.builders import bert_tiny
>>> clf = bert_classifier(bert_tiny(), num_labels=3)
>>> clf(clf.init(key=pr.key(0)), torch.tensor([[2, 7, 9, 3]])).shape
torch.Size([1, 3])
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ...core import random as pr
from ...core.encoders.bert import BERTTextEncoder
from ...core.encoders.bert_heads import MaskedLMHead, SequenceClassificationHead
from ...core.pytree import Params
from ...core.spec import Spec

__all__ = ["BERTForMaskedLM", "BERTClassifier", "bert_for_masked_lm", "bert_classifier"]


@dataclass(frozen=True)
class BERTForMaskedLM(Spec):
    """``input_ids (B, T) -> logits (B, T, V)`` over the vocabulary (decoder tied to the word embeddings)."""

    bert: BERTTextEncoder  # the encoder (Hugging Face builds it without a pooler here)
    predictions: MaskedLMHead  # transform + tied decoder + bias

    def init(self, *, key: Tensor) -> Params:
        kb, kh = pr.split(key, 2)
        return {"bert": self.bert.init(key=kb), "predictions": self.predictions.init(key=kh)}

    def __call__(self, params: Params, input_ids: Tensor, attention_mask: Tensor | None = None,
                 token_type_ids: Tensor | None = None, *, key: Tensor | None = None) -> Tensor:
        h = self.bert(params["bert"], input_ids, attention_mask, token_type_ids, key=key).last_hidden_state
        return self.predictions(params["predictions"], h, params["bert"]["embeddings"]["word_embeddings"]["weight"])


@dataclass(frozen=True)
class BERTClassifier(Spec):
    """``input_ids (B, T) -> logits (B, num_labels)`` from the pooled output (``BertForSequenceClassification``)."""

    bert: BERTTextEncoder  # the encoder, with its tanh pooler
    classifier: SequenceClassificationHead  # dropout + linear on the pooled vector

    def init(self, *, key: Tensor) -> Params:
        kb, kh = pr.split(key, 2)
        return {"bert": self.bert.init(key=kb), "classifier": self.classifier.init(key=kh)}

    def __call__(self, params: Params, input_ids: Tensor, attention_mask: Tensor | None = None,
                 token_type_ids: Tensor | None = None, *, key: Tensor | None = None) -> Tensor:
        kb, kh = pr.maybe_split(key, 2)
        pooled = self.bert(params["bert"], input_ids, attention_mask, token_type_ids, key=kb).pooled
        return self.classifier(params["classifier"], pooled, key=kh)


def bert_for_masked_lm(bert: BERTTextEncoder, activation: str | None = None,
                       layer_norm_eps: float | None = None) -> BERTForMaskedLM:
    """The masked-LM model over ``bert`` (its pooler dropped, as ``BertForMaskedLM``); the head's
    ``activation`` and ``layer_norm_eps`` default to the encoder's (``RobertaForMaskedLM``'s head is
    always ``"gelu"``, ``DistilBertForMaskedLM``'s norm always has eps ``1e-12``)."""
    import dataclasses
    lay = bert.encoder.layer
    return BERTForMaskedLM(dataclasses.replace(bert, pooler=False),
                           MaskedLMHead(bert.hidden_size, bert.embeddings.vocab_size,
                                        lay.activation if activation is None else activation,
                                        lay.layer_norm_eps if layer_norm_eps is None else layer_norm_eps,
                                        bert.embeddings.init_std))


def bert_classifier(bert: BERTTextEncoder, num_labels: int, dropout: float | None = None) -> BERTClassifier:
    """A classifier over ``bert`` (which needs its pooler); ``dropout`` defaults to the encoder's."""
    if not bert.pooler:
        raise ValueError("bert_classifier: the encoder has no pooler (pooler=False); build it with pooler=True")
    rate = bert.embeddings.dropout if dropout is None else dropout
    return BERTClassifier(bert, SequenceClassificationHead(bert.hidden_size, num_labels, rate, bert.embeddings.init_std))
