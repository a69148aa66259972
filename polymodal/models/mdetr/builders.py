"""Published MDETR configurations (TorchMultimodal's builder defaults) and the tiny preset.

>>> from polymodal.core.convert import meta_init
>>> from polymodal.core.pytree import flatten
>>> sum(v.numel() for v in flatten(meta_init(mdetr_resnet101())).values())  # TorchMultimodal: the same
184969924
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...core.encoders.bert import BERTTextEncoder, bert_text_encoder
from ...core.encoders.resnet import ResNet, resnet
from .heads import GQA_HEADS, MDETRForPhraseGrounding, MDETRForVQA
from .model import MDETR
from .transformer import FeatureResizer, mdetr_transformer

__all__ = ["mdetr_roberta_text_encoder", "mdetr", "mdetr_resnet101", "mdetr_for_phrase_grounding", "mdetr_for_vqa",
           "mdetr_tiny", "mdetr_tiny_vqa", "BUILDERS", "build"]


def mdetr_roberta_text_encoder(**kw) -> BERTTextEncoder:
    """RoBERTa-base (Liu et al. 2019) as MDETR's text encoder: no pooler, dropout 0.1 (TorchMultimodal's
    ``mdetr_roberta_text_encoder``)."""
    args = dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5,
                position_offset=True, pooler=False, dropout=0.1) | kw
    return bert_text_encoder(**args)


def mdetr(backbone: ResNet, text_encoder: BERTTextEncoder, *, num_queries: int = 100, num_classes: int = 255,
          d_model: int = 256, num_heads: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
          dim_feedforward: int = 2048, dropout: float = 0.1, num_extra_queries: int = 0) -> MDETR:
    """An :class:`MDETR` from its parts' hyperparameters."""
    tr = mdetr_transformer(d_model, num_heads, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout)
    return MDETR(backbone, text_encoder, tr, FeatureResizer(text_encoder.hidden_size, d_model, dropout),
                 num_queries, num_classes, num_extra_queries)


def mdetr_resnet101(**kw) -> MDETR:
    """MDETR with ResNet-101 and RoBERTa-base (Kamath et al. 2021, Section 3 / TorchMultimodal's
    ``mdetr_resnet101``: 100 queries, 255 + 1 token slots, DETR 6 + 6 layers of width 256, 8 heads,
    feed-forward 2048, dropout 0.1; stem and layer1 of the backbone frozen)."""
    return mdetr(resnet(trainable_layers=3), mdetr_roberta_text_encoder(), **kw)


def mdetr_for_phrase_grounding(contrastive_dim: int = 64, **kw) -> MDETRForPhraseGrounding:
    """:func:`mdetr_resnet101` + the 64-d contrastive-alignment projections (Kamath et al. 2021, Section 2.2.2)."""
    return MDETRForPhraseGrounding(mdetr_resnet101(**kw), contrastive_dim)


def mdetr_for_vqa(heads: tuple[tuple[str, int], ...] = GQA_HEADS, contrastive_dim: int = 64, **kw) -> MDETRForVQA:
    """:func:`mdetr_for_phrase_grounding` + GQA's six question-type heads on six extra queries
    (Kamath et al. 2021, Section 4.3)."""
    return MDETRForVQA(mdetr_resnet101(num_extra_queries=len(heads), **kw), heads, contrastive_dim)


def _tiny(vocab_size: int, num_extra_queries: int, **kw) -> MDETR:
    text = bert_text_encoder(vocab_size=vocab_size, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                             max_position_embeddings=40, type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5,
                             position_offset=True, pooler=False)
    args = dict(num_queries=8, num_classes=255, d_model=32, num_heads=2, num_encoder_layers=2, num_decoder_layers=2,
                dim_feedforward=64, dropout=0.0) | kw
    return mdetr(resnet(layers=(1, 1, 1, 1), block="basic", width=8), text, num_extra_queries=num_extra_queries,
                 **args)


def mdetr_tiny(vocab_size: int = 64, contrastive_dim: int = 16, **kw) -> MDETRForPhraseGrounding:
    """Phrase grounding on 2 CPU cores: a narrow resnet-18-like body (1 basic block per stage, width 8), a
    1-layer width-32 text encoder over the synthetic vocabulary, DETR 2 + 2 layers of width 32, 8 queries."""
    return MDETRForPhraseGrounding(_tiny(vocab_size, 0, **kw), contrastive_dim)


def mdetr_tiny_vqa(heads: tuple[tuple[str, int], ...] = (("answer_type", 5), ("answer_obj", 3), ("answer_rel", 8),
                                                          ("answer_attr", 16), ("answer_cat", 8), ("answer_global", 4)),
                   vocab_size: int = 64, contrastive_dim: int = 16, **kw) -> MDETRForVQA:
    """:func:`mdetr_tiny` with small question-type heads (the synthetic VQA questions)."""
    return MDETRForVQA(_tiny(vocab_size, len(heads), **kw), tuple(heads), contrastive_dim)


BUILDERS: dict[str, Callable[..., Any]] = {f.__name__: f for f in (
    mdetr_resnet101, mdetr_for_phrase_grounding, mdetr_for_vqa, mdetr_tiny, mdetr_tiny_vqa)}


def build(name: str, **kw) -> Any:
    """A registered builder by name (dashes allowed)."""
    key = name.replace("-", "_")
    if key not in BUILDERS:
        raise ValueError(f"unknown MDETR builder {name!r}; expected one of {sorted(BUILDERS)}")
    return BUILDERS[key](**kw)
