"""TorchMultimodal VideoCLIP state dicts <-> polymodal VideoCLIP params and state (tables on core/convert.py).

TorchMultimodal's VideoCLIP (``examples/mugen/retrieval/video_clip.py``) is
``CLIP(encoder_a=Sequential(TextEncoder, Projection), encoder_b=Sequential(VideoEncoder, Projection))``:

==============================================================  ==========================================
TorchMultimodal                                                  ours
==============================================================  ==========================================
``encoder_a.0.model.embeddings.*`` (Hugging Face DistilBERT)     ``text.encoder.embeddings.*``
``encoder_a.0.model.transformer.layer.{i}.attention.{q,k,v}_lin`` ``text.encoder.encoder.layers.{i}.self_attn.in_proj_*`` (fused)
``...attention.out_lin`` / ``sa_layer_norm``                     ``...self_attn.out_proj`` / ``norm1``
``...ffn.lin1`` / ``ffn.lin2`` / ``output_layer_norm``           ``...linear1`` / ``linear2`` / ``norm2``
``encoder_a.1.*``                                                ``text.projection.*``
``encoder_b.0.model.*`` (torchvision's S3D, running stats too)   ``video.encoder.*`` (params and state)
``encoder_b.1.*``                                                ``video.projection.*``
(the loss module's ``logit_scale``)                              ``logit_scale``
==============================================================  ==========================================

A CLIP state dict has no ``logit_scale`` (the reference keeps it in its Lightning module's loss):
reading fills the spec's initial value, writing leaves it out; the Lightning layout
(:func:`lightning_table`: ``model.`` prefix and ``contrastive_loss.logit_scale``) carries it.

>>> from polymodal.core import random as pr
>>> from polymodal.models.mugen.videoclip_builders import videoclip_tiny
>>> spec = videoclip_tiny()
>>> sd = to_torchmultimodal(spec.init(key=pr.key(0)), spec.init_state(), spec=spec)
>>> sd["encoder_b.0.model.features.0.0.1.running_var"].shape
torch.Size([8])
>>> params, state = from_torchmultimodal(sd, spec)
>>> sorted(params), sorted(state)
(['logit_scale', 'text', 'video'], ['video'])
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
from torch import Tensor

from ...core.convert import Rule, Table, fused
from ...core.pytree import Params
from .videoclip import VideoCLIP

__all__ = ["torchmultimodal_table", "lightning_table", "from_torchmultimodal", "to_torchmultimodal",
           "s3d_table"]

_T, _O = "encoder_a.0.model.transformer.layer.{i}", "text.encoder.encoder.layers.{i}"


def _distilbert_rules(t: str, o: str) -> tuple[Rule, ...]:
    """Hugging Face DistilBERT under ``t`` <-> our BERT encoder under ``o``."""
    lt, lo = f"{t}transformer.layer.{{i}}", f"{o}encoder.layers.{{i}}"
    qkv = tuple(Rule(tuple(f"{lt}.attention.{n}_lin.{w}" for n in "qkv"), f"{lo}.self_attn.in_proj_{w}", fused(0))
                for w in ("weight", "bias"))
    return (Rule(f"{t}embeddings.LayerNorm.{{p}}", f"{o}embeddings.LayerNorm.{{p}}"),
            Rule(f"{t}embeddings.{{n}}.weight", f"{o}embeddings.{{n}}.weight"),
            *qkv,
            Rule(f"{lt}.attention.out_lin.{{p}}", f"{lo}.self_attn.out_proj.{{p}}"),
            Rule(f"{lt}.sa_layer_norm.{{p}}", f"{lo}.norm1.{{p}}"),
            Rule(f"{lt}.ffn.lin1.{{p}}", f"{lo}.linear1.{{p}}"),
            Rule(f"{lt}.ffn.lin2.{{p}}", f"{lo}.linear2.{{p}}"),
            Rule(f"{lt}.output_layer_norm.{{p}}", f"{lo}.norm2.{{p}}"))


def _logit_scale(spec: VideoCLIP) -> Tensor:
    return torch.tensor(float(spec.logit_scale_init))


def _rules(prefix: str) -> tuple[Rule, ...]:
    return (*_distilbert_rules(f"{prefix}encoder_a.0.model.", "text.encoder."),
            Rule(f"{prefix}encoder_a.1.{{n}}.{{p}}", "text.projection.{n}.{p}"),
            Rule(f"{prefix}encoder_b.0.model.{{r*}}", "video.encoder.{r*}"),
            Rule(f"{prefix}encoder_b.1.{{n}}.{{p}}", "video.projection.{n}.{p}"))


# Buffers some transformers versions write (not parameters).
_BUFFERS = ("encoder_a.0.model.embeddings.position_ids", "model.encoder_a.0.model.embeddings.position_ids")


@functools.lru_cache(maxsize=1)
def torchmultimodal_table() -> Table:
    """The state dict of TorchMultimodal's ``videoclip()`` (a ``CLIP`` module)."""
    return Table(_rules(""), drop=_BUFFERS, defaults=(("logit_scale", _logit_scale),),
                 name="the TorchMultimodal VideoCLIP state dict")


@functools.lru_cache(maxsize=1)
def lightning_table() -> Table:
    """The ``state_dict`` of TorchMultimodal's ``VideoCLIPLightningModule`` (``examples/mugen/retrieval/model.py``):
    the model under ``model.``, the learned temperature at ``contrastive_loss.logit_scale``."""
    return Table((*_rules("model."), Rule("contrastive_loss.logit_scale", "logit_scale")), drop=_BUFFERS,
                 name="the TorchMultimodal VideoCLIP Lightning checkpoint")


@functools.lru_cache(maxsize=4)
def s3d_table(prefix: str = "model.") -> Table:
    """An S3D video encoder's weights (``VideoEncoder``: ``model.`` + torchvision's names, MUGEN's
    ``video_encoder-weights`` file; ``prefix=""``: torchvision's own, its classifier ignored)."""
    return Table((Rule(f"{prefix}{{r*}}", "{r*}"),), drop=(f"{prefix}classifier.{{r*}}",),
                 name="the S3D state dict")


def from_torchmultimodal(state_dict: Mapping[str, Tensor], spec: VideoCLIP) -> tuple[Params, Params]:
    """A TorchMultimodal VideoCLIP state dict (a ``CLIP`` module's, or the Lightning module's with a
    ``model.`` prefix) -> ``(params, state)`` of ``spec``; every missing, unexpected or mis-shaped key
    is named in one ``ValueError``."""
    table = lightning_table() if any(k.startswith("model.encoder_") for k in state_dict) else torchmultimodal_table()
    return table.to_ours(state_dict, spec, with_state=True)


def to_torchmultimodal(params: Params, state: Params | None = None, *, spec: VideoCLIP | None = None,
                       lightning: bool = False) -> dict[str, Tensor]:
    """Params and batch-norm ``state`` (``None``: the spec's initial one) -> a state dict that
    TorchMultimodal's ``videoclip()`` loads strictly (``lightning=True``: the Lightning module's,
    ``logit_scale`` included)."""
    table = lightning_table() if lightning else torchmultimodal_table()
    return table.to_theirs(params, state, spec=spec)
