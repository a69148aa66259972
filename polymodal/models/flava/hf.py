"""Hugging Face ``transformers``' FLAVA layouts (``FlavaModel``, ``FlavaForPreTraining``) <-> polymodal params.

==========================================================  ==================================================
transformers (``{t}`` = ``text_model`` / ``image_model`` /      ours
``multimodal_model``; ``flava.`` prefix in FlavaForPreTraining)
==========================================================  ==================================================
``{t}.encoder.layer.{i}.attention.attention.{query,key,value}``  ``{m}.<stack>.layers.{i}.self_attn.in_proj_*`` (fused)
``...attention.output.dense`` / ``intermediate.dense`` /          ``self_attn.out_proj`` / ``linear1`` / ``linear2`` /
``output.dense`` / ``layernorm_before`` / ``layernorm_after``      ``norm1`` / ``norm2``
``image_model.embeddings.patch_embeddings.projection``            ``image_encoder.embeddings.conv_projection``
``image_model.layernorm``                                         ``image_encoder.transformer.norm``
``logit_scale`` (FlavaModel; ``flava.logit_scale``)                (dropped; ``loss.contrastive_loss.logit_scale``)
``image_codebook.blocks.group_{g}.group.block_{i}.res_path.path.conv_{k}.weight``  ``image_codebook.blocks.group_{g}.block_{i}.res_path.conv_{k}.w``
``{mlm,mim,mmm_text,mmm_image}_head.transform.{dense,LayerNorm}``   ``loss.{mlm_loss,mim_loss,mmm_loss.mlm,mmm_loss.mim}.cls.{dense,layer_norm}``
``itm_head.{pooler.dense,seq_relationship}``                      ``loss.itm_loss.{pooler.dense,cls.seq_relationship}``
==========================================================  ==================================================

The layouts match TorchMultimodal's model apart from two things: ``transformers``' text model masks
nothing without an ``attention_mask`` (pass one; ours masks the pad id), and its multimodal encoder masks the
text's padding exactly as polymodal's default does. Its prediction heads' LayerNorm eps is the towers'
(``1e-12``), and :func:`config_from_huggingface` builds the spec accordingly.

``FlavaForPreTraining``'s six losses, their total and every gradient equal :class:`FLAVAForPreTraining`'s
(``tests/models/flava/test_flava_hf_losses.py``) once its conventions are carried over, which
:func:`config_from_huggingface` does: ``ignore_index = ce_ignore_index`` (-100), its loss weights and
``logit_scale_init_value``; pass ``text_attention_mask`` as its ``attention_mask``. Left different by design:
without ``input_ids_masked`` it runs ITM / MMM on the unmasked text (ours, as TorchMultimodal: pass
``text_masked=text``); without labels it returns no term (ours a zero term, TorchMultimodal's); it clamps
``logit_scale`` in place in training mode only (ours in the forward in every mode, straight-through: its
training-mode values and gradients); it writes ``ce_ignore_index`` into the caller's ``mim_labels`` (a
side effect not copied); ``global_backprop_contrastive=False`` is our ``backprop_type="none"``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ...core.convert import Rule, Table, fused
from ...core.pytree import Params
from .builders import flava_model, flava_model_for_pretraining
from .convert import refuse_conv_stem
from .model import FLAVAModel
from .pretraining import FLAVAForPreTraining

__all__ = ["config_from_huggingface", "from_huggingface", "to_huggingface", "huggingface_table"]

_TOWERS = (("text_model", "text_encoder", "encoder"), ("image_model", "image_encoder", "transformer"),
           ("multimodal_model", "mm_encoder", "encoder"))
_HEADS = (("mlm_head", "mlm_loss"), ("mim_head", "mim_loss"), ("mmm_text_head", "mmm_loss.mlm"),
          ("mmm_image_head", "mmm_loss.mim"))


def _model_rules(t: str, o: str) -> list[Rule]:
    rules = [Rule(f"{t}image_model.embeddings.patch_embeddings.projection.{{p}}",
                  f"{o}image_encoder.embeddings.conv_projection.{{p}}"),
             Rule(f"{t}image_model.layernorm.{{p}}", f"{o}image_encoder.transformer.norm.{{p}}")]
    for theirs, ours, stack in _TOWERS:
        a, b = f"{t}{theirs}.encoder.layer.{{i}}", f"{o}{ours}.{stack}.layers.{{i}}"
        rules += [*(Rule(tuple(f"{a}.attention.attention.{n}.{w}" for n in ("query", "key", "value")),
                         f"{b}.self_attn.in_proj_{w}", fused(0)) for w in ("weight", "bias")),
                  Rule(f"{a}.attention.output.dense.{{p}}", f"{b}.self_attn.out_proj.{{p}}"),
                  Rule(f"{a}.intermediate.dense.{{p}}", f"{b}.linear1.{{p}}"),
                  Rule(f"{a}.output.dense.{{p}}", f"{b}.linear2.{{p}}"),
                  Rule(f"{a}.layernorm_before.{{p}}", f"{b}.norm1.{{p}}"),
                  Rule(f"{a}.layernorm_after.{{p}}", f"{b}.norm2.{{p}}"),
                  Rule(f"{t}{theirs}.{{r*}}", f"{o}{ours}.{{r*}}")]
    rules.append(Rule(f"{t}{{n}}.{{p}}", f"{o}{{n}}.{{p}}"))  # the four projections
    return rules


def _codebook_rules() -> list[Rule]:
    rules = []
    for w, s in (("weight", "w"), ("bias", "b")):
        g = "image_codebook.blocks.group_{g}"
        rules += [Rule(f"image_codebook.blocks.input.{w}", f"image_codebook.blocks.input.{s}"),
                  Rule(f"image_codebook.blocks.output.conv.{w}", f"image_codebook.blocks.output.conv.{s}"),
                  Rule(f"{g}.group.block_{{i}}.id_path.{w}", f"{g}.block_{{i}}.id_path.{s}"),
                  Rule(f"{g}.group.block_{{i}}.res_path.path.conv_{{k}}.{w}", f"{g}.block_{{i}}.res_path.conv_{{k}}.{s}")]
    return rules


@functools.lru_cache(maxsize=32)
def huggingface_table(spec: Any) -> Table:
    """The ``transformers`` layout of a :class:`FLAVAModel` (``FlavaModel``) or :class:`FLAVAForPreTraining`
    (``FlavaForPreTraining``)."""
    refuse_conv_stem(spec, "huggingface_table", "transformers'")
    name = "from_huggingface: the transformers FLAVA state dict"
    if isinstance(spec, FLAVAModel):
        return Table(tuple(_model_rules("", "")), drop=("logit_scale", "text_model.embeddings.position_ids",
                                                        "text_model.embeddings.token_type_ids"), name=name)
    if isinstance(spec, FLAVAForPreTraining):
        rules = [Rule("flava.logit_scale", "loss.contrastive_loss.logit_scale"), *_codebook_rules()]
        for h, ours in _HEADS:
            rules += [Rule(f"{h}.transform.dense.{{p}}", f"loss.{ours}.cls.dense.{{p}}"),
                      Rule(f"{h}.transform.LayerNorm.{{p}}", f"loss.{ours}.cls.layer_norm.{{p}}"),
                      Rule(f"{h}.decoder.weight", f"loss.{ours}.cls.decoder.weight"),
                      Rule(f"{h}.bias", f"loss.{ours}.cls.bias")]
        rules += [Rule("itm_head.pooler.dense.{p}", "loss.itm_loss.pooler.dense.{p}"),
                  Rule("itm_head.seq_relationship.{p}", "loss.itm_loss.cls.seq_relationship.{p}"),
                  *_model_rules("flava.", "model.")]
        drop = tuple(f"{h}.decoder.bias" for h, _ in _HEADS) + ("flava.text_model.embeddings.position_ids",
                                                                 "flava.text_model.embeddings.token_type_ids")
        return Table(tuple(rules), drop=drop, name=name)
    raise TypeError(f"huggingface_table: expected a FLAVAModel or FLAVAForPreTraining, got {type(spec).__name__}")


_WEIGHTS = (("mlm_weight", "mlm_weight"), ("mim_weight", "mim_weight"), ("itm_weight", "itm_loss_weight"),
            ("global_contrastive_weight", "contrastive_loss_weight"), ("mmm_image_weight", "mmm_image_loss_weight"),
            ("mmm_text_weight", "mmm_text_loss_weight"))


def _check_heads(cfg: Mapping[str, Any]) -> None:
    """``FlavaForPreTraining``'s heads take their width, GELU and LayerNorm eps from the image / text configs
    (ITM: the top level ``hidden_size``); ours, TorchMultimodal's, one width (the multimodal) and one eps."""
    t, i, m = cfg["text_config"], cfg["image_config"], cfg["multimodal_config"]
    widths = {"text_config": t["hidden_size"], "image_config": i["hidden_size"],
              "multimodal_config": m["hidden_size"], "hidden_size": cfg.get("hidden_size", m["hidden_size"])}
    if len(set(widths.values())) != 1:
        raise ValueError(f"config_from_huggingface: FlavaForPreTraining's heads need one width: expected the text, "
                         f"image, multimodal and top-level hidden_size equal, got {widths}")
    if t["layer_norm_eps"] != i["layer_norm_eps"]:
        raise ValueError(f"config_from_huggingface: the prediction heads share one LayerNorm eps: expected the text "
                         f"and image layer_norm_eps equal, got {t['layer_norm_eps']} and {i['layer_norm_eps']}")
    if t["hidden_act"] != "gelu" or i["hidden_act"] != "gelu":
        raise ValueError(f"config_from_huggingface: the prediction heads use GELU: expected hidden_act 'gelu' in the "
                         f"text and image configs, got {t['hidden_act']!r} and {i['hidden_act']!r}")


def config_from_huggingface(config: Any, *, pretraining: bool = False) -> Any:
    """A ``transformers.FlavaConfig`` (or its ``to_dict()``) -> the spec with the same architecture.

    With ``pretraining``, the loss also takes the config's ``ce_ignore_index`` (``-100``: label unmasked
    positions with it, not polymodal's default ``-1``), the six loss weights and ``logit_scale_init_value``."""
    cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    t, i, m = cfg["text_config"], cfg["image_config"], cfg["multimodal_config"]
    act = {"gelu": "gelu", "gelu_new": "gelu_tanh", "relu": "relu"}
    kw = dict(
        text_hidden_size=t["hidden_size"], text_num_hidden_layers=t["num_hidden_layers"],
        text_num_attention_heads=t["num_attention_heads"], text_intermediate_size=t["intermediate_size"],
        text_intermediate_activation=act[t["hidden_act"]], text_layer_norm_eps=t["layer_norm_eps"],
        vocab_size=t["vocab_size"], max_position_embeddings=t["max_position_embeddings"],
        type_vocab_size=t["type_vocab_size"], pad_token_id=t.get("pad_token_id") or 0,
        image_hidden_size=i["hidden_size"], image_num_hidden_layers=i["num_hidden_layers"],
        image_num_attention_heads=i["num_attention_heads"], image_intermediate_size=i["intermediate_size"],
        image_intermediate_activation=act[i["hidden_act"]], image_layer_norm_eps=i["layer_norm_eps"],
        image_size=i["image_size"], patch_size=i["patch_size"], num_channels=i["num_channels"],
        use_image_masking=i.get("mask_token", True),
        multimodal_hidden_size=m["hidden_size"], multimodal_num_hidden_layers=m["num_hidden_layers"],
        multimodal_num_attention_heads=m["num_attention_heads"], multimodal_intermediate_size=m["intermediate_size"],
        multimodal_intermediate_activation=act[m["hidden_act"]], multimodal_layer_norm_eps=m["layer_norm_eps"],
        text_and_image_proj_size=cfg["projection_dim"])
    if not pretraining:
        return flava_model(**kw)
    c = cfg["image_codebook_config"]
    if c.get("num_groups", 4) != 4 or c.get("num_blocks_per_group", 2) != 2:
        raise ValueError(f"config_from_huggingface: expected the dVAE's 4 groups of 2 blocks, got "
                         f"{c.get('num_groups')} x {c.get('num_blocks_per_group')}")
    _check_heads(cfg)
    spec = flava_model_for_pretraining(codebook_image_size=8 * (i["image_size"] // i["patch_size"]),
                                       codebook_n_hid=c["hidden_size"], image_vocab_size=i["vocab_size"], **kw)
    weights = {ours: float(cfg.get(theirs, 1.0)) for theirs, ours in _WEIGHTS}
    loss = dataclasses.replace(spec.loss, layer_norm_eps=t["layer_norm_eps"],
                               logit_scale_init=cfg.get("logit_scale_init_value", math.log(1 / 0.07)),
                               ignore_index=int(cfg.get("ce_ignore_index", -100)), **weights)
    codebook = dataclasses.replace(spec.image_codebook, vocab_size=c["vocab_size"])
    return dataclasses.replace(spec, loss=loss, image_codebook=codebook)


def from_huggingface(state_dict: Mapping[str, Tensor], config: Any = None, *, spec: Any = None) -> tuple[Any, Params]:
    """A ``FlavaModel`` / ``FlavaForPreTraining`` state dict (and its ``FlavaConfig``, or ``spec``) ->
    ``(spec, params)``. ``FlavaModel``'s ``logit_scale`` has no place in :class:`FLAVAModel` (its loss holds
    it) and is ignored. One ``ValueError`` names every mismatched key; a tied decoder bias that differs from its
    head's bias is an error."""
    pretraining = any(k.startswith("flava.") for k in state_dict)
    if spec is None:
        if config is None:
            raise ValueError("from_huggingface: pass config=<FlavaConfig> (or spec=...)")
        spec = config_from_huggingface(config, pretraining=pretraining)
    for h, _ in _HEADS:
        dec, bias = state_dict.get(f"{h}.decoder.bias"), state_dict.get(f"{h}.bias")
        if dec is not None and bias is not None and not torch.equal(dec, bias):
            raise ValueError(f"from_huggingface: {h}.decoder.bias differs from {h}.bias (transformers ties them)")
    return spec, huggingface_table(spec).to_ours(state_dict, spec)


def to_huggingface(params: Params, spec: Any, logit_scale: float = math.log(1 / 0.07)) -> dict[str, Tensor]:
    """Params -> the ``transformers`` state dict (``FlavaModel`` gets ``logit_scale`` from the argument)."""
    sd = huggingface_table(spec).to_theirs(params, spec=spec)
    if isinstance(spec, FLAVAModel):
        sd["logit_scale"] = torch.tensor(float(logit_scale))
    else:
        for h, _ in _HEADS:
            sd[f"{h}.decoder.bias"] = sd[f"{h}.bias"]
    return sd
