"""Checkpoint layouts <-> polymodal CLIP params (and batch-norm state).

* OpenAI / open_clip (one layout: ``visual.*``, ``token_embedding``, ``transformer.resblocks.*``,
  ``ln_final``, ``text_projection``, ``logit_scale``): :func:`from_open_clip`, :func:`to_open_clip`.
  OpenAI's extra integer entries (``input_resolution``, ``context_length``, ``vocab_size``) are dropped.
* TorchMultimodal (``encoder_a.*`` image, ``encoder_b.*`` text; no temperature, it lives in the
  loss): :func:`from_torchmultimodal`, :func:`to_torchmultimodal`.

The architecture is read off the shapes (:func:`config_from_open_clip`,
:func:`config_from_torchmultimodal`) unless a spec is given; only the activation cannot be
seen in a state dict (``quick_gelu=True``: OpenAI's weights). A key that maps nowhere, a missing
key or a wrong shape raises a ``ValueError`` naming every such key.

ResNet towers have batch-norm running statistics: ``with_state=True`` returns
``(params, state)``; without it they are dropped (with a warning when they are not the
initial ones, since a pretrained ResNet is wrong without them).

>>> import torch
>>> from polymodal.core import random as pr
>>> from polymodal.models.clip import build
>>> spec = build("clip_tiny")
>>> params = spec.init(key=pr.key(0))
>>> sd = to_open_clip(params)
>>> sd["visual.conv1.weight"].shape, sd["transformer.resblocks.0.mlp.c_fc.weight"].shape
(torch.Size([128, 3, 8, 8]), torch.Size([512, 128]))
>>> back = from_open_clip(sd, spec)
>>> bool((back["visual"]["proj"] == params["visual"]["proj"]).all())
True
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor

from ...core.convert import Rule, Table, transpose, unsqueeze
from ...core.pytree import Params, flatten
from .model import CLIP
from .resnet import ModifiedResNet
from .text import clip_text_transformer
from .vision import clip_vision_transformer

__all__ = [
    "from_open_clip", "to_open_clip", "from_torchmultimodal", "to_torchmultimodal", "config_from_open_clip",
    "config_from_torchmultimodal", "detect_layout", "OPEN_CLIP", "OPEN_CLIP_RESNET", "TORCHMULTIMODAL",
    "TORCHMULTIMODAL_RESNET",
]

_STATS = ("running_mean", "running_var", "num_batches_tracked")


# --- key tables (core/convert.py runs them both ways) --------------------------------------------------

def _block(theirs: str, ours: str) -> tuple[Rule, ...]:
    """open_clip's residual attention block <-> torch's ``TransformerEncoderLayer`` names."""
    pairs = (("ln_1.{p}", "norm1.{p}"), ("ln_2.{p}", "norm2.{p}"), ("attn.{p*}", "self_attn.{p*}"),
             ("mlp.c_fc.{p}", "linear1.{p}"), ("mlp.c_proj.{p}", "linear2.{p}"))
    return tuple(Rule(f"{theirs}.{{i}}.{a}", f"{ours}.{{i}}.{b}") for a, b in pairs)


# OpenAI's extra integer entries and TorchScript's causal-mask attributes: not parameters.
_DROP = ("input_resolution", "context_length", "vocab_size", "attn_mask", "{m*}.attn_mask")

_OC_TEXT = Table((
    Rule("logit_scale", "logit_scale"),
    *_block("transformer.resblocks", "text.transformer.layers"),
    Rule("token_embedding.weight", "text.token_embedding.weight"),
    Rule("positional_embedding", "text.positional_embedding"),
    Rule("text_projection", "text.text_projection"),
    Rule("ln_final.{p}", "text.ln_final.{p}"),
), drop=_DROP, name="from_open_clip: the open_clip / OpenAI state dict")

OPEN_CLIP = _OC_TEXT + Table((
    *_block("visual.transformer.resblocks", "visual.transformer.layers"),
    Rule("visual.conv1.weight", "visual.embeddings.conv_projection.weight"),
    Rule("visual.class_embedding", "visual.embeddings.cls_token", unsqueeze(2)),
    Rule("visual.positional_embedding", "visual.embeddings.position_embeddings", unsqueeze(1)),
    Rule("visual.{n}.{p}", "visual.{n}.{p}"),  # ln_pre, ln_post
    Rule("visual.proj", "visual.proj"),
))
"""open_clip / OpenAI CLIP with a ViT image tower."""

OPEN_CLIP_RESNET = _OC_TEXT + Table((Rule("visual.{rest*}", "visual.{rest*}"),))
"""open_clip / OpenAI CLIP with a ModifiedResNet image tower (same names; batch-norm statistics are state)."""

_TMM_TEXT = Table((
    Rule("logit_scale", "logit_scale"),  # not in TorchMultimodal's CLIP (its loss keeps it); read if merged in
    Rule("encoder_b.encoder.layers.{i}.{p*}", "text.transformer.layers.{i}.{p*}"),
    Rule("encoder_b.projection.weight", "text.text_projection", transpose()),
    Rule("encoder_b.{n}.{p}", "text.{n}.{p}"),  # token_embedding, ln_final
    Rule("encoder_b.positional_embedding", "text.positional_embedding"),
), drop=_DROP, defaults=(("logit_scale", lambda spec: torch.tensor(float(spec.logit_scale_init))),),
    name="from_torchmultimodal: the TorchMultimodal state dict")

TORCHMULTIMODAL = _TMM_TEXT + Table((
    Rule("encoder_a.encoder.layers.{i}.{p*}", "visual.transformer.layers.{i}.{p*}"),
    Rule("encoder_a.conv.weight", "visual.embeddings.conv_projection.weight"),
    Rule("encoder_a.cls_token_embedding", "visual.embeddings.cls_token", unsqueeze(2)),
    Rule("encoder_a.positional_embedding", "visual.embeddings.position_embeddings", unsqueeze(1)),
    Rule("encoder_a.projection", "visual.proj"),
    Rule("encoder_a.{n}.{p}", "visual.{n}.{p}"),  # ln_pre, ln_post
))
"""TorchMultimodal CLIP with a ViT image tower (``encoder_a`` image, ``encoder_b`` text)."""

TORCHMULTIMODAL_RESNET = _TMM_TEXT + Table((Rule("encoder_a.{rest*}", "visual.{rest*}"),))
"""TorchMultimodal CLIP with a ``ResNetForCLIP`` image tower."""


# --- config inference from our flat names -------------------------------------------------------------

def _count(flat: Mapping[str, Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m[1] for k in flat if (m := rx.fullmatch(k))})


def _config_from_ours(flat: Mapping[str, Tensor], quick_gelu: bool, what: str) -> CLIP:
    act = "quick_gelu" if quick_gelu else "gelu"
    try:
        tok = flat["text.token_embedding.weight"]
        width = tok.shape[1]
        embed = flat["text.text_projection"].shape[1]
        text = clip_text_transformer(
            context_length=flat["text.positional_embedding"].shape[0], vocab_size=tok.shape[0], width=width,
            heads=max(width // 64, 1), layers=_count(flat, r"text\.transformer\.layers\.(\d+)\..+"),
            mlp_ratio=flat["text.transformer.layers.0.linear1.weight"].shape[0] / width, activation=act,
            embed_dim=embed)
        if "visual.embeddings.conv_projection.weight" in flat:
            conv = flat["visual.embeddings.conv_projection.weight"]
            w, patch = conv.shape[0], conv.shape[-1]
            grid = round((flat["visual.embeddings.position_embeddings"].shape[-2] - 1) ** 0.5)
            vision = clip_vision_transformer(
                image_size=grid * patch, patch_size=patch, width=w, heads=max(w // 64, 1),
                layers=_count(flat, r"visual\.transformer\.layers\.(\d+)\..+"),
                mlp_ratio=flat["visual.transformer.layers.0.linear1.weight"].shape[0] / w, activation=act,
                embed_dim=embed)
        else:
            w = flat["visual.layer1.0.conv1.weight"].shape[0]
            blocks = tuple(_count(flat, rf"visual\.layer{s}\.(\d+)\..+") for s in range(1, 5))
            grid = round((flat["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = ModifiedResNet(image_size=grid * 32, layers=blocks, width=w, heads=w * 32 // 64, embed_dim=embed)
    except KeyError as e:
        raise ValueError(f"{what}: cannot infer the CLIP architecture: key {e.args[0]!r} (in our naming) is "
                         "missing; pass spec=... explicitly") from None
    return CLIP(visual=vision, text=text)


def _is_resnet(state_dict: Mapping[str, Tensor]) -> bool:
    return any(".attnpool." in k or re.search(r"(^|\.)layer1\.0\.", k) for k in state_dict)


def _from(state_dict: Mapping[str, Tensor], vit: Table, resnet: Table, spec: CLIP | None, quick_gelu: bool,
          with_state: bool, what: str):
    table = resnet if _is_resnet(state_dict) else vit
    if spec is None:
        spec = _config_from_ours(table.rename(state_dict), quick_gelu, what)
    params, state = table.to_ours(state_dict, spec, with_state=True)
    if with_state:
        return params, state
    initial = spec.init_state()
    if state is not None and any(not torch.equal(v.cpu(), t) for v, t in
                                 zip(flatten(state).values(), flatten(initial).values())):
        warnings.warn(f"{what}: the checkpoint's batch-norm running statistics were dropped; pass with_state=True "
                      "and give the state to encode_image / CLIP(...) (or the shell), or ResNet outputs are wrong",
                      stacklevel=3)
    return params


def _to(params: Params, state: Params | None, spec: CLIP | None, vit: Table, resnet: Table,
        what: str) -> dict[str, Tensor]:
    is_resnet = "attnpool" in params.get("visual", {})
    if spec is None and state is None and is_resnet:  # the initial batch-norm statistics are needed
        spec = _config_from_ours(flatten(params), True, what)
    return (resnet if is_resnet else vit).to_theirs(params, state, spec)


def detect_layout(state_dict: Mapping[str, Tensor]) -> str:
    """``"open_clip"`` (also OpenAI's), ``"torchmultimodal"`` or ``"polymodal"`` from the key names."""
    keys = list(state_dict)
    if any(k.startswith(("encoder_a.", "encoder_b.")) for k in keys):
        return "torchmultimodal"
    if any(k.startswith(("visual.", "text.")) for k in keys) and "text.token_embedding.weight" in state_dict:
        return "polymodal"
    if "token_embedding.weight" in state_dict or any(k.startswith("visual.") for k in keys):
        return "open_clip"
    raise ValueError(f"not a CLIP state dict of a known layout (open_clip / OpenAI, TorchMultimodal, polymodal); "
                     f"first keys: {keys[:5]}")


def config_from_open_clip(state_dict: Mapping[str, Tensor], quick_gelu: bool = True) -> CLIP:
    """The :class:`CLIP` spec of an OpenAI / open_clip state dict, read off its shapes (as OpenAI's
    ``build_model``); heads are width / 64, the activation is ``quick_gelu``'s."""
    table = OPEN_CLIP_RESNET if _is_resnet(state_dict) else OPEN_CLIP
    return _config_from_ours(table.rename(state_dict), quick_gelu, "config_from_open_clip")


def config_from_torchmultimodal(state_dict: Mapping[str, Tensor], quick_gelu: bool = True) -> CLIP:
    """The :class:`CLIP` spec of a TorchMultimodal CLIP state dict, read off its shapes."""
    table = TORCHMULTIMODAL_RESNET if _is_resnet(state_dict) else TORCHMULTIMODAL
    return _config_from_ours(table.rename(state_dict), quick_gelu, "config_from_torchmultimodal")


def from_open_clip(state_dict: Mapping[str, Tensor], spec: CLIP | None = None, *, quick_gelu: bool = True,
                   with_state: bool = False) -> Params | tuple[Params, Params | None]:
    """OpenAI / open_clip ``state_dict`` -> params (``with_state``: ``(params, state)``).

    ``spec`` defaults to the architecture read off the shapes. A ``module.`` prefix (DDP) is stripped.
    The leaves are the state dict's tensors (no copy): clone them if the source keeps changing.
    """
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    return _from(sd, OPEN_CLIP, OPEN_CLIP_RESNET, spec, quick_gelu, with_state, "from_open_clip")


def to_open_clip(params: Params, state: Params | None = None, spec: CLIP | None = None) -> dict[str, Tensor]:
    """Params (and a ResNet tower's batch-norm ``state``; default: ``spec``'s initial one) ->
    an open_clip / OpenAI state dict that ``model.load_state_dict(..., strict=True)`` accepts."""
    return _to(params, state, spec, OPEN_CLIP, OPEN_CLIP_RESNET, "to_open_clip")


def from_torchmultimodal(state_dict: Mapping[str, Tensor], spec: CLIP | None = None, *, quick_gelu: bool = True,
                         with_state: bool = False) -> Params | tuple[Params, Params | None]:
    """TorchMultimodal CLIP ``state_dict`` -> params (``with_state``: ``(params, state)``).

    TorchMultimodal keeps the temperature in its loss; a ``logit_scale`` entry is used when
    present, else the config's initial value (ln(1 / 0.07)).
    """
    return _from(state_dict, TORCHMULTIMODAL, TORCHMULTIMODAL_RESNET, spec, quick_gelu, with_state,
                 "from_torchmultimodal")


def to_torchmultimodal(params: Params, state: Params | None = None, spec: CLIP | None = None) -> dict[str, Tensor]:
    """Params (and batch-norm ``state``) -> a TorchMultimodal CLIP state dict (strict-loadable).
    The temperature is not part of TorchMultimodal's model and is left out."""
    return _to(params, state, spec, TORCHMULTIMODAL, TORCHMULTIMODAL_RESNET, "to_torchmultimodal")
