"""TorchMultimodal's MDETR state dicts <-> polymodal params (one table on ``core/convert.py``).

TorchMultimodal's names are kept except (``{i}`` a layer)::

    theirs                                                 ours
    image_backbone.body.*                                  image_backbone.*            (torchvision names)
    text_encoder.embeddings.layer_norm.*                   text_encoder.embeddings.LayerNorm.*
    text_encoder.encoder.layers.layers.{i}.*               text_encoder.encoder.layers.{i}.*
    transformer.{encoder,decoder}.layers.{i}.mlp.model.0   ...linear1
    transformer.{encoder,decoder}.layers.{i}.mlp.model.3   ...linear2 (model.2 without dropout)
    transformer.decoder.layers.{i}.cross_attn_image.*      ...multihead_attn.*
    transformer.decoder.layers.{i}.norm3 / norm4           ...norm2 / norm3
    bbox_embed.model.{0,2,4}.*                             bbox_embed.layers.{0,1,2}.*

The task models nest all of it under ``model.``; their contrastive projections and ``vqa_heads.*`` keep
their names. Round trips are exact (no value changes, only names).

>>> from polymodal.core import random as pr
>>> from polymodal.models.mdetr.builders import mdetr_tiny
>>> spec = mdetr_tiny()
>>> params = spec.init(key=pr.key(0))
>>> sd = to_torchmultimodal(params, spec)
>>> "model.transformer.decoder.layers.1.cross_attn_image.in_proj_weight" in sd
True
>>> back = from_torchmultimodal(sd, spec)
>>> bool((back["model"]["bbox_embed"]["layers"][2]["weight"] == params["model"]["bbox_embed"]["layers"][2]["weight"]).all())
True
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from ...core.convert import Rule, Table
from ...core.pytree import Params
from .heads import MDETRForPhraseGrounding, MDETRForVQA
from .model import MDETR

__all__ = ["torchmultimodal_table", "from_torchmultimodal", "to_torchmultimodal"]


def _mdetr_rules(spec: MDETR, t: str) -> tuple[Rule, ...]:
    """Rules for an :class:`MDETR` whose TorchMultimodal keys start with ``t`` ("" or "model.")."""
    o = t
    mlp2 = 3 if spec.transformer.encoder.layer.dropout > 0 else 2
    rules = [
        Rule(f"{t}image_backbone.body.{{k*}}", f"{o}image_backbone.{{k*}}"),
        Rule(f"{t}text_encoder.embeddings.layer_norm.{{p}}", f"{o}text_encoder.embeddings.LayerNorm.{{p}}"),
        Rule(f"{t}text_encoder.encoder.layers.layers.{{i}}.{{k*}}", f"{o}text_encoder.encoder.layers.{{i}}.{{k*}}"),
    ]
    for part in ("encoder", "decoder"):
        base_t, base_o = f"{t}transformer.{part}.layers.{{i}}", f"{o}transformer.{part}.layers.{{i}}"
        rules += [Rule(f"{base_t}.mlp.model.0.{{p}}", f"{base_o}.linear1.{{p}}"),
                  Rule(f"{base_t}.mlp.model.{mlp2}.{{p}}", f"{base_o}.linear2.{{p}}")]
    dec_t, dec_o = f"{t}transformer.decoder.layers.{{i}}", f"{o}transformer.decoder.layers.{{i}}"
    rules += [
        Rule(f"{dec_t}.cross_attn_image.{{k*}}", f"{dec_o}.multihead_attn.{{k*}}"),
        Rule(f"{dec_t}.norm4.{{p}}", f"{dec_o}.norm3.{{p}}"),
        Rule(f"{dec_t}.norm3.{{p}}", f"{dec_o}.norm2.{{p}}"),
        Rule(f"{t}bbox_embed.model.{{2i}}.{{p}}", f"{o}bbox_embed.layers.{{i}}.{{p}}"),
    ]
    return tuple(rules)


def torchmultimodal_table(spec: MDETR | MDETRForPhraseGrounding | MDETRForVQA) -> Table:
    """The table for TorchMultimodal's ``MDETR`` (``mdetr_resnet101``), ``MDETRForPhraseGrounding`` or
    ``MDETRForVQA`` state dict of ``spec``'s architecture."""
    if isinstance(spec, MDETR):
        rules = _mdetr_rules(spec, "")
    elif isinstance(spec, (MDETRForPhraseGrounding, MDETRForVQA)):
        rules = _mdetr_rules(spec.model, "model.")
    else:
        raise TypeError(f"torchmultimodal_table: expected an MDETR, MDETRForPhraseGrounding or MDETRForVQA spec, "
                        f"got {type(spec).__name__}")
    return Table(rules + (Rule("{k*}", "{k*}"),), name="from_torchmultimodal: the TorchMultimodal MDETR state dict")


def from_torchmultimodal(state_dict: Mapping[str, Tensor], spec: MDETR | MDETRForPhraseGrounding | MDETRForVQA
                         ) -> Params:
    """TorchMultimodal MDETR state dict -> params of ``spec``; one error names every mismatched key."""
    return torchmultimodal_table(spec).to_ours(state_dict, spec)


def to_torchmultimodal(params: Params, spec: MDETR | MDETRForPhraseGrounding | MDETRForVQA) -> dict[str, Tensor]:
    """Params -> TorchMultimodal's state dict (``load_state_dict(strict=True)`` accepts it)."""
    return torchmultimodal_table(spec).to_theirs(params, spec=spec)
