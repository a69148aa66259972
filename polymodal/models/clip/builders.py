"""Named CLIP configurations: the nine published models and three small CPU presets.

The published numbers are the CLIP paper's (Radford et al. 2021, arXiv:2103.00020), Table 19
(CLIP-ResNet: embedding dim, input resolution, blocks per stage, width = 32 x stem width,
text width and heads) and Table 20 (CLIP-ViT), and equal OpenAI's released checkpoints and
model card: every text tower has 12 layers, context 77 and vocabulary 49408; attention heads
are width / 64. OpenAI trained with QuickGELU; ``quick_gelu=False`` gives open_clip's
GELU variants of the same name (``"ViT-B-32"`` rather than ``"ViT-B-32-quickgelu"``).

>>> spec = build("ViT-B/32")
>>> spec.visual.encoder.embeddings.patch_size, spec.embed_dim
((32, 32), 512)
>>> sorted(BUILDERS)[:3]
['clip_rn101', 'clip_rn50', 'clip_rn50x16']
"""

from __future__ import annotations

from collections.abc import Callable

from .model import CLIP
from .resnet import ModifiedResNet
from .text import CLIPTextTransformer, clip_text_transformer
from .vision import clip_vision_transformer

__all__ = [
    "clip_vit_b16", "clip_vit_b32", "clip_vit_l14", "clip_vit_l14_336", "clip_rn50", "clip_rn101", "clip_rn50x4",
    "clip_rn50x16", "clip_rn50x64", "clip_tiny", "clip_tiny_rn", "clip_small", "build", "BUILDERS", "ALIASES", "canonical_name",
]


def _act(quick_gelu: bool) -> str:
    return "quick_gelu" if quick_gelu else "gelu"


def _text(embed: int, width: int, quick_gelu: bool) -> CLIPTextTransformer:
    return clip_text_transformer(context_length=77, vocab_size=49408, width=width, heads=width // 64, layers=12,
                                 activation=_act(quick_gelu), embed_dim=embed)


def _vit(embed: int, size: int, patch: int, layers: int, width: int, text_width: int, quick_gelu: bool) -> CLIP:
    visual = clip_vision_transformer(image_size=size, patch_size=patch, width=width, layers=layers, heads=width // 64,
                                     activation=_act(quick_gelu), embed_dim=embed)
    return CLIP(visual=visual, text=_text(embed, text_width, quick_gelu))


def _rn(embed: int, size: int, blocks: tuple[int, int, int, int], width: int, text_width: int,
        quick_gelu: bool) -> CLIP:
    visual = ModifiedResNet(image_size=size, layers=blocks, width=width, heads=width * 32 // 64, embed_dim=embed)
    return CLIP(visual=visual, text=_text(embed, text_width, quick_gelu))


def clip_vit_b32(quick_gelu: bool = True) -> CLIP:
    """ViT-B/32: 224 px, patch 32, 12 x 768 (12 heads); text 12 x 512 (8 heads); embedding 512. 151.3M params."""
    return _vit(512, 224, 32, 12, 768, 512, quick_gelu)


def clip_vit_b16(quick_gelu: bool = True) -> CLIP:
    """ViT-B/16: 224 px, patch 16, 12 x 768 (12 heads); text 12 x 512 (8 heads); embedding 512. 149.6M params."""
    return _vit(512, 224, 16, 12, 768, 512, quick_gelu)


def clip_vit_l14(quick_gelu: bool = True) -> CLIP:
    """ViT-L/14: 224 px, patch 14, 24 x 1024 (16 heads); text 12 x 768 (12 heads); embedding 768. 427.6M params."""
    return _vit(768, 224, 14, 24, 1024, 768, quick_gelu)


def clip_vit_l14_336(quick_gelu: bool = True) -> CLIP:
    """ViT-L/14@336px: ViT-L/14 at 336 px (fine-tuned one extra epoch in the paper). 428.0M params."""
    return _vit(768, 336, 14, 24, 1024, 768, quick_gelu)


def clip_rn50(quick_gelu: bool = True) -> CLIP:
    """RN50: 224 px, blocks (3, 4, 6, 3), width 2048; text 12 x 512 (8 heads); embedding 1024. 102.0M params."""
    return _rn(1024, 224, (3, 4, 6, 3), 64, 512, quick_gelu)


def clip_rn101(quick_gelu: bool = True) -> CLIP:
    """RN101: 224 px, blocks (3, 4, 23, 3), width 2048; text 12 x 512 (8 heads); embedding 512. 119.7M params."""
    return _rn(512, 224, (3, 4, 23, 3), 64, 512, quick_gelu)


def clip_rn50x4(quick_gelu: bool = True) -> CLIP:
    """RN50x4: 288 px, blocks (4, 6, 10, 6), width 2560; text 12 x 640 (10 heads); embedding 640. 178.3M params."""
    return _rn(640, 288, (4, 6, 10, 6), 80, 640, quick_gelu)


def clip_rn50x16(quick_gelu: bool = True) -> CLIP:
    """RN50x16: 384 px, blocks (6, 8, 18, 8), width 3072; text 12 x 768 (12 heads); embedding 768. 290.98M params."""
    return _rn(768, 384, (6, 8, 18, 8), 96, 768, quick_gelu)


def clip_rn50x64(quick_gelu: bool = True) -> CLIP:
    """RN50x64: 448 px, blocks (3, 15, 36, 10), width 4096; text 12 x 1024 (16 heads); embedding 1024. 623.3M params."""
    return _rn(1024, 448, (3, 15, 36, 10), 128, 1024, quick_gelu)


def clip_tiny(quick_gelu: bool = True) -> CLIP:
    """CPU-sized preset (not a published model): 64 px, patch 8 (64 patches), 2 x 128 (4 heads);
    text context 32, 2 x 128 (4 heads), CLIP's 49408-token vocabulary; embedding 128.
    Trains on the synthetic shapes data on a laptop CPU (tokenize with ``CLIPTokenizer(context_length=32)``)."""
    visual = clip_vision_transformer(image_size=64, patch_size=8, width=128, layers=2, heads=4,
                                     activation=_act(quick_gelu), embed_dim=128)
    text = clip_text_transformer(context_length=32, vocab_size=49408, width=128, heads=4, layers=2,
                                 activation=_act(quick_gelu), embed_dim=128)
    return CLIP(visual=visual, text=text)


def clip_tiny_rn(quick_gelu: bool = True) -> CLIP:
    """CPU-sized preset (not a published model) with a ResNet image tower: 64 px, CLIP's modified
    ResNet with one bottleneck per stage and stem width 16 (attention pool 512 wide, 8 heads);
    text context 16, 2 x 64 (2 heads); embedding 64. About 1.4M params besides the 3.2M of the
    token embedding. It learns shapes far faster per CPU second than :func:`clip_tiny`'s patch-8
    ViT (the demo's preset: >= 95% zero-shot on the synthetic shapes in two minutes on two cores).
    Train it with batch-norm state (``init_state()``, ``training=True``)."""
    visual = ModifiedResNet(image_size=64, layers=(1, 1, 1, 1), width=16, heads=8, embed_dim=64)
    text = clip_text_transformer(context_length=16, vocab_size=49408, width=64, heads=2, layers=2,
                                 activation=_act(quick_gelu), embed_dim=64)
    return CLIP(visual=visual, text=text)


def clip_small(quick_gelu: bool = True) -> CLIP:
    """CPU-sized preset (not a published model), a step above :func:`clip_tiny`: 64 px, patch 8,
    4 x 256 (4 heads); text context 32, 4 x 256 (4 heads); embedding 256."""
    visual = clip_vision_transformer(image_size=64, patch_size=8, width=256, layers=4, heads=4,
                                     activation=_act(quick_gelu), embed_dim=256)
    text = clip_text_transformer(context_length=32, vocab_size=49408, width=256, heads=4, layers=4,
                                 activation=_act(quick_gelu), embed_dim=256)
    return CLIP(visual=visual, text=text)


BUILDERS: dict[str, Callable[..., CLIP]] = {
    f.__name__: f for f in (clip_vit_b16, clip_vit_b32, clip_vit_l14, clip_vit_l14_336, clip_rn50, clip_rn101,
                            clip_rn50x4, clip_rn50x16, clip_rn50x64, clip_tiny, clip_tiny_rn, clip_small)
}

# OpenAI's names (clip.available_models()) and open_clip's, for the same architectures.
ALIASES: dict[str, str] = {
    "ViT-B/32": "clip_vit_b32", "ViT-B-32": "clip_vit_b32", "ViT-B/16": "clip_vit_b16", "ViT-B-16": "clip_vit_b16",
    "ViT-L/14": "clip_vit_l14", "ViT-L-14": "clip_vit_l14", "ViT-L/14@336px": "clip_vit_l14_336",
    "ViT-L-14-336": "clip_vit_l14_336", "RN50": "clip_rn50", "RN101": "clip_rn101", "RN50x4": "clip_rn50x4",
    "RN50x16": "clip_rn50x16", "RN50x64": "clip_rn50x64",
}


def canonical_name(name: str) -> tuple[str, bool | None]:
    """``(builder name, quick_gelu)`` for a builder, OpenAI or open_clip name.

    open_clip's ``-quickgelu`` suffix gives ``True``; its other names (``"ViT-B-32"``, and
    ``"RN50"`` ... which OpenAI uses too) ``False``, exactly as open_clip builds them (GELU);
    builder names and OpenAI's slashed names (``"ViT-B/32"``) ``None``: the builder's default,
    QuickGELU. (OpenAI's ResNet weights need QuickGELU: ``"RN50-quickgelu"``, or
    ``load_pretrained``, whose ``quick_gelu`` defaults to ``True``.)

    >>> canonical_name("ViT-B-32"), canonical_name("ViT-B/32"), canonical_name("RN50"), canonical_name("RN50-quickgelu")
    (('clip_vit_b32', False), ('clip_vit_b32', None), ('clip_rn50', False), ('clip_rn50', True))
    """
    quick = None
    if name.endswith("-quickgelu"):
        name, quick = name[: -len("-quickgelu")], True
    if name in BUILDERS:
        return name, quick
    if name in ALIASES:
        if quick is None and "/" not in name:
            quick = False  # open_clip's "ViT-B-32" / "RN50" use GELU; OpenAI's weights use QuickGELU
        return ALIASES[name], quick
    known = sorted(BUILDERS) + sorted(ALIASES)
    raise ValueError(f"unknown CLIP model {name!r}; expected one of {known} (open_clip names may end in -quickgelu)")


def build(name: str, **kwargs) -> CLIP:
    """The CLIP spec for a builder name (``"clip_vit_b32"``), an OpenAI name (``"ViT-B/32"``) or an
    open_clip name (``"ViT-B-32"``, GELU; ``"ViT-B-32-quickgelu"``); ``kwargs`` go to the builder."""
    builder, quick = canonical_name(name)
    if quick is not None:
        kwargs.setdefault("quick_gelu", quick)
    return BUILDERS[builder](**kwargs)
