"""TorchMultimodal video VQ-VAE state dicts <-> polymodal params and state (tables on core/convert.py).

===============================================  ==========================================
TorchMultimodal (``VQVAE(VideoEncoder, VideoDecoder)``)  ours (params / state)
===============================================  ==========================================
``encoder.convs.{2i}.conv.*`` (ReLUs between)     ``encoder.convs.{i}.conv.*``
``{enc,dec}oder.res_stack.{i}.block.0/3/6.*``     ``....res_blocks.{i}.bn1/bn2/bn3.*`` (BN running stats: state)
``....block.2.conv.weight`` / ``block.5...``      ``....res_blocks.{i}.conv1/conv2.conv.weight``
``....block.8.mha_attns.{j}.query/key/value/output``  ``....attn.mha_attns.{j}.q_proj/k_proj/v_proj/out_proj``
``{enc,dec}oder.res_stack.{n}.*`` (n = blocks)    ``....res_norm.*``
``decoder.convts.{2i}.convt.*``                   ``decoder.convts.{i}.convt.*``
``codebook.embedding/code_usage/code_avg``        state ``codebook.*`` (+ ``initialized``: True when read)
===============================================  ==========================================

>>> from polymodal.core import random as pr
>>> from polymodal.models.vqvae import vqvae_tiny
>>> spec = vqvae_tiny()
>>> p, s = spec.init(key=pr.key(0)), spec.init_state()
>>> sd = to_torchmultimodal(p, s, spec)
>>> p2, s2 = from_torchmultimodal(sd, spec)
>>> bool((p2["decoder"]["convts"][1]["convt"]["weight"] == p["decoder"]["convts"][1]["convt"]["weight"]).all())
True
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ...core.convert import Rule, Table
from ...core.pytree import Params
from .model import VQVAE

__all__ = ["torchmultimodal_table", "from_torchmultimodal", "to_torchmultimodal"]

_BLOCK = (("block.0", "bn1"), ("block.2", "conv1"), ("block.3", "bn2"), ("block.5", "conv2"), ("block.6", "bn3"))
_ATTN = (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"), ("output", "out_proj"))


def _stack_rules(t: str, o: str, n_blocks: int) -> list[Rule]:
    rules = [Rule(f"{t}.res_stack.{{i}}.{a}.{{p*}}", f"{o}.res_blocks.{{i}}.{b}.{{p*}}") for a, b in _BLOCK]
    rules += [Rule(f"{t}.res_stack.{{i}}.block.8.mha_attns.{{j}}.{a}.{{p}}",
                   f"{o}.res_blocks.{{i}}.attn.mha_attns.{{j}}.{b}.{{p}}") for a, b in _ATTN]
    rules.append(Rule(f"{t}.res_stack.{n_blocks}.{{p}}", f"{o}.res_norm.{{p}}"))
    return rules


def torchmultimodal_table(spec: VQVAE, prefix: str = "") -> Table:
    """The layout of TorchMultimodal's video ``VQVAE`` for ``spec`` (keys under ``prefix``, e.g.
    ``"out_tokenizer."`` inside a GPT checkpoint)."""
    t = prefix
    rules = [Rule(f"{t}encoder.convs.{{2i}}.conv.{{p}}", "encoder.convs.{i}.conv.{p}"),
             Rule(f"{t}encoder.conv_out.conv.{{p}}", "encoder.conv_out.conv.{p}"),
             Rule(f"{t}decoder.conv_in.conv.{{p}}", "decoder.conv_in.conv.{p}"),
             Rule(f"{t}decoder.convts.{{2i}}.convt.{{p}}", "decoder.convts.{i}.convt.{p}"),
             *_stack_rules(f"{t}encoder", "encoder", len(spec.encoder.res_blocks)),
             *_stack_rules(f"{t}decoder", "decoder", len(spec.decoder.res_blocks)),
             *(Rule(f"{t}codebook.{n}", f"codebook.{n}") for n in ("embedding", "code_usage", "code_avg"))]
    return Table(tuple(rules), defaults=(("codebook.initialized", lambda s: torch.tensor(True)),),
                 name="TorchMultimodal video VQVAE state dict")


def from_torchmultimodal(state_dict: Mapping[str, Tensor], spec: VQVAE, prefix: str = "") -> tuple[Params, Params]:
    """A TorchMultimodal ``VQVAE`` state dict -> ``(params, state)`` of ``spec``; the codebook counts
    as initialised (a trained checkpoint's codes). Every missing / unexpected / mis-shaped key is named."""
    return torchmultimodal_table(spec, prefix).to_ours(state_dict, spec, with_state=True)


def to_torchmultimodal(params: Params, state: Params, spec: VQVAE, prefix: str = "") -> dict[str, Tensor]:
    """``(params, state)`` -> a state dict TorchMultimodal's ``VQVAE`` loads (``load_state_dict``)."""
    return torchmultimodal_table(spec, prefix).to_theirs(params, state, spec=spec)
