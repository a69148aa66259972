"""Shared encoders built from the core layers: the Vision Transformer, the text transformer,
Video Swin (Swin3D). Model families compose them as fields of their specs."""

from .bert import BERTOutput, BERTTextEmbeddings, BERTTextEncoder, bert_text_encoder
from .bert_heads import MaskedLMHead, SequenceClassificationHead
from .text import TextOutput, TextTransformer, text_transformer
from .vit import VisionTransformer, ViTOutput, resize_position_embeddings, vision_transformer, vit_b_16, vit_b_32, \
    vit_h_14, vit_l_16, vit_l_32

__all__ = ["VisionTransformer", "ViTOutput", "vision_transformer", "resize_position_embeddings", "vit_b_16", "vit_b_32",
           "vit_l_16", "vit_l_32", "vit_h_14", "TextTransformer", "TextOutput", "text_transformer",
           "BERTOutput", "BERTTextEmbeddings", "BERTTextEncoder", "bert_text_encoder", "MaskedLMHead",
           "SequenceClassificationHead"]
