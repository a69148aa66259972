"""TorchMultimodal's FLAVA state dicts <-> polymodal params (key tables on ``core/convert.py``).

==========================================================  ==============================================
TorchMultimodal (``{m}`` = ``image_encoder``, ``text_encoder``  ours
or ``mm_encoder``; ``{i}`` a layer)
==========================================================  ==============================================
``{m}.encoder.layer.{i}.attention.{query,key,value}.*``      ``{m}.<stack>.layers.{i}.self_attn.in_proj_*`` (fused)
``{m}.encoder.layer.{i}.attention.output.*``                 ``...self_attn.out_proj.*``
``{m}.encoder.layer.{i}.attention_layernorm.*``              ``...norm1.*``
``{m}.encoder.layer.{i}.feedforward.model.{0,2|3}.*``        ``...linear1.*`` / ``...linear2.*`` (3 with dropout)
``{m}.encoder.layer.{i}.feedforward_layernorm.*``            ``...norm2.*``
``image_encoder.embeddings.patch_embeddings.projection.*``   ``image_encoder.embeddings.conv_projection.*``
``image_encoder.layernorm.*``                                ``image_encoder.transformer.norm.*``
``text_encoder.embeddings.layer_norm.*``                     ``text_encoder.embeddings.LayerNorm.*``
``image_codebook.encoder.blocks.*``                          ``image_codebook.blocks.*``
``loss.*.cls.decoder.bias`` (tied to ``loss.*.cls.bias``)    (read: checked equal; written: the bias)
``classifier.model.{0,3}.*`` (Linear, ReLU, Dropout, Linear)  ``classifier.layers.{0,1}.*``
==========================================================  ==============================================

<stack> is ``transformer`` for the image encoder (the shared ViT) and ``encoder`` for the other two; every
other key keeps its name. The DALL-E encoder alone (``dall_e``'s ``Encoder`` / TorchMultimodal's
``DalleEncoder`` state dict, names ``blocks.*``) loads with :func:`from_dalle`.

>>> import torch
>>> from polymodal.core import random as pr
>>> from polymodal.models.flava.builders import flava_tiny
>>> spec = flava_tiny()
>>> params = spec.init(key=pr.key(0))
>>> sd = to_torchmultimodal(params, spec)
>>> sd["image_encoder.encoder.layer.0.attention.query.weight"].shape
torch.Size([64, 64])
>>> back = from_torchmultimodal(sd, spec)
>>> bool(torch.equal(back["mm_encoder"]["cls_token"], params["mm_encoder"]["cls_token"]))
True
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ...core.convert import Rule, Table, fused
from ...core.pytree import Params
from .dvae import DalleEncoder
from .model import FLAVAModel
from .pretraining import FLAVAForClassification, FLAVAForPreTraining

__all__ = ["torchmultimodal_table", "from_torchmultimodal", "to_torchmultimodal", "from_dalle", "to_dalle"]

_HEADS = ("mlm_loss", "mim_loss", "mmm_loss.mlm", "mmm_loss.mim")


def _layers(t: str, o: str, last: int) -> tuple[Rule, ...]:
    i = "{i}"
    return (*(Rule(tuple(f"{t}.{i}.attention.{n}.{w}" for n in ("query", "key", "value")),
                   f"{o}.{i}.self_attn.in_proj_{w}", fused(0)) for w in ("weight", "bias")),
            Rule(f"{t}.{i}.attention.output.{{p}}", f"{o}.{i}.self_attn.out_proj.{{p}}"),
            Rule(f"{t}.{i}.attention_layernorm.{{p}}", f"{o}.{i}.norm1.{{p}}"),
            Rule(f"{t}.{i}.feedforward.model.0.{{p}}", f"{o}.{i}.linear1.{{p}}"),
            Rule(f"{t}.{i}.feedforward.model.{last}.{{p}}", f"{o}.{i}.linear2.{{p}}"),
            Rule(f"{t}.{i}.feedforward_layernorm.{{p}}", f"{o}.{i}.norm2.{{p}}"))


def _model_rules(spec: FLAVAModel, t: str, o: str) -> tuple[Rule, ...]:
    rules: list[Rule] = [
        Rule(f"{t}image_encoder.embeddings.patch_embeddings.projection.{{p}}",
             f"{o}image_encoder.embeddings.conv_projection.{{p}}"),
        Rule(f"{t}image_encoder.layernorm.{{p}}", f"{o}image_encoder.transformer.norm.{{p}}"),
        Rule(f"{t}text_encoder.embeddings.layer_norm.{{p}}", f"{o}text_encoder.embeddings.LayerNorm.{{p}}"),
    ]
    for m, stack, layer in (("image_encoder", "transformer", spec.image_encoder.vit.transformer.layer),
                            ("text_encoder", "encoder", spec.text_encoder.encoder.layer),
                            ("mm_encoder", "encoder", spec.mm_encoder.encoder.layer)):
        rules += _layers(f"{t}{m}.encoder.layer", f"{o}{m}.{stack}.layers", 3 if layer.dropout > 0 else 2)
    rules.append(Rule(f"{t}{{r*}}", f"{o}{{r*}}"))  # everything else keeps its name
    return tuple(rules)


def refuse_conv_stem(spec: Any, where: str, library: str) -> None:
    """A ``ValueError`` naming the stem when ``spec``'s image encoder has one (``image_conv_stem``): the
    reference layouts have no weights for it."""
    model = spec if isinstance(spec, FLAVAModel) else getattr(spec, "model", None)
    vit = getattr(getattr(model, "image_encoder", None), "vit", None)
    stem = vit.embeddings.conv_stem if vit is not None else ()
    if stem:
        raise ValueError(f"{where}: the image encoder has a conv stem (conv_stem={stem}), which {library} FLAVA "
                         "has no weights for: build the model without image_conv_stem")


@functools.lru_cache(maxsize=32)
def torchmultimodal_table(spec: Any) -> Table:
    """The TorchMultimodal layout of a :class:`FLAVAModel`, :class:`FLAVAForPreTraining` or
    :class:`FLAVAForClassification` (as its ``state_dict()``)."""
    refuse_conv_stem(spec, "torchmultimodal_table", "TorchMultimodal's")
    name = "from_torchmultimodal: the TorchMultimodal FLAVA state dict"
    if isinstance(spec, FLAVAModel):
        return Table(_model_rules(spec, "", ""), name=name)
    if isinstance(spec, FLAVAForPreTraining):
        rules = (Rule("image_codebook.encoder.blocks.{r*}", "image_codebook.blocks.{r*}"),
                 Rule("loss.{r*}", "loss.{r*}"))
        return Table(rules + _model_rules(spec.model, "model.", "model."),
                     drop=tuple(f"loss.{h}.cls.decoder.bias" for h in _HEADS), name=name)
    if isinstance(spec, FLAVAForClassification):
        stride = 3 if spec.classifier.dropout > 0 else 2
        n = len(spec.classifier.hidden_dims) + 1
        rules = tuple(Rule(f"classifier.model.{stride * j}.{{p}}", f"classifier.layers.{j}.{{p}}") for j in range(n))
        return Table(rules + _model_rules(spec.model, "model.", "model."), name=name)
    raise TypeError(f"torchmultimodal_table: expected a FLAVAModel, FLAVAForPreTraining or FLAVAForClassification, "
                    f"got {type(spec).__name__}")


def from_torchmultimodal(state_dict: Mapping[str, Tensor], spec: Any) -> Params:
    """A TorchMultimodal ``FLAVAModel`` / ``FLAVAForPreTraining`` / ``FLAVAForClassification`` state dict ->
    params of ``spec`` (built with the same arguments: :func:`~.builders.flava_model` ...). One ``ValueError``
    names every missing, unexpected and mis-shaped key; a tied decoder bias that differs from its head's
    bias is an error too."""
    if isinstance(spec, FLAVAForPreTraining):
        for h in _HEADS:
            dec, bias = state_dict.get(f"loss.{h}.cls.decoder.bias"), state_dict.get(f"loss.{h}.cls.bias")
            if dec is not None and bias is not None and not torch.equal(dec, bias):
                raise ValueError(f"from_torchmultimodal: loss.{h}.cls.decoder.bias differs from loss.{h}.cls.bias "
                                 "(TorchMultimodal ties them)")
    return torchmultimodal_table(spec).to_ours(state_dict, spec)


def to_torchmultimodal(params: Params, spec: Any) -> dict[str, Tensor]:
    """Params of ``spec`` -> the TorchMultimodal state dict (``load_state_dict(strict=True)`` takes it)."""
    sd = torchmultimodal_table(spec).to_theirs(params, spec=spec)
    if isinstance(spec, FLAVAForPreTraining):
        for h in _HEADS:
            sd[f"loss.{h}.cls.decoder.bias"] = sd[f"loss.{h}.cls.bias"]
    return sd


_DALLE = Table((Rule("blocks.{r*}", "blocks.{r*}"),), name="from_dalle: the DALL-E encoder state dict")


def from_dalle(state_dict: Mapping[str, Tensor], spec: DalleEncoder | None = None) -> Params:
    """The DALL-E dVAE encoder's state dict (OpenAI's ``dall_e.Encoder().state_dict()``, TorchMultimodal's
    ``DalleEncoder``; ``encoder.`` prefixes of ``DalleVAEEncoder`` are stripped) -> params of ``spec``
    (default: the published 8192-code encoder). ``encoder.pkl`` itself is a pickled module: load it with
    the ``dall_e`` package and pass its ``state_dict()`` (polymodal never unpickles code)."""
    sd = {k[len("encoder."):] if k.startswith("encoder.") else k: v for k, v in state_dict.items()}
    return _DALLE.to_ours(sd, spec or DalleEncoder())


def to_dalle(params: Params, spec: DalleEncoder | None = None) -> dict[str, Tensor]:
    """Params -> the DALL-E encoder's state dict (``blocks.*``)."""
    return _DALLE.to_theirs(params, spec=spec or DalleEncoder())
