"""ALBEF configurations: the reference's (Li et al. 2021, Section 4 "Implementation details"; TorchMultimodal
``examples/albef/configs/{retrieval,vqa}.yaml``) and a tiny preset that trains on 2 CPU cores.

ALBEF: ViT-B/16 image encoder (12 layers, 768, 12 heads, MLP 3072, LayerNorm eps 1e-6), text encoder =
the first 6 layers of BERT-base, multimodal encoder = the last 6 (cross-attention to the image in every
layer), projections to 256, queue 65,536, momentum 0.995, temperature 0.07. Fine-tuning runs at 384 px;
pretraining (``ALBEFVisionEncoder``'s default) at 256 px.

>>> spec = albef_tiny()
>>> spec.embed_size, spec.model.vision.width, spec.queue_size
(32, 64, 256)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ...core.encoders.bert import BERTTextEncoder, bert_text_encoder
from ...core.encoders.bert_heads import MaskedLMHead
from ...core.encoders.vit import vision_transformer
from ...core.layers.linear import Linear
from ...core.layers.transformer import TransformerEncoder
from .heads import PredictionHead
from .model import ALBEFModel
from .retrieval import ALBEFForRetrieval
from .vqa import ALBEFForVQA

__all__ = ["albef_model", "albef_retrieval", "albef_pretraining", "albef_vqa", "albef_tiny", "albef_vqa_tiny",
           "BUILDERS", "build"]


def _multimodal(hidden: int, layers: int, heads: int, ff: int, dim_kv: int, causal: bool = False
                ) -> TransformerEncoder:
    enc = bert_text_encoder(vocab_size=2, hidden_size=hidden, num_layers=layers, num_heads=heads,
                            intermediate_size=ff, pooler=False, cross_attention_every=1, dim_kv=dim_kv).encoder
    if causal:
        enc = dataclasses.replace(enc, layer=dataclasses.replace(enc.layer, is_causal=True))
    return enc


def albef_model(*, image_size: int = 384, patch_size: int = 16, vision_width: int = 768, vision_layers: int = 12,
                vision_heads: int = 12, vision_mlp: int = 3072, vocab_size: int = 30522, hidden_size: int = 768,
                text_layers: int = 6, multimodal_layers: int = 6, num_heads: int = 12, intermediate_size: int = 3072,
                max_position_embeddings: int = 512, type_vocab_size: int = 2, pad_token_id: int = 0,
                dropout: float = 0.0) -> ALBEFModel:
    """The three encoders (defaults: the reference's retrieval / VQA configuration)."""
    vision = vision_transformer(image_size=image_size, patch_size=patch_size, width=vision_width, layers=vision_layers,
                                heads=vision_heads, mlp_dim=vision_mlp, layer_norm_eps=1e-6, dropout=dropout)
    text = bert_text_encoder(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=text_layers,
                             num_heads=num_heads, intermediate_size=intermediate_size,
                             max_position_embeddings=max_position_embeddings, type_vocab_size=type_vocab_size,
                             pad_token_id=pad_token_id, pooler=False, dropout=dropout)
    return ALBEFModel(vision, text, _multimodal(hidden_size, multimodal_layers, num_heads, intermediate_size,
                                                vision_width))


def albef_retrieval(*, embed_size: int = 256, queue_size: int = 65536, momentum: float = 0.995, temp: float = 0.07,
                    mlm: bool = False, negatives_by_idx: bool = True, **model_kw: Any) -> ALBEFForRetrieval:
    """ALBEF for retrieval fine-tuning (``configs/retrieval.yaml``: 384 px, embed 256, queue 65,536);
    ``mlm=True`` adds the masked-LM head (pretraining's third objective)."""
    model = albef_model(**model_kw)
    h, vw = model.hidden_size, model.vision.width
    head = MaskedLMHead(h, model.text.embeddings.vocab_size, layer_norm_eps=1e-12) if mlm else None
    return ALBEFForRetrieval(model, Linear(vw, embed_size), Linear(h, embed_size), Linear(h, 2), head,
                             queue_size, momentum, temp, negatives_by_idx)


def albef_pretraining(**kw: Any) -> ALBEFForRetrieval:
    """ALBEF pretraining (ITC + ITM + MLM, Li et al. 2021 Section 3): 256 px images (the paper's
    pretraining resolution, ``ALBEFVisionEncoder``'s default)."""
    return albef_retrieval(**({"image_size": 256, "mlm": True} | kw))


def albef_vqa(*, momentum: float = 0.995, **model_kw: Any) -> ALBEFForVQA:
    """ALBEF for VQA (``configs/vqa.yaml``): the encoders plus a 6-layer answer decoder (text embeddings,
    causal layers cross-attending to the question's multimodal states, prediction head)."""
    model = albef_model(**model_kw)
    emb = model.text.embeddings
    h = model.hidden_size
    lay = model.multimodal.layer
    decoder = BERTTextEncoder(emb, _multimodal(h, model.multimodal.num_layers, lay.num_heads, lay.dim_feedforward, h,
                                               causal=True), pooler=False)
    return ALBEFForVQA(model, decoder, PredictionHead(h, emb.vocab_size), momentum)


_TINY = dict(image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=4, vision_mlp=128,
             vocab_size=64, hidden_size=64, text_layers=2, multimodal_layers=2, num_heads=4, intermediate_size=128,
             max_position_embeddings=32)


def albef_tiny(**kw: Any) -> ALBEFForRetrieval:
    """A tiny ALBEF (32 px, patch 8, width 64, 2 + 2 + 2 layers, embed 32, queue 256) with the MLM head:
    trains on the synthetic shapes on 2 CPU cores."""
    return albef_retrieval(**(_TINY | {"embed_size": 32, "queue_size": 256, "mlm": True} | kw))


def albef_vqa_tiny(**kw: Any) -> ALBEFForVQA:
    """The tiny configuration with an answer decoder (the synthetic VQA task)."""
    return albef_vqa(**(_TINY | kw))


BUILDERS = {f.__name__: f for f in (albef_retrieval, albef_pretraining, albef_vqa, albef_tiny, albef_vqa_tiny)}


def build(name: str, **kw: Any) -> Any:
    """A registered builder by name (``"albef_retrieval"``; dashes allowed)."""
    key = name.replace("-", "_")
    if key not in BUILDERS:
        raise ValueError(f"unknown ALBEF builder {name!r}; expected one of {sorted(BUILDERS)}")
    return BUILDERS[key](**kw)
