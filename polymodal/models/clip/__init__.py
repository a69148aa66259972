"""CLIP (Radford et al. 2021): specs, the published builders, checkpoint converters.

>>> from polymodal.core import random as pr
>>> clip = build("clip_tiny")
>>> params = clip.init(key=pr.key(0))
>>> sorted(params)
['logit_scale', 'text', 'visual']
"""

from .builders import (
    ALIASES, BUILDERS, build, canonical_name, clip_rn50, clip_rn50x4, clip_rn50x16, clip_rn50x64, clip_rn101, clip_small,
    clip_tiny, clip_tiny_rn, clip_vit_b16, clip_vit_b32, clip_vit_l14, clip_vit_l14_336,
)
from .convert import (
    config_from_open_clip, config_from_torchmultimodal, detect_layout, from_open_clip, from_torchmultimodal,
    to_open_clip, to_torchmultimodal,
)
from .model import CLIP, CLIPOutput
from .resnet import AttentionPool2d, Bottleneck, ModifiedResNet
from .text import CLIPTextTransformer, clip_text_transformer, trim_padding
from .pretrained import OPENAI_URLS, Pretrained, load_pretrained
from .vision import CLIPVisionTransformer, clip_vision_transformer

__all__ = [
    "CLIP", "CLIPOutput", "CLIPVisionTransformer", "clip_vision_transformer", "ModifiedResNet", "Bottleneck",
    "AttentionPool2d", "CLIPTextTransformer", "clip_text_transformer", "trim_padding",
    "build", "canonical_name", "BUILDERS", "ALIASES", "clip_vit_b16", "clip_vit_b32", "clip_vit_l14",
    "clip_vit_l14_336", "clip_rn50", "clip_rn101", "clip_rn50x4", "clip_rn50x16", "clip_rn50x64", "clip_tiny",
    "clip_tiny_rn", "clip_small", "from_open_clip", "to_open_clip", "from_torchmultimodal", "to_torchmultimodal",
    "config_from_open_clip", "config_from_torchmultimodal", "detect_layout", "load_pretrained", "Pretrained",
    "OPENAI_URLS",
]

from ...registry import register_family  # noqa: E402

# CLI preset -> builder. "tiny" has a ResNet image tower: on a CPU it learns the synthetic shapes
# several times faster than the patch-8 ViT ("tiny-vit").
register_family(
    "clip",
    builders=BUILDERS,
    presets={"tiny": "clip_tiny_rn", "tiny-vit": "clip_tiny", "small": "clip_small", "vit-b32": "clip_vit_b32",
             "vit-b16": "clip_vit_b16", "rn50": "clip_rn50"},
    task="polymodal.models.clip.task:CLIPTask",
    description="contrastive image-text pretraining (Radford et al. 2021)",
    extra={"build": build, "load_pretrained": load_pretrained},  # OpenAI / open_clip names; polymodal.nn shells
)
# The same presets' image towers + a linear head, classifying the synthetic shapes (optionally DP-SGD).
register_family(
    "classifier",
    builders={},
    builders_from="clip",
    presets={"tiny-vit": "clip_tiny", "tiny": "clip_tiny_rn", "small": "clip_small", "vit-b32": "clip_vit_b32",
             "vit-b16": "clip_vit_b16", "rn50": "clip_rn50"},
    task="polymodal.models.clip.classifier:ClassifierTask",
    description="fine-tune a CLIP image tower + linear head for classification, optionally with DP-SGD",
)
