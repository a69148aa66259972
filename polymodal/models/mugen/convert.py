"""TorchMultimodal ``MultimodalGPT`` state dicts <-> polymodal params (tables on core/convert.py).

=====================================================  ===========================================
TorchMultimodal (``video_gpt`` / MUGEN ``text_video_gpt``)  ours (:class:`MultimodalGPT`)
=====================================================  ===========================================
``in_tokenizer.codebook.embedding`` (VQ-VAE codes)      ``in_embed.weight`` (when ``in_proj`` exists)
``in_tokenizer.embedding.weight`` (MUGEN text table)    ``in_embed.weight`` (no ``in_proj``)
``in_projection.weight`` / ``out_projection.weight``    ``in_proj.weight`` / ``out_proj.weight``
``out_tokenizer.codebook.embedding``                    ``out_embed.weight``
``mm_decoder.{in,out}_pos_emb.embedding.d_{k}``         ``{in,out}_pos.embedding.d_{k}``
``mm_decoder.in_pos_emb.weight`` (MUGEN nn.Embedding)   ``in_pos.embedding.d_0``
``mm_decoder.right_shift.sos``                          ``sos``
``mm_decoder.decoder.layers.{i}.attention.{query,key,value}.weight``  ``decoder.layers.{i}.self_attn.in_proj_weight``
``....attention.output.*``, ``norm_attn``, ``norm_mlp``  ``self_attn.out_proj.*``, ``norm1``, ``norm2``
``....mlp.model.0`` / ``mlp.model.2``                   ``linear1`` / ``linear2``
``norm.*``, ``to_logit.weight``                         same
=====================================================  ===========================================

The rest of a tokenizer VQ-VAE (``*_tokenizer.encoder/decoder/codebook.code_*``) is not the GPT's:
read it with the ``vqvae`` family's converter (``family("vqvae").extra["from_torchmultimodal"](sd, spec,
prefix="out_tokenizer.")``, as :func:`polymodal.models.mugen.pretrained.load_pretrained` does);
:func:`to_torchmultimodal` merges such a state dict back in (``tokenizers=``).

>>> from polymodal.core import random as pr
>>> from polymodal.models.mugen import mugen_gpt_tiny
>>> spec = mugen_gpt_tiny()
>>> p = spec.init(key=pr.key(0))
>>> sd = to_torchmultimodal(p, spec)
>>> sd["mm_decoder.decoder.layers.0.attention.query.weight"].shape
torch.Size([96, 96])
>>> bool((from_torchmultimodal(sd, spec)["decoder"]["layers"][3]["linear2"]["weight"]
...       == p["decoder"]["layers"][3]["linear2"]["weight"]).all())
True
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from ...core.convert import Rule, Table, fused
from ...core.encoders.gpt import MultimodalGPT
from ...core.pytree import Params

__all__ = ["torchmultimodal_table", "from_torchmultimodal", "to_torchmultimodal"]

_VQ_REST = ("encoder.{r*}", "decoder.{r*}", "codebook.code_usage", "codebook.code_avg")


def torchmultimodal_table(spec: MultimodalGPT) -> Table:
    """The layout of TorchMultimodal's ``MultimodalGPT`` for ``spec``: a modality with a projection
    reads its tokens from a tokenizer VQ-VAE's codebook, one without from ``<side>_tokenizer.embedding``
    (MUGEN's text); a 1-d position table is MUGEN's ``nn.Embedding``."""
    d = "mm_decoder.decoder.layers.{i}"
    o = "decoder.layers.{i}"
    qkv = tuple(f"{d}.attention.{n}.weight" for n in ("query", "key", "value"))
    rules = [Rule(qkv, f"{o}.self_attn.in_proj_weight", fused(0)),
             Rule(f"{d}.attention.output.{{p}}", f"{o}.self_attn.out_proj.{{p}}"),
             Rule(f"{d}.norm_attn.{{p}}", f"{o}.norm1.{{p}}"), Rule(f"{d}.norm_mlp.{{p}}", f"{o}.norm2.{{p}}"),
             Rule(f"{d}.mlp.model.0.{{p}}", f"{o}.linear1.{{p}}"), Rule(f"{d}.mlp.model.2.{{p}}", f"{o}.linear2.{{p}}"),
             Rule("mm_decoder.right_shift.sos", "sos"), Rule("norm.{p}", "norm.{p}"),
             Rule("to_logit.weight", "to_logit.weight")]
    drop = []
    for side in ("in", "out"):
        if getattr(spec, f"{side}_proj") is None:
            rules.append(Rule(f"{side}_tokenizer.embedding.weight", f"{side}_embed.weight"))
        else:
            rules += [Rule(f"{side}_tokenizer.codebook.embedding", f"{side}_embed.weight"),
                      Rule(f"{side}_projection.{{p}}", f"{side}_proj.{{p}}")]
            drop += [f"{side}_tokenizer.{r}" for r in _VQ_REST]
        if len(getattr(spec, f"{side}_shape")) == 1 and getattr(spec, f"{side}_proj") is None:
            rules.append(Rule(f"mm_decoder.{side}_pos_emb.weight", f"{side}_pos.embedding.d_0"))
        else:
            rules.append(Rule(f"mm_decoder.{side}_pos_emb.embedding.{{d}}", f"{side}_pos.embedding.{{d}}"))
    return Table(tuple(rules), drop=tuple(drop), name="TorchMultimodal MultimodalGPT state dict")


def from_torchmultimodal(state_dict: Mapping[str, Tensor], spec: MultimodalGPT) -> Params:
    """A TorchMultimodal ``MultimodalGPT`` state dict -> params of ``spec`` (the tokenizer VQ-VAEs'
    other weights are ignored here); every missing / unexpected / mis-shaped key is named."""
    return torchmultimodal_table(spec).to_ours(state_dict, spec)


def to_torchmultimodal(params: Params, spec: MultimodalGPT,
                       tokenizers: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Params -> a TorchMultimodal ``MultimodalGPT`` state dict. ``tokenizers``: the tokenizer
    VQ-VAEs' own keys (already prefixed ``in_tokenizer.`` / ``out_tokenizer.``), merged in so the
    result loads with ``strict=True``; the GPT's token tables win for ``*.codebook.embedding``."""
    out = torchmultimodal_table(spec).to_theirs(params, spec=spec)
    return {**dict(tokenizers or {}), **out}
