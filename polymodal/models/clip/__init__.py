"""CLIP (Radford et al. 2021): configs, specs, the published builders, checkpoint converters.

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
from .config import CLIPConfig, ModifiedResNetConfig, TextConfig, VisionTransformerConfig
from .convert import (
    config_from_open_clip, config_from_torchmultimodal, detect_layout, from_open_clip, from_torchmultimodal,
    to_open_clip, to_torchmultimodal,
)
from .model import CLIP, CLIPOutput
from .resnet import AttentionPool2d, Bottleneck, ModifiedResNet
from .text import TextTransformer, trim_padding
from .pretrained import OPENAI_URLS, Pretrained, load_pretrained
from .vision import VisionTransformer

__all__ = [
    "CLIP", "CLIPOutput", "CLIPConfig", "ModifiedResNetConfig", "TextConfig", "VisionTransformerConfig",
    "VisionTransformer", "ModifiedResNet", "Bottleneck", "AttentionPool2d", "TextTransformer", "trim_padding",
    "build", "canonical_name", "BUILDERS", "ALIASES", "clip_vit_b16", "clip_vit_b32", "clip_vit_l14",
    "clip_vit_l14_336", "clip_rn50", "clip_rn101", "clip_rn50x4", "clip_rn50x16", "clip_rn50x64", "clip_tiny",
    "clip_tiny_rn", "clip_small", "from_open_clip", "to_open_clip", "from_torchmultimodal", "to_torchmultimodal",
    "config_from_open_clip", "config_from_torchmultimodal", "detect_layout", "load_pretrained", "Pretrained",
    "OPENAI_URLS",
]
