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

import functools
import re
import warnings
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from ...core import random as pr
from ...core.pytree import Params, flatten, mismatch_error, unflatten
from .config import CLIPConfig, ModifiedResNetConfig, TextConfig, VisionTransformerConfig
from .model import CLIP

__all__ = [
    "from_open_clip", "to_open_clip", "from_torchmultimodal", "to_torchmultimodal", "config_from_open_clip",
    "config_from_torchmultimodal", "detect_layout",
]

_STATS = ("running_mean", "running_var", "num_batches_tracked")
_OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")
_BLOCK = {"ln_1.": "norm1.", "ln_2.": "norm2.", "attn.": "self_attn.", "mlp.c_fc.": "linear1.", "mlp.c_proj.": "linear2."}
_RESNET = re.compile(r"(conv[123]\.weight|bn[123]\..+|layer[1-4]\..+|attnpool\..+)")
_TO_OURS_VIT = {"conv1.weight": "embeddings.conv_projection.weight", "class_embedding": "embeddings.cls_token",
                "positional_embedding": "embeddings.position_embeddings"}
_TMM_VIT = {"conv.weight": "embeddings.conv_projection.weight", "cls_token_embedding": "embeddings.cls_token",
            "positional_embedding": "embeddings.position_embeddings", "projection": "proj"}
_SAME_VIT = ("ln_pre.weight", "ln_pre.bias", "ln_post.weight", "ln_post.bias")


def _swap_prefix(rest: str, table: Mapping[str, str]) -> str | None:
    for a, b in table.items():
        if rest.startswith(a):
            return b + rest[len(a):]
    return None


def _inverse(table: Mapping[str, str]) -> dict[str, str]:
    return {b: a for a, b in table.items()}


# --- key maps: one function per direction and layout; None = no counterpart ------------------------

def _oc_to_ours(key: str, resnet: bool = False) -> str | None:
    if key == "logit_scale":
        return key
    if m := re.fullmatch(r"visual\.transformer\.resblocks\.(\d+)\.(.+)", key):
        rest = _swap_prefix(m[2], _BLOCK)
        return None if rest is None else f"visual.transformer.layers.{m[1]}.{rest}"
    if m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", key):
        rest = _swap_prefix(m[2], _BLOCK)
        return None if rest is None else f"text.transformer.layers.{m[1]}.{rest}"
    if key.startswith("visual."):
        rest = key[len("visual."):]
        if resnet:
            return key if _RESNET.fullmatch(rest) else None
        if rest in _TO_OURS_VIT:
            return "visual." + _TO_OURS_VIT[rest]
        return key if rest in _SAME_VIT or rest == "proj" else None
    if key in ("token_embedding.weight", "positional_embedding", "text_projection", "ln_final.weight", "ln_final.bias"):
        return "text." + key
    return None


def _ours_to_oc(key: str) -> str:
    if m := re.fullmatch(r"(visual\.|text\.)transformer\.layers\.(\d+)\.(.+)", key):
        pre = "visual.transformer" if m[1] == "visual." else "transformer"
        return f"{pre}.resblocks.{m[2]}.{_swap_prefix(m[3], _inverse(_BLOCK))}"
    if key.startswith("visual."):
        rest = key[len("visual."):]
        return "visual." + _inverse(_TO_OURS_VIT).get(rest, rest)
    return key[len("text."):] if key.startswith("text.") else key


def _tmm_to_ours(key: str, resnet: bool = False) -> str | None:
    if key == "logit_scale":  # not in TorchMultimodal's CLIP; accepted if merged from its loss
        return key
    if m := re.fullmatch(r"encoder_([ab])\.encoder\.layers\.(\d+)\.(.+)", key):
        return f"{'visual' if m[1] == 'a' else 'text'}.transformer.layers.{m[2]}.{m[3]}"
    if key.startswith("encoder_a."):
        rest = key[len("encoder_a."):]
        if resnet:
            return "visual." + rest if _RESNET.fullmatch(rest) else None
        if rest in _TMM_VIT:
            return "visual." + _TMM_VIT[rest]
        return "visual." + rest if rest in _SAME_VIT else None
    if key.startswith("encoder_b."):
        rest = key[len("encoder_b."):]
        if rest == "projection.weight":
            return "text.text_projection"
        ok = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias")
        return "text." + rest if rest in ok else None
    return None


def _ours_to_tmm(key: str) -> str:
    if m := re.fullmatch(r"(visual|text)\.transformer\.layers\.(.+)", key):
        return f"encoder_{'a' if m[1] == 'visual' else 'b'}.encoder.layers.{m[2]}"
    if key.startswith("visual."):
        rest = key[len("visual."):]
        return "encoder_a." + _inverse(_TMM_VIT).get(rest, rest)
    rest = key[len("text."):]
    return "encoder_b." + ("projection.weight" if rest == "text_projection" else rest)


# --- value reshapes where the layouts differ ---------------------------------------------------------

def _reshape_in(ours: str, t: Tensor, transpose_text_proj: bool) -> Tensor:
    if ours == "visual.embeddings.cls_token":
        return t.reshape(1, 1, -1)
    if ours == "visual.embeddings.position_embeddings":
        return t.reshape(1, *t.shape)
    if ours == "text.text_projection" and transpose_text_proj:
        return t.t().contiguous()
    return t


def _reshape_out(ours: str, t: Tensor, transpose_text_proj: bool) -> Tensor:
    if ours in ("visual.embeddings.cls_token", "visual.embeddings.position_embeddings"):
        return t.reshape(t.shape[-1]) if ours.endswith("cls_token") else t.reshape(t.shape[-2:])
    if ours == "text.text_projection" and transpose_text_proj:
        return t.t().contiguous()
    return t


# --- config inference from our flat names -------------------------------------------------------------

def _count(flat: Mapping[str, Tensor], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m[1] for k in flat if (m := rx.fullmatch(k))})


def _config_from_ours(flat: Mapping[str, Tensor], quick_gelu: bool, what: str) -> CLIPConfig:
    act = "quick_gelu" if quick_gelu else "gelu"
    try:
        tok = flat["text.token_embedding.weight"]
        width = tok.shape[1]
        text = TextConfig(context_length=flat["text.positional_embedding"].shape[0], vocab_size=tok.shape[0],
                          width=width, heads=max(width // 64, 1),
                          layers=_count(flat, r"text\.transformer\.layers\.(\d+)\..+"),
                          mlp_ratio=flat["text.transformer.layers.0.linear1.weight"].shape[0] / width, activation=act)
        embed = flat["text.text_projection"].shape[1]
        if "visual.embeddings.conv_projection.weight" in flat:
            conv = flat["visual.embeddings.conv_projection.weight"]
            w, patch = conv.shape[0], conv.shape[-1]
            grid = round((flat["visual.embeddings.position_embeddings"].shape[-2] - 1) ** 0.5)
            vision = VisionTransformerConfig(
                image_size=grid * patch, patch_size=patch, width=w, heads=max(w // 64, 1),
                layers=_count(flat, r"visual\.transformer\.layers\.(\d+)\..+"),
                mlp_ratio=flat["visual.transformer.layers.0.linear1.weight"].shape[0] / w, activation=act)
        else:
            w = flat["visual.layer1.0.conv1.weight"].shape[0]
            blocks = tuple(_count(flat, rf"visual\.layer{s}\.(\d+)\..+") for s in range(1, 5))
            grid = round((flat["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = ModifiedResNetConfig(image_size=grid * 32, layers=blocks, width=w, heads=w * 32 // 64)
    except KeyError as e:
        raise ValueError(f"{what}: cannot infer the CLIP architecture: key {e.args[0]!r} (in our naming) is "
                         "missing; pass spec=... explicitly") from None
    return CLIPConfig(embed_dim=embed, vision=vision, text=text)


@functools.lru_cache(maxsize=16)
def _shapes(spec: CLIP) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of ``spec`` without materialising them (init on the meta device)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in flatten(spec.init(key=pr.key(0))).items()}


def _fill(template: Params, flat: Mapping[str, Tensor], prefix: str = "") -> Params:
    """A tree shaped like ``template`` with leaves from ``flat`` (keys the template has)."""
    if isinstance(template, list):
        return [_fill(v, flat, f"{prefix}{i}.") for i, v in enumerate(template)]
    if isinstance(template, dict):
        return {k: _fill(v, flat, f"{prefix}{k}.") for k, v in template.items()}
    return flat[prefix[:-1]]


def _is_resnet(state_dict: Mapping[str, Tensor]) -> bool:
    return any(".attnpool." in k or re.search(r"(^|\.)layer1\.0\.", k) for k in state_dict)


def _from(state_dict: Mapping[str, Tensor], rename: Callable[..., str | None], back: Callable[[str], str],
          spec: CLIP | None, quick_gelu: bool, with_state: bool, transpose: bool, what: str,
          default_logit_scale: bool):
    sd = {k: v for k, v in state_dict.items() if k not in _OPENAI_EXTRAS and not k.endswith("attn_mask")}
    ours, unexpected = {}, []
    resnet = _is_resnet(sd)
    for k, v in sd.items():
        name = rename(k, resnet)
        if name is None:
            unexpected.append(k)
        else:
            ours[name] = _reshape_in(name, v, transpose)
    if unexpected:
        raise ValueError(f"{what}: unexpected keys ({len(unexpected)}), not part of a CLIP checkpoint of this "
                         f"layout: {', '.join(sorted(unexpected))}")
    params_flat = {k: v for k, v in ours.items() if k.rsplit(".", 1)[-1] not in _STATS}
    state_flat = {k: v for k, v in ours.items() if k.rsplit(".", 1)[-1] in _STATS}
    spec = spec if spec is not None else CLIP(_config_from_ours(params_flat, quick_gelu, what))
    if default_logit_scale and "logit_scale" not in params_flat:
        params_flat["logit_scale"] = torch.tensor(float(spec.config.logit_scale_init))
    expected = _shapes(spec)
    template_state = spec.init_state()
    expected_state = {k: tuple(v.shape) for k, v in flatten(template_state or {}).items()}
    missing = sorted(set(expected) - set(params_flat)) + sorted(set(expected_state) - set(state_flat))
    extra = sorted(set(params_flat) - set(expected)) + sorted(set(state_flat) - set(expected_state))
    bad = [f"{back(k)}: expected {s}, got {tuple(params_flat[k].shape)}" for k, s in expected.items()
           if k in params_flat and tuple(params_flat[k].shape) != s]
    if missing or extra or bad:
        raise mismatch_error(f"{what}: the checkpoint does not match {spec.config}:", [back(k) for k in missing],
                             [back(k) for k in extra], bad)
    params = _fill(unflatten(dict.fromkeys(expected)), params_flat)
    state = _fill(template_state, state_flat) if template_state is not None else None
    if with_state:
        return params, state
    if state is not None and any(not torch.equal(v.cpu(), t) for v, t in
                                 zip(flatten(state).values(), flatten(template_state).values())):
        warnings.warn(f"{what}: the checkpoint's batch-norm running statistics were dropped; pass with_state=True "
                      "and give the state to encode_image / CLIP(...) (or the shell), or ResNet outputs are wrong",
                      stacklevel=3)
    return params


def _to(params: Params, state: Params | None, spec: CLIP | None, rename: Callable[[str], str], transpose: bool,
        keep_logit_scale: bool) -> dict[str, Tensor]:
    out = {}
    for k, v in flatten(params).items():
        if k == "logit_scale" and not keep_logit_scale:
            continue
        out[rename(k)] = _reshape_out(k, v, transpose)
    if state is None and spec is not None:
        state = spec.init_state()
    for k, v in flatten(state or {}).items():
        out[rename(k)] = v
    return out


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


def config_from_open_clip(state_dict: Mapping[str, Tensor], quick_gelu: bool = True) -> CLIPConfig:
    """The :class:`CLIPConfig` of an OpenAI / open_clip state dict, read off its shapes (as OpenAI's
    ``build_model``); heads are width / 64, the activation is ``quick_gelu``'s."""
    resnet = _is_resnet(state_dict)
    flat = {n: v for k, v in state_dict.items() if (n := _oc_to_ours(k, resnet)) is not None}
    return _config_from_ours(flat, quick_gelu, "config_from_open_clip")


def config_from_torchmultimodal(state_dict: Mapping[str, Tensor], quick_gelu: bool = True) -> CLIPConfig:
    """The :class:`CLIPConfig` of a TorchMultimodal CLIP state dict, read off its shapes."""
    resnet = _is_resnet(state_dict)
    flat = {n: _reshape_in(n, v, True) for k, v in state_dict.items() if (n := _tmm_to_ours(k, resnet)) is not None}
    return _config_from_ours(flat, quick_gelu, "config_from_torchmultimodal")


def from_open_clip(state_dict: Mapping[str, Tensor], spec: CLIP | None = None, *, quick_gelu: bool = True,
                   with_state: bool = False) -> Params | tuple[Params, Params | None]:
    """OpenAI / open_clip ``state_dict`` -> params (``with_state``: ``(params, state)``).

    ``spec`` defaults to the architecture read off the shapes. A ``module.`` prefix (DDP) is stripped.
    The leaves are the state dict's tensors (no copy): clone them if the source keeps changing.
    """
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    return _from(sd, _oc_to_ours, _ours_to_oc, spec, quick_gelu, with_state, False, "from_open_clip", False)


def to_open_clip(params: Params, state: Params | None = None, spec: CLIP | None = None) -> dict[str, Tensor]:
    """Params (and a ResNet tower's batch-norm ``state``; default: ``spec``'s initial one) ->
    an open_clip / OpenAI state dict that ``model.load_state_dict(..., strict=True)`` accepts."""
    if spec is None and state is None and "attnpool" in params.get("visual", {}):
        spec = CLIP(_config_from_ours(flatten(params), True, "to_open_clip"))
    return _to(params, state, spec, _ours_to_oc, False, True)


def from_torchmultimodal(state_dict: Mapping[str, Tensor], spec: CLIP | None = None, *, quick_gelu: bool = True,
                         with_state: bool = False) -> Params | tuple[Params, Params | None]:
    """TorchMultimodal CLIP ``state_dict`` -> params (``with_state``: ``(params, state)``).

    TorchMultimodal keeps the temperature in its loss; a ``logit_scale`` entry is used when
    present, else the config's initial value (ln(1 / 0.07)).
    """
    return _from(state_dict, _tmm_to_ours, _ours_to_tmm, spec, quick_gelu, with_state, True,
                 "from_torchmultimodal", True)


def to_torchmultimodal(params: Params, state: Params | None = None, spec: CLIP | None = None) -> dict[str, Tensor]:
    """Params (and batch-norm ``state``) -> a TorchMultimodal CLIP state dict (strict-loadable).
    The temperature is not part of TorchMultimodal's model and is left out."""
    if spec is None and state is None and "attnpool" in params.get("visual", {}):
        spec = CLIP(_config_from_ours(flatten(params), True, "to_torchmultimodal"))
    return _to(params, state, spec, _ours_to_tmm, True, False)
