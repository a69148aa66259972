"""The BERT family (BERT, RoBERTa, DistilBERT, MiniLM): builders, masked-LM / classifier models,
Hugging Face and TorchMultimodal converters, local Hugging Face folders, a DP fine-tuning task.

* specs: ``core/encoders/bert.py`` (:class:`BERTTextEmbeddings`, :class:`BERTTextEncoder`) and
  ``core/encoders/bert_heads.py``; models :class:`BERTForMaskedLM`, :class:`BERTClassifier`;
* ``bert_base_uncased(unpad=True)`` etc.: the blocks skip padded positions (``core/encoders/bert_unpad.py``;
  real positions unchanged, zeros at padding): faster on ragged batches;
* checkpoints: :func:`from_huggingface` / :func:`to_huggingface` (key mapping in ``convert.py``; BertModel,
  cross-attending and causal ``is_decoder`` layouts, the BERT / RoBERTa / DistilBERT masked-LM heads),
  :func:`from_torchmultimodal`; :func:`load_pretrained` reads a local Hugging Face folder
  (no ``transformers`` needed); tokenizers in ``polymodal.data.bert_tokenizer``;
* sentence embeddings :func:`embed_texts` (``polymodal embed-text --model DIR "text"``);
* shells: ``polymodal.nn.BERTTextEncoder("bert_base_uncased")`` / ``polymodal.nn.build(...)``;
  ``state_dict()`` keys are Hugging Face's for the embeddings, pooler and classifier, and
  ``encoder.layers.{i}.<torch.nn.TransformerEncoderLayer names>`` for the layers (``convert.py``'s table);
* training: ``polymodal train bert-classifier --preset tiny [--dp --noise-multiplier 1.0]``.

>>> from polymodal.core import random as pr
>>> enc = build("bert_tiny")
>>> sorted(enc.init(key=pr.key(0)))
['embeddings', 'encoder', 'pooler']
"""

from ...core.encoders.bert import BERTOutput, BERTTextEmbeddings, BERTTextEncoder, bert_text_encoder
from ...core.encoders.bert_heads import MaskedLMHead, SequenceClassificationHead
from .builders import (
    BUILDERS, bert_base_uncased, bert_base_uncased_mlm, bert_large_uncased, bert_tiny, bert_tiny_classifier, build,
    distilbert_base_uncased, minilm_l6_h384, minilm_l6_h384_classifier, roberta_base, tmm_albef_text_encoder,
    tmm_flava_text_encoder,
)
from .convert import from_huggingface, from_torchmultimodal, to_huggingface, to_torchmultimodal
from .pretrained import Pretrained, load_pretrained
from .sentence import embed_texts, mean_pool_normalize
from .model import BERTClassifier, BERTForMaskedLM, bert_classifier, bert_for_masked_lm

__all__ = [
    "BERTOutput", "BERTTextEmbeddings", "BERTTextEncoder", "bert_text_encoder", "MaskedLMHead",
    "SequenceClassificationHead", "BUILDERS", "build", "bert_base_uncased", "bert_large_uncased", "roberta_base",
    "distilbert_base_uncased", "minilm_l6_h384", "tmm_flava_text_encoder", "tmm_albef_text_encoder", "bert_tiny",
    "BERTClassifier", "BERTForMaskedLM", "bert_classifier", "bert_for_masked_lm", "bert_tiny_classifier",
    "minilm_l6_h384_classifier", "bert_base_uncased_mlm", "from_huggingface", "to_huggingface",
    "from_torchmultimodal", "to_torchmultimodal", "Pretrained", "load_pretrained", "embed_texts",
    "mean_pool_normalize",
]

from ...registry import register_family  # noqa: E402


def _load_pretrained(name, path=None, cache_dir=None, **kw):
    """``polymodal.nn`` shells' loader: ``path`` is a local Hugging Face folder (nothing is downloaded)."""
    if path is None:
        raise ValueError(f"bert: {name!r}: pass path=<a local Hugging Face model folder>; polymodal downloads no "
                         "BERT weights (e.g. huggingface-cli download bert-base-uncased --local-dir DIR)")
    from .pretrained import load_pretrained
    pre = load_pretrained(path, model="auto", tokenizer=False)
    return pre.spec, pre.params, None


register_family(
    "bert",
    builders=BUILDERS,
    description="BERT-family text encoders (BERT, RoBERTa, DistilBERT, MiniLM; Devlin et al. 2019)",
    extra={"build": build, "load_pretrained": _load_pretrained},
)
# Fine-tune a BERT classifier on the built-in synthetic sentence task, optionally with DP-SGD.
register_family(
    "bert-classifier",
    builders={},
    builders_from="bert",
    presets={"tiny": "bert_tiny_classifier", "minilm": "minilm_l6_h384_classifier"},
    task="polymodal.models.bert.task:BERTClassifierTask",
    description="fine-tune a small BERT on a synthetic sentence task, optionally with DP-SGD",
)
