"""JSON with tensors: how checkpoint extras and optimizer hyperparameters are stored.

A value is JSON (dict with string keys, list, str, int, float, bool, None), a tuple or a
tensor. :func:`encode` turns tensors into ``{"__tensor__": put(t)}`` (``put`` decides where
the tensor goes: a safetensors entry name, or inline data) and tuples into
``{"__tuple__": [...]}``; :func:`decode` undoes it. :func:`inline` / :func:`from_inline`
are the ``put`` / ``get`` pair that keep a tensor's exact values inside the JSON itself.

>>> import torch
>>> enc = encode({"key": torch.tensor([1, 2]), "betas": (0.9, 0.99)}, inline)
>>> enc["key"]
{'__tensor__': {'dtype': 'int64', 'shape': [2], 'data': [1, 2]}}
>>> decode(enc, from_inline)
{'key': tensor([1, 2]), 'betas': (0.9, 0.99)}
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["encode", "decode", "inline", "from_inline", "dumps"]


def encode(obj: Any, put: Callable[[Tensor], Any]) -> Any:
    """JSON-able form of ``obj``; tensors become ``{"__tensor__": put(t)}``, tuples ``{"__tuple__": [...]}``."""
    if isinstance(obj, Tensor):
        return {"__tensor__": put(obj)}
    if isinstance(obj, Mapping):
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:
            raise TypeError(f"checkpoint extras need string keys, got {bad[:3]!r}")
        return {k: encode(v, put) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, put) for v in obj]}
    if isinstance(obj, list):
        return [encode(v, put) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"checkpoint extras hold JSON values, tuples and tensors, got {type(obj).__name__}: {obj!r:.60}")


def decode(obj: Any, get: Callable[[Any], Tensor]) -> Any:
    """Inverse of :func:`encode`: ``get`` receives what ``put`` returned."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return get(obj["__tensor__"])
        if set(obj) == {"__tuple__"}:
            return tuple(decode(v, get) for v in obj["__tuple__"])
        return {k: decode(v, get) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v, get) for v in obj]
    return obj


def inline(t: Tensor) -> dict:
    """Exact JSON form of a (small) tensor: dtype, shape and values (floats round-trip through repr)."""
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
            "data": t.detach().cpu().reshape(-1).tolist()}


def from_inline(d: dict) -> Tensor:
    """Inverse of :func:`inline`."""
    dtype = getattr(torch, d["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {d['dtype']!r} in inline tensor")
    return torch.tensor(d["data"], dtype=dtype).reshape(d["shape"])


def dumps(obj: Any) -> str:
    """Canonical compact JSON (sorted keys), so equal values give equal strings and hashes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
