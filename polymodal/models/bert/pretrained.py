"""A local Hugging Face BERT-family folder -> spec, params and tokenizer, without ``transformers``.

The folder holds ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``, read with
``weights_only=True``; sharded checkpoints through their ``*.index.json``) and the tokenizer files
(``tokenizer.json``, or ``vocab.txt``, or ``vocab.json`` + ``merges.txt``). Nothing is downloaded:
fetch a model with ``huggingface-cli download sentence-transformers/all-MiniLM-L6-v2 --local-dir DIR``.

>>> import tempfile
>>> load_pretrained(tempfile.mkdtemp())  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
FileNotFoundError: load_pretrained: no config.json in '...': expected a Hugging Face model folder ...
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

from ... import hub
from ...core.pytree import Params
from ...data.bert_tokenizer import load_tokenizer
from .convert import from_huggingface

__all__ = ["Pretrained", "load_pretrained", "read_weights"]

_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


class Pretrained(NamedTuple):
    """What :func:`load_pretrained` returns: the spec, its params, the tokenizer (or None) and config.json."""

    spec: Any
    params: Params
    tokenizer: Any
    config: dict


def read_weights(directory: str | os.PathLike) -> dict:
    """The folder's state dict: ``model.safetensors``, ``pytorch_model.bin``, or the shards an
    ``*.index.json`` lists (through :func:`polymodal.hub.read_state_dict`, never unpickling code)."""
    d = Path(directory)
    for name in _WEIGHTS:
        if (d / name).is_file():
            return hub.read_state_dict(d / name)
        index = d / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            sd: dict = {}
            for s in shards:
                sd.update(hub.read_state_dict(d / s))
            return sd
    raise FileNotFoundError(f"load_pretrained: no weights in '{d}': expected one of {list(_WEIGHTS)} "
                            "(or a sharded *.index.json)")


def load_pretrained(directory: str | os.PathLike, *, model: str = "encoder", tokenizer: bool = True) -> Pretrained:
    """Read a local Hugging Face model folder (BERT, RoBERTa, DistilBERT, MiniLM / sentence-transformers).

    ``model``: ``"encoder"`` (task heads ignored), ``"mlm"``, ``"classifier"`` or ``"auto"`` (by the keys).
    """
    d = Path(directory)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"load_pretrained: no config.json in '{d}': expected a Hugging Face model folder "
                                "(config.json + model.safetensors or pytorch_model.bin + tokenizer files)")
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    spec, params = from_huggingface(read_weights(d), config, model=model)
    tok = None
    if tokenizer:
        enc = spec if hasattr(spec, "embeddings") else spec.bert
        n = enc.embeddings.max_position_embeddings - (enc.embeddings.pad_token_id + 1
                                                      if enc.embeddings.position_offset else 0)
        tok = load_tokenizer(d, config.get("model_type"), max_length=n)
    return Pretrained(spec, params, tok, config)
