"""TorchMultimodal ALBEF state dicts <-> polymodal params and state (tables on ``core/convert.py``).

One TorchMultimodal ``state_dict()`` holds both trees: the momentum copies (``*_m``) and the queues
become our **state**, the rest our **params**; the round trip is exact.

==========================================================  ==========================================
TorchMultimodal ``ALBEFModelForRetrieval``                   ours (``params`` / ``state``)
==========================================================  ==========================================
``model_with_similarity.albef_model.vision_encoder.*``       ``model.vision.*`` (torchvision ViT names)
``...albef_model.text_encoder.*``                             ``model.text.*`` (BERT, fused q/k/v)
``...albef_model.multimodal_encoder.layer.{i}.*``             ``model.multimodal.layers.{i}.*``
``...albef_model.{vision,text,multimodal}_encoder_m.*``       state ``momentum.model.{vision,text,multimodal}.*``
``model_with_similarity.{vision,text}_proj[_m].*``            ``{vision,text}_proj.*`` / state ``momentum.*``
``model_with_similarity.temp``                                ``temp``
``model_with_similarity.{image,text,idx}_queue, queue_ptr``   state ``{image,text,idx}_queue, queue_ptr``
``itm_head.*``                                                ``itm_head.*``
==========================================================  ==========================================

``ALBEFModelForVQA``: ``model.*`` (as ``albef_model.*`` above), ``answer_decoder.text_embeddings.*`` ->
``answer_decoder.embeddings.*``, ``answer_decoder.multimodal_encoder.*`` -> ``answer_decoder.encoder.*``,
``answer_decoder.prediction_head.*`` -> ``prediction_head.*``, ``answer_decoder_m.*`` -> state ``momentum.*``.

>>> from polymodal.core import random as pr
>>> from polymodal.models.albef.builders import albef_tiny
>>> spec = albef_tiny(mlm=False)
>>> p = spec.init(key=pr.key(0))
>>> s = spec.initial_state(p, key=pr.key(1))
>>> sd = to_torchmultimodal(p, s, spec)
>>> p2, s2 = from_torchmultimodal(sd, spec)
>>> bool((p2["temp"] == p["temp"]).all()), bool((s2["text_queue"] == s["text_queue"]).all())
(True, True)
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ...core import random as pr
from ...core.convert import Rule, Table, fused
from ...core.encoders.bert import BERTTextEncoder
from ...core.layers.transformer import TransformerEncoder
from ...core.pytree import Params
from ...core.spec import Spec
from .retrieval import ALBEFForRetrieval
from .vqa import ALBEFForVQA

__all__ = ["from_torchmultimodal", "to_torchmultimodal", "torchmultimodal_table", "WithState"]


@dataclass(frozen=True)
class WithState(Spec):
    """``{"params": spec's params, "state": spec's state}`` as one tree: what one TorchMultimodal
    ``state_dict()`` holds (momentum copies and queues are its buffers and frozen parameters)."""

    spec: Any  # ALBEFForRetrieval or ALBEFForVQA

    def init(self, *, key: Tensor) -> Params:
        kp, ks = pr.split(key, 2)
        params = self.spec.init(key=kp)
        return {"params": params, "state": self.spec.initial_state(params, key=ks)}


def _qkv(t: str, o: str) -> tuple[Rule, ...]:
    return tuple(Rule(tuple(f"{t}.{n}.{w}" for n in ("query", "key", "value")), f"{o}.in_proj_{w}", fused(0))
                 for w in ("weight", "bias"))


def _vision(t: str, o: str) -> tuple[Rule, ...]:
    """torchvision's ``VisionTransformer`` behind ``create_feature_extractor`` (``ALBEFVisionEncoder``)."""
    lt, lo = f"{t}encoder.encoder.layers.encoder_layer_{{i}}", f"{o}transformer.layers.{{i}}"
    return (Rule(f"{t}encoder.class_token", f"{o}embeddings.cls_token"),
            Rule(f"{t}encoder.conv_proj.{{p}}", f"{o}embeddings.conv_projection.{{p}}"),
            Rule(f"{t}encoder.encoder.pos_embedding", f"{o}embeddings.position_embeddings"),
            Rule(f"{lt}.ln_1.{{p}}", f"{lo}.norm1.{{p}}"),
            Rule(f"{lt}.self_attention.{{p*}}", f"{lo}.self_attn.{{p*}}"),
            Rule(f"{lt}.ln_2.{{p}}", f"{lo}.norm2.{{p}}"),
            Rule(f"{lt}.mlp.0.{{p}}", f"{lo}.linear1.{{p}}"),
            Rule(f"{lt}.mlp.3.{{p}}", f"{lo}.linear2.{{p}}"),
            Rule(f"{t}encoder.encoder.ln.{{p}}", f"{o}transformer.norm.{{p}}"))


def _embeddings(t: str, o: str) -> tuple[Rule, ...]:
    return (Rule(f"{t}layer_norm.{{p}}", f"{o}LayerNorm.{{p}}"), Rule(f"{t}{{n}}.weight", f"{o}{{n}}.weight"))


def _layers(t: str, o: str, enc: TransformerEncoder, ff_last: int) -> tuple[Rule, ...]:
    """TorchMultimodal's BERT layers (``attention``, ``attention_layernorm``, ``feedforward.model``,
    ``feedforward_layernorm``) and ALBEF's cross-attention layers (``cross_attention[_layernorm]``)."""
    lt, lo = f"{t}layer.{{i}}", f"{o}layers.{{i}}"
    cross = enc.layer_at(0).cross_attention
    rules = [*_qkv(f"{lt}.attention", f"{lo}.self_attn"),
             Rule(f"{lt}.attention.output.{{p}}", f"{lo}.self_attn.out_proj.{{p}}"),
             Rule(f"{lt}.attention_layernorm.{{p}}", f"{lo}.norm1.{{p}}"),
             Rule(f"{lt}.feedforward.model.0.{{p}}", f"{lo}.linear1.{{p}}"),
             Rule(f"{lt}.feedforward.model.{ff_last}.{{p}}", f"{lo}.linear2.{{p}}"),
             Rule(f"{lt}.feedforward_layernorm.{{p}}", f"{lo}.norm3.{{p}}" if cross else f"{lo}.norm2.{{p}}")]
    if cross:
        if enc.layer_at(0).cross_attn().fused:
            rules += _qkv(f"{lt}.cross_attention", f"{lo}.multihead_attn")
        else:
            rules += [Rule(f"{lt}.cross_attention.{n}.{{p}}", f"{lo}.multihead_attn.{m}.{{p}}")
                      for n, m in zip(("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))]
        rules += [Rule(f"{lt}.cross_attention.output.{{p}}", f"{lo}.multihead_attn.out_proj.{{p}}"),
                  Rule(f"{lt}.cross_attention_layernorm.{{p}}", f"{lo}.norm2.{{p}}")]
    return tuple(rules)


def _text(t: str, o: str, enc: BERTTextEncoder, ff_last: int) -> tuple[Rule, ...]:
    return (*_embeddings(f"{t}embeddings.", f"{o}embeddings."),
            *_layers(f"{t}encoder.", f"{o}encoder.", enc.encoder, ff_last))


def _albef_model(t: str, o: str, spec: Any, text_ff: int) -> tuple[Rule, ...]:
    m = spec.model
    rules: list[Rule] = []
    for suffix, dst in (("", f"params.{o}"), ("_m", f"state.momentum.{o}")):
        rules += [*_vision(f"{t}vision_encoder{suffix}.", f"{dst}vision."),
                  *_text(f"{t}text_encoder{suffix}.", f"{dst}text.", m.text, text_ff),
                  *_layers(f"{t}multimodal_encoder{suffix}.", f"{dst}multimodal.", m.multimodal, 2)]
    return tuple(rules)


@functools.lru_cache(maxsize=16)
def torchmultimodal_table(spec: Any, text_ff: int = 2) -> Table:
    """The layout of TorchMultimodal's ``ALBEFModelForRetrieval`` / ``ALBEFModelForVQA`` over
    :class:`WithState` ``(spec)``. ``text_ff``: the text encoder's second feed-forward linear is
    ``feedforward.model.2`` (``dropout=0``, the example configs) or ``.3`` (a dropout layer between)."""
    if isinstance(spec, ALBEFForRetrieval):
        if spec.mlm_head is not None:
            raise ValueError("torchmultimodal_table: TorchMultimodal's ALBEFModelForRetrieval has no MLM head; "
                             "build the spec with mlm=False (albef_retrieval(mlm=False))")
        p = "model_with_similarity."
        rules = [*_albef_model(f"{p}albef_model.", "model.", spec, text_ff),
                 Rule("itm_head.{p}", "params.itm_head.{p}"), Rule(f"{p}temp", "params.temp")]
        for n in ("vision_proj", "text_proj"):
            rules += [Rule(f"{p}{n}.{{p}}", f"params.{n}.{{p}}"), Rule(f"{p}{n}_m.{{p}}", f"state.momentum.{n}.{{p}}")]
        rules += [Rule(f"{p}{n}", f"state.{n}") for n in ("image_queue", "text_queue", "idx_queue", "queue_ptr")]
        return Table(tuple(rules), name="TorchMultimodal ALBEFModelForRetrieval state dict")
    if isinstance(spec, ALBEFForVQA):
        rules = list(_albef_model("model.", "model.", spec, text_ff))
        for src, dst in (("answer_decoder.", "params."), ("answer_decoder_m.", "state.momentum.")):
            rules += [*_embeddings(f"{src}text_embeddings.", f"{dst}answer_decoder.embeddings."),
                      *_layers(f"{src}multimodal_encoder.", f"{dst}answer_decoder.encoder.",
                               spec.answer_decoder.encoder, 2),
                      Rule(f"{src}prediction_head.{{n}}.{{p}}", f"{dst}prediction_head.{{n}}.{{p}}")]
        return Table(tuple(rules), name="TorchMultimodal ALBEFModelForVQA state dict")
    raise TypeError(f"torchmultimodal_table: expected ALBEFForRetrieval or ALBEFForVQA, got {type(spec).__name__}")


def from_torchmultimodal(state_dict: Mapping[str, Tensor], spec: Any) -> tuple[Params, Params]:
    """A TorchMultimodal ``ALBEFModelForRetrieval`` / ``ALBEFModelForVQA`` state dict -> ``(params, state)``
    of ``spec`` (momentum copies and queues in ``state``). One error names every mismatched key."""
    text_ff = 3 if any(".text_encoder.encoder.layer.0.feedforward.model.3." in k for k in state_dict) else 2
    both = torchmultimodal_table(spec, text_ff).to_ours(state_dict, WithState(spec))
    return both["params"], both["state"]


def to_torchmultimodal(params: Params, state: Params, spec: Any, *, text_ff: int = 2) -> dict[str, Tensor]:
    """``(params, state)`` -> the TorchMultimodal state dict (``load_state_dict(strict=True)`` takes it)."""
    return torchmultimodal_table(spec, text_ff).to_theirs({"params": params, "state": state}, spec=WithState(spec))
