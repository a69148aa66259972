"""Every open_clip name ``models.clip.build`` accepts means exactly open_clip's architecture."""

from __future__ import annotations

import pytest

from polymodal.models.clip import ALIASES, BUILDERS, build, canonical_name
from polymodal.models.clip.resnet import ModifiedResNet

open_clip = pytest.importorskip("open_clip")

# config fields compared below, and fields whose open_clip default we reproduce
_VISION_KEYS = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"}
_TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}


def _accepted(name: str) -> bool:
    try:
        canonical_name(name)
    except ValueError:
        return False
    return True


OPEN_CLIP_NAMES = [n for n in open_clip.list_models() if _accepted(n)]


def test_the_published_names_are_all_covered():
    expected = {"RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"}
    assert expected | {n + "-quickgelu" for n in expected} <= set(OPEN_CLIP_NAMES)
    assert {n for n in ALIASES if "/" not in n} <= set(OPEN_CLIP_NAMES)


def _ours(spec) -> dict:
    text = spec.text.encoder
    tl = text.transformer.layer
    out = {
        "embed_dim": spec.embed_dim,
        "text": dict(context_length=text.context_length, vocab_size=text.token_embedding.num_embeddings,
                     width=tl.d_model, heads=tl.num_heads, layers=text.transformer.num_layers,
                     mlp_ratio=tl.dim_feedforward / tl.d_model, act=tl.activation),
    }
    v = spec.visual
    if isinstance(v, ModifiedResNet):
        out["vision"] = dict(image_size=v.image_size, layers=tuple(v.layers), width=v.width, heads=v.heads)
    else:
        e, vl = v.encoder, v.encoder.transformer.layer
        out["vision"] = dict(image_size=tuple(e.embeddings.image_size), patch_size=tuple(e.embeddings.patch_size),
                             width=vl.d_model, heads=vl.num_heads, layers=e.transformer.num_layers,
                             mlp_ratio=vl.dim_feedforward / vl.d_model, act=vl.activation)
    return out


def _theirs(cfg: dict) -> dict:
    """The architecture open_clip builds from its config (defaults from open_clip's CLIPVisionCfg / CLIPTextCfg)."""
    vc, tc = cfg["vision_cfg"], cfg["text_cfg"]
    assert set(vc) <= _VISION_KEYS and set(tc) <= _TEXT_KEYS, "a config field this comparison does not model"
    act = "quick_gelu" if cfg.get("quick_gelu", False) else "gelu"
    out = {
        "embed_dim": cfg["embed_dim"],
        "text": dict(context_length=tc["context_length"], vocab_size=tc["vocab_size"], width=tc["width"],
                     heads=tc["heads"], layers=tc["layers"], mlp_ratio=float(tc.get("mlp_ratio", 4.0)), act=act),
    }
    head_width = vc.get("head_width", 64)
    if isinstance(vc["layers"], (list, tuple)):  # ModifiedResNet: heads = width * 32 // head_width
        out["vision"] = dict(image_size=vc["image_size"], layers=tuple(vc["layers"]), width=vc["width"],
                             heads=vc["width"] * 32 // head_width)
    else:
        size, patch = vc["image_size"], vc["patch_size"]
        out["vision"] = dict(image_size=(size, size) if isinstance(size, int) else tuple(size),
                             patch_size=(patch, patch) if isinstance(patch, int) else tuple(patch),
                             width=vc["width"], heads=vc["width"] // head_width, layers=vc["layers"],
                             mlp_ratio=float(vc.get("mlp_ratio", 4.0)), act=act)
    return out


@pytest.mark.parametrize("name", OPEN_CLIP_NAMES)
def test_build_matches_open_clip_config(name):
    assert _ours(build(name)) == _theirs(open_clip.get_model_config(name))


@pytest.mark.parametrize("name", ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-L-14-336"])
def test_open_clip_names_use_gelu_and_quickgelu_suffix_quickgelu(name):
    assert _ours(build(name))["text"]["act"] == "gelu"
    assert _ours(build(name + "-quickgelu"))["text"]["act"] == "quick_gelu"


def test_openai_and_builder_names_keep_quickgelu():
    for name in ["ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px", *BUILDERS]:
        assert _ours(build(name))["text"]["act"] == "quick_gelu", name
