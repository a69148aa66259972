"""Hugging Face and TorchMultimodal BERT-family state dicts <-> polymodal params (tables on core/convert.py).

Layouts (``{i}`` a layer; ours is ``encoder.layers.{i}`` with torch's ``TransformerEncoderLayer`` names):

==========================================  ==========================================  ===========================
Hugging Face BERT / RoBERTa                  DistilBERT                                   ours
==========================================  ==========================================  ===========================
``attention.self.{query,key,value}.*``       ``attention.{q,k,v}_lin.*``                  ``self_attn.in_proj_*`` (fused)
``attention.output.dense.*``                 ``attention.out_lin.*``                      ``self_attn.out_proj.*``
``attention.output.LayerNorm.*``             ``sa_layer_norm.*``                          ``norm1.*``
``crossattention.self.*`` / ``.output.*``    (none)                                       ``multihead_attn.*`` / ``norm2.*``
``intermediate.dense.*``                     ``ffn.lin1.*``                               ``linear1.*``
``output.dense.*``                           ``ffn.lin2.*``                               ``linear2.*``
``output.LayerNorm.*``                       ``output_layer_norm.*``                      ``norm2.*`` (``norm3.*`` with cross-attention)
==========================================  ==========================================  ===========================

``embeddings.*`` and ``pooler.dense.*`` keep their names. Task models: ``bert.`` / ``roberta.`` /
``distilbert.`` prefixes are the encoder. Masked-LM heads are our ``predictions.*``:
``BertForMaskedLM``'s ``cls.predictions.{transform.dense, transform.LayerNorm, bias}``,
``RobertaForMaskedLM``'s ``lm_head.{dense, layer_norm, bias}``, ``DistilBertForMaskedLM``'s
``vocab_transform``, ``vocab_layer_norm``, ``vocab_projector.bias`` (``transform.dense``,
``transform.LayerNorm``, ``bias``); their decoders (``cls.predictions.decoder``, ``lm_head.decoder``,
``vocab_projector.weight``) are the tied word table and the bias, checked equal when read and
written back. ``classifier.*`` is kept
(``BertForSequenceClassification``). TorchMultimodal's ``BERTTextEncoder``: ``embeddings.layer_norm``,
``encoder.layer.{i}.attention.{query,key,value,output}``, ``attention_layernorm``,
``feedforward.model.{0,3}`` (FLAVA's ``{0,2}``), ``feedforward_layernorm``, ``layernorm``, ``pooler.dense``.

>>> import torch
>>> from polymodal.core import random as pr
>>> from polymodal.models.bert.builders import bert_tiny
>>> spec = bert_tiny()
>>> params = spec.init(key=pr.key(0))
>>> sd = to_huggingface(params, spec)
>>> sd["encoder.layer.0.attention.self.query.weight"].shape
torch.Size([32, 32])
>>> spec2, back = from_huggingface(sd, spec=spec)
>>> bool((back["encoder"]["layers"][1]["linear1"]["weight"] == params["encoder"]["layers"][1]["linear1"]["weight"]).all())
True
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ...core.convert import Rule, Table, fused
from ...core.encoders.bert import BERTTextEncoder, bert_text_encoder
from ...core.pytree import Params
from .model import BERTForMaskedLM, bert_classifier, bert_for_masked_lm

__all__ = ["from_huggingface", "to_huggingface", "from_torchmultimodal", "to_torchmultimodal", "config_from_huggingface",
           "legacy_names", "mlm_layout",
           "huggingface_table", "torchmultimodal_table"]

_PREFIXES = ("bert.", "roberta.", "distilbert.")
# Buffers some checkpoints carry (not parameters) and pretraining heads an encoder does not use.
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids", "{p*}.embeddings.position_ids",
            "{p*}.embeddings.token_type_ids")
_HEADS = ("cls.{r*}", "lm_head.{r*}", "classifier.{r*}", "qa_outputs.{r*}", "vocab_transform.{r*}",
          "vocab_layer_norm.{r*}", "vocab_projector.{r*}", "pre_classifier.{r*}")


def _qkv(t: str, o: str, names: tuple[str, str, str], fmt: str = "{}.{{p}}") -> tuple[Rule, ...]:
    """``t.{query,key,value}.{weight,bias}`` <-> ``o.in_proj_{weight,bias}`` (fused along the rows)."""
    return tuple(Rule(tuple(f"{t}.{n}.{w}" for n in names), f"{o}.in_proj_{w}", fused(0)) for w in ("weight", "bias"))


def _layer_rules(t: str, o: str, flavour: str, cross: tuple[int, ...], fused_cross: bool) -> tuple[Rule, ...]:
    """Rules for every layer ``t.{i}`` <-> ``o.{i}``; ``cross``: the layers that cross-attend."""
    i = "{i}"
    if flavour == "distilbert":
        return (*_qkv(f"{t}.{i}.attention", f"{o}.{i}.self_attn", ("q_lin", "k_lin", "v_lin")),
                Rule(f"{t}.{i}.attention.out_lin.{{p}}", f"{o}.{i}.self_attn.out_proj.{{p}}"),
                Rule(f"{t}.{i}.sa_layer_norm.{{p}}", f"{o}.{i}.norm1.{{p}}"),
                Rule(f"{t}.{i}.ffn.lin1.{{p}}", f"{o}.{i}.linear1.{{p}}"),
                Rule(f"{t}.{i}.ffn.lin2.{{p}}", f"{o}.{i}.linear2.{{p}}"),
                Rule(f"{t}.{i}.output_layer_norm.{{p}}", f"{o}.{i}.norm2.{{p}}"))
    if flavour.startswith("tmm"):  # TorchMultimodal's MLP: Linear, act, [Dropout when dropout > 0], Linear
        last = int(flavour[-1])
        return (*_qkv(f"{t}.{i}.attention", f"{o}.{i}.self_attn", ("query", "key", "value")),
                Rule(f"{t}.{i}.attention.output.{{p}}", f"{o}.{i}.self_attn.out_proj.{{p}}"),
                Rule(f"{t}.{i}.attention_layernorm.{{p}}", f"{o}.{i}.norm1.{{p}}"),
                Rule(f"{t}.{i}.feedforward.model.0.{{p}}", f"{o}.{i}.linear1.{{p}}"),
                Rule(f"{t}.{i}.feedforward.model.{last}.{{p}}", f"{o}.{i}.linear2.{{p}}"),
                Rule(f"{t}.{i}.feedforward_layernorm.{{p}}", f"{o}.{i}.norm2.{{p}}"))
    rules: list[Rule] = []
    for j in cross:  # cross-attending layers: the feed-forward's norm is norm3, the cross-attention's norm2
        rules += [Rule(f"{t}.{j}.crossattention.output.LayerNorm.{{p}}", f"{o}.{j}.norm2.{{p}}"),
                  Rule(f"{t}.{j}.output.LayerNorm.{{p}}", f"{o}.{j}.norm3.{{p}}")]
    if cross:
        ca, names = f"{t}.{i}.crossattention.self", ("query", "key", "value")
        if fused_cross:
            rules += _qkv(ca, f"{o}.{i}.multihead_attn", names)
        else:
            rules += [Rule(f"{ca}.{n}.{{p}}", f"{o}.{i}.multihead_attn.{m}.{{p}}")
                      for n, m in zip(names, ("q_proj", "k_proj", "v_proj"))]
        rules.append(Rule(f"{t}.{i}.crossattention.output.dense.{{p}}", f"{o}.{i}.multihead_attn.out_proj.{{p}}"))
    return (*rules,
            *_qkv(f"{t}.{i}.attention.self", f"{o}.{i}.self_attn", ("query", "key", "value")),
            Rule(f"{t}.{i}.attention.output.dense.{{p}}", f"{o}.{i}.self_attn.out_proj.{{p}}"),
            Rule(f"{t}.{i}.attention.output.LayerNorm.{{p}}", f"{o}.{i}.norm1.{{p}}"),
            Rule(f"{t}.{i}.intermediate.dense.{{p}}", f"{o}.{i}.linear1.{{p}}"),
            Rule(f"{t}.{i}.output.dense.{{p}}", f"{o}.{i}.linear2.{{p}}"),
            Rule(f"{t}.{i}.output.LayerNorm.{{p}}", f"{o}.{i}.norm2.{{p}}"))


def _encoder_rules(spec: BERTTextEncoder, t: str, o: str, flavour: str) -> tuple[Rule, ...]:
    enc = spec.encoder
    cross = tuple(j for j in range(enc.num_layers) if enc.layer_at(j).cross_attention)
    fused_cross = bool(cross) and enc.layer_at(cross[0]).cross_attn().fused
    stack = f"{t}transformer.layer" if flavour == "distilbert" else f"{t}encoder.layer"
    ln = "layer_norm" if flavour.startswith("tmm") else "LayerNorm"
    return (Rule(f"{t}embeddings.{ln}.{{p}}", f"{o}embeddings.LayerNorm.{{p}}"),
            Rule(f"{t}embeddings.{{n}}.weight", f"{o}embeddings.{{n}}.weight"),
            *_layer_rules(stack, f"{o}encoder.layers", flavour, cross, fused_cross),
            Rule(f"{t}pooler.dense.{{p}}", f"{o}pooler.dense.{{p}}"),
            Rule(f"{t}layernorm.{{p}}", f"{o}layernorm.{{p}}"))


def _flavour(spec: BERTTextEncoder) -> str:
    return "distilbert" if spec.embeddings.type_vocab_size == 0 else "bert"


# Masked-LM heads: BertForMaskedLM's cls.predictions, RobertaForMaskedLM's lm_head, DistilBertForMaskedLM's vocab_*.
_MLM_RULES = {
    "bert": (Rule("cls.predictions.transform.{n}.{p}", "predictions.transform.{n}.{p}"),
             Rule("cls.predictions.bias", "predictions.bias")),
    "roberta": (Rule("lm_head.dense.{p}", "predictions.transform.dense.{p}"),
                Rule("lm_head.layer_norm.{p}", "predictions.transform.LayerNorm.{p}"),
                Rule("lm_head.bias", "predictions.bias")),
    "distilbert": (Rule("vocab_transform.{p}", "predictions.transform.dense.{p}"),
                   Rule("vocab_layer_norm.{p}", "predictions.transform.LayerNorm.{p}"),
                   Rule("vocab_projector.bias", "predictions.bias")),
}
# (tied decoder weight = the word table, its bias when it is a second name of the head's bias)
_MLM_TIED = {"bert": ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias"),
             "roberta": ("lm_head.decoder.weight", "lm_head.decoder.bias"),
             "distilbert": ("vocab_projector.weight", None)}
_MLM_BIAS = {"bert": "cls.predictions.bias", "roberta": "lm_head.bias", "distilbert": "vocab_projector.bias"}


def mlm_layout(enc: BERTTextEncoder) -> str:
    """Which Hugging Face masked-LM head goes with ``enc``: ``"bert"``, ``"roberta"`` or ``"distilbert"``."""
    return _flavour(enc) if _flavour(enc) == "distilbert" else "roberta" if enc.embeddings.position_offset else "bert"


@functools.lru_cache(maxsize=32)
def huggingface_table(spec: Any, prefix: str | None = None) -> Table:
    """The Hugging Face layout of ``spec`` (an encoder, :class:`BERTForMaskedLM` or :class:`BERTClassifier`);
    ``prefix`` is the encoder's (default ``""`` for an encoder, ``"bert."`` etc. for a task model)."""
    enc = spec if isinstance(spec, BERTTextEncoder) else spec.bert
    fl = _flavour(enc)
    if isinstance(spec, BERTTextEncoder):
        return Table(_encoder_rules(enc, prefix or "", "", fl), drop=_BUFFERS + _HEADS,
                     name="from_huggingface: the Hugging Face state dict")
    if prefix is None:
        prefix = {"distilbert": "distilbert."}.get(fl, "roberta." if enc.embeddings.position_offset else "bert.")
    rules = _encoder_rules(enc, prefix, "bert.", fl)
    if isinstance(spec, BERTForMaskedLM):
        layout = mlm_layout(enc)
        rules += _MLM_RULES[layout]
        # the tied decoder (and, for BERT, BertForPreTraining's next-sentence head and pooler)
        drop = tuple(k for k in _MLM_TIED[layout] if k) + (("cls.seq_relationship.{p}",) if layout == "bert" else ())
        if not enc.pooler:
            drop += (f"{prefix}pooler.{{p*}}",)
    else:
        rules += (Rule("classifier.{p}", "classifier.{p}"),)
        drop = ()
    return Table(rules, drop=_BUFFERS + drop, name="from_huggingface: the Hugging Face state dict")


@functools.lru_cache(maxsize=32)
def torchmultimodal_table(spec: BERTTextEncoder, mlp_dropout: bool | None = None) -> Table:
    """TorchMultimodal's ``BERTTextEncoder`` (``bert_text_encoder``, FLAVA's ``flava_text_encoder``).
    Its feed-forward's second linear is ``feedforward.model.3`` when the MLP has a dropout layer
    (``dropout > 0``) and ``model.2`` otherwise: ``mlp_dropout`` (default: ``spec``'s dropout > 0)."""
    if mlp_dropout is None:
        mlp_dropout = spec.encoder.layer.dropout > 0
    return Table(_encoder_rules(spec, "", "", f"tmm{3 if mlp_dropout else 2}"),
                 name="from_torchmultimodal: the TorchMultimodal BERTTextEncoder state dict")


# --- architecture from config.json or from the shapes -------------------------------------------------------

_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def _strip(sd: Mapping[str, Tensor]) -> tuple[str, dict[str, Tensor]]:
    """The encoder's prefix and the encoder's keys without it (heads and buffers left out)."""
    for p in _PREFIXES:
        if any(k.startswith(p) for k in sd):
            return p, {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
    return "", dict(sd)


def config_from_huggingface(state_dict: Mapping[str, Tensor], config: Mapping[str, Any] | str | os.PathLike | None = None
                            ) -> BERTTextEncoder:
    """The encoder spec from ``config.json`` (a dict or its path) or, without one, from the shapes. Shapes cannot
    show the head count (taken as ``hidden // 64``, BERT's convention), the activation (GELU), nor the
    padding id (0; RoBERTa's 1 when the keys say ``roberta.``), nor ``is_decoder`` (causal self-attention,
    which a config's ``is_decoder: true`` turns on): pass the config when you have it."""
    prefix, sd = _strip(state_dict)
    if isinstance(config, (str, os.PathLike)):  # a config.json path
        config = json.loads(Path(config).read_text(encoding="utf-8"))
    cfg = dict(config or {})
    mtype = cfg.get("model_type") or {"roberta.": "roberta", "distilbert.": "distilbert"}.get(prefix)
    distil = mtype == "distilbert" or any(k.startswith("transformer.layer.") for k in sd)
    try:
        word = sd["embeddings.word_embeddings.weight"]
        vocab, hidden = word.shape
        layer_rx = re.compile(r"(?:encoder|transformer)\.layer\.(\d+)\.")
        n_layers = len({m[1] for k in sd if (m := layer_rx.match(k))})
        ff = sd["transformer.layer.0.ffn.lin1.weight" if distil else "encoder.layer.0.intermediate.dense.weight"]
        cross = sorted({int(m[1]) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.crossattention\.", k))})
        args: dict[str, Any] = dict(
            vocab_size=vocab, hidden_size=hidden, num_layers=n_layers, intermediate_size=ff.shape[0],
            max_position_embeddings=sd["embeddings.position_embeddings.weight"].shape[0],
            type_vocab_size=0 if distil else sd["embeddings.token_type_embeddings.weight"].shape[0],
            pooler="pooler.dense.weight" in sd, is_causal=bool(cfg.get("is_decoder", False)))
    except KeyError as e:
        raise ValueError(f"from_huggingface: cannot infer the BERT architecture: key {e.args[0]!r} is missing "
                         f"(keys start {sorted(state_dict)[:4]}); pass config=... (config.json) or spec=...") from None
    roberta = mtype in ("roberta", "xlm-roberta", "camembert")
    if cross:
        args |= dict(cross_attention_every=cross[1] - cross[0] if len(cross) > 1 else n_layers,
                     dim_kv=sd[f"encoder.layer.{cross[0]}.crossattention.self.key.weight"].shape[1])
    if distil:
        args |= dict(num_heads=cfg.get("n_heads", hidden // 64), pad_token_id=cfg.get("pad_token_id", 0),
                     activation=_ACT.get(cfg.get("activation", "gelu"), "gelu"))
    else:
        args |= dict(num_heads=cfg.get("num_attention_heads", max(hidden // 64, 1)),
                     pad_token_id=cfg.get("pad_token_id", 1 if roberta else 0),
                     layer_norm_eps=cfg.get("layer_norm_eps", 1e-5 if roberta else 1e-12),
                     activation=_ACT.get(cfg.get("hidden_act", "gelu"), "gelu"), position_offset=roberta)
    if args["pad_token_id"] is None:
        args["pad_token_id"] = 0
    return bert_text_encoder(**args)


def legacy_names(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """TensorFlow-era names some hub checkpoints still carry (``bert-base-uncased``'s
    ``LayerNorm.gamma`` / ``LayerNorm.beta``) renamed to ``weight`` / ``bias``, as ``transformers`` does."""
    def fix(k: str) -> str:
        if k.endswith(".gamma"):
            return k[:-6] + ".weight"
        if k.endswith(".beta"):
            return k[:-5] + ".bias"
        return k
    return {fix(k): v for k, v in state_dict.items()}


_MLM_KEYS = ("cls.predictions.transform.dense.weight", "lm_head.dense.weight", "vocab_transform.weight")


def _task_spec(state_dict: Mapping[str, Tensor], enc: BERTTextEncoder, model: str) -> Any:
    if model == "auto":
        model = "mlm" if any(k in state_dict for k in _MLM_KEYS) else \
            "classifier" if "classifier.weight" in state_dict and enc.pooler else "encoder"
    if model == "mlm":  # RobertaLMHead applies exact GELU whatever hidden_act; DistilBERT's head norm has eps 1e-12
        layout = mlm_layout(enc)
        return bert_for_masked_lm(enc, activation="gelu" if layout == "roberta" else None,
                                  layer_norm_eps=1e-12 if layout == "distilbert" else None)
    if model == "classifier":
        return bert_classifier(enc, state_dict["classifier.weight"].shape[0])
    if model != "encoder":
        raise ValueError(f"from_huggingface: model: expected 'auto', 'encoder', 'mlm' or 'classifier', got {model!r}")
    return enc


def from_huggingface(state_dict: Mapping[str, Tensor], config: Mapping[str, Any] | str | os.PathLike | None = None, *,
                     spec: Any = None, model: str = "auto") -> tuple[Any, Params]:
    """A Hugging Face ``BertModel`` / ``BertForMaskedLM`` / ``BertForSequenceClassification`` /
    ``RobertaModel`` / ``DistilBertModel`` state dict -> ``(spec, params)``.

    ``model``: ``"encoder"`` (heads ignored), ``"mlm"``, ``"classifier"`` or ``"auto"`` (by the keys).
    ``spec`` skips the inference. Raises one ``ValueError`` naming every missing, unexpected and
    mis-shaped key (and the tied decoder when it differs from the word table)."""
    state_dict = legacy_names(state_dict)
    if spec is None:
        spec = _task_spec(state_dict, config_from_huggingface(state_dict, config), model)
    if isinstance(spec, BERTTextEncoder):
        prefix, _ = _strip(state_dict)
        table = huggingface_table(spec, prefix)
    else:
        table = huggingface_table(spec, _strip(state_dict)[0])
        if isinstance(spec, BERTForMaskedLM):
            _check_tied(state_dict, mlm_layout(spec.bert))
    return spec, table.to_ours(state_dict, spec)


def _check_tied(state_dict: Mapping[str, Tensor], layout: str) -> None:
    """The decoder's weight must be the word table (and a decoder bias the head's bias): polymodal ties them."""
    (dec_w, dec_b), prefix = _MLM_TIED[layout], _strip(state_dict)[0]
    for key, other in ((dec_w, f"{prefix}embeddings.word_embeddings.weight"), (dec_b, _MLM_BIAS[layout])):
        a, b = (None if key is None else state_dict.get(key)), state_dict.get(other)
        if a is not None and b is not None and not torch.equal(a, b):
            raise ValueError(f"from_huggingface: {key} differs from {other}; polymodal's masked-LM head ties them "
                             "(as Hugging Face's masked-LM models do)")


def to_huggingface(params: Params, spec: Any, prefix: str | None = None) -> dict[str, Tensor]:
    """Params of ``spec`` -> the Hugging Face state dict (``load_state_dict(strict=True)`` takes it):
    an encoder as ``BertModel`` / ``RobertaModel`` / ``DistilBertModel``, task models with their prefix."""
    sd = huggingface_table(spec, prefix).to_theirs(params, spec=spec)
    if isinstance(spec, BERTForMaskedLM):
        layout = mlm_layout(spec.bert)
        p = f"{layout}." if prefix is None else prefix
        dec_w, dec_b = _MLM_TIED[layout]
        sd[dec_w] = sd[f"{p}embeddings.word_embeddings.weight"]
        if dec_b is not None:
            sd[dec_b] = sd[_MLM_BIAS[layout]]
    return sd


def from_torchmultimodal(state_dict: Mapping[str, Tensor], spec: BERTTextEncoder) -> Params:
    """TorchMultimodal's ``BERTTextEncoder`` state dict -> params of ``spec`` (e.g.
    ``builders.tmm_flava_text_encoder()``); one error names every mismatched key."""
    mlp_dropout = any(".feedforward.model.3." in k for k in state_dict)
    return torchmultimodal_table(spec, mlp_dropout).to_ours(state_dict, spec)


def to_torchmultimodal(params: Params, spec: BERTTextEncoder, mlp_dropout: bool | None = None) -> dict[str, Tensor]:
    """Params -> TorchMultimodal's ``BERTTextEncoder`` state dict (``mlp_dropout``: see :func:`torchmultimodal_table`)."""
    return torchmultimodal_table(spec, mlp_dropout).to_theirs(params, spec=spec)

