"""MDETR (Kamath et al. 2021): modulated detection for phrase grounding and VQA, on the core's
frozen-norm ResNet (``core/encoders/resnet.py``), RoBERTa encoder (``core/encoders/bert.py``) and DETR
transformer layers; Hungarian matching, MDETR's losses, post-processing to image boxes, TorchMultimodal
converters, published checkpoints and ``polymodal train mdetr --preset tiny`` on synthetic scenes.
"""

from .builders import (
    BUILDERS, build, mdetr, mdetr_for_phrase_grounding, mdetr_for_vqa, mdetr_resnet101, mdetr_roberta_text_encoder,
    mdetr_tiny, mdetr_tiny_vqa,
)
from .convert import from_torchmultimodal, to_torchmultimodal, torchmultimodal_table
from .heads import GQA_HEADS, GroundingOutput, MDETRForPhraseGrounding, MDETRForVQA, VQAOutput
from .loss import (
    GQA_TYPES, box_losses, contrastive_alignment_loss, gqa_masks, masked_accuracy, masked_cross_entropy,
    soft_token_loss, vqa_accuracy,
)
from .matcher import hungarian_match, matching_cost
from .model import MDETR, MDETROutput, pad_images, pad_text
from .pretrained import URLS, load_pretrained, read_checkpoint
from .postprocess import alignment_scores, phrase_scores, rank_phrase_boxes, recall_at_k, to_image_boxes
from .transformer import FeatureResizer, MDETRTransformer, sine_position_embedding_2d

__all__ = [
    "BUILDERS", "build", "mdetr", "mdetr_for_phrase_grounding", "mdetr_for_vqa", "mdetr_resnet101",
    "mdetr_roberta_text_encoder", "mdetr_tiny", "mdetr_tiny_vqa", "from_torchmultimodal", "to_torchmultimodal",
    "torchmultimodal_table", "GQA_HEADS", "GroundingOutput", "MDETRForPhraseGrounding", "MDETRForVQA", "VQAOutput",
    "GQA_TYPES", "box_losses", "contrastive_alignment_loss", "gqa_masks", "masked_accuracy", "masked_cross_entropy",
    "soft_token_loss", "vqa_accuracy", "hungarian_match", "matching_cost", "MDETR", "MDETROutput", "pad_images",
    "pad_text", "alignment_scores", "phrase_scores", "rank_phrase_boxes", "recall_at_k", "to_image_boxes", "FeatureResizer",
    "MDETRTransformer", "sine_position_embedding_2d", "URLS", "load_pretrained", "read_checkpoint",
]

from ...registry import register_family  # noqa: E402



def _load_pretrained(name, path=None, cache_dir=None, **kw):
    """``polymodal.nn`` shells' loader (``polymodal.nn.build("mdetr_for_phrase_grounding", pretrained=...)``)."""
    from .pretrained import load_pretrained

    pre = load_pretrained(kw.pop("checkpoint", "mdetr_resnet101_pretrained"), path=path, cache_dir=cache_dir, **kw)
    return pre.spec, pre.params, None


register_family(
    "mdetr",
    builders=BUILDERS,
    presets={"tiny": "mdetr_tiny", "tiny-vqa": "mdetr_tiny_vqa"},
    task="polymodal.models.mdetr.task:MDETRTask",
    description="modulated detection: phrase grounding and VQA (Kamath et al. 2021)",
    extra={"build": build, "load_pretrained": _load_pretrained},
)
