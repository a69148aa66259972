"""torch.optim state keyed by flat param keys instead of the optimizer's integer ids.

``optimizer.state_dict()`` numbers params by their position in the param groups, which
breaks as soon as the optimizer is rebuilt in another order. Here each state tensor is
stored under the flat key of the param it belongs to (``optim.state.blocks.0.w.exp_avg``),
hyperparameters go to JSON, and loading maps keys back onto the live optimizer's params.

>>> import torch
>>> from polymodal.core.pytree import leaves
>>> p = {"w": torch.ones(2, requires_grad=True)}
>>> opt = torch.optim.AdamW(leaves(p))
>>> p["w"].grad = torch.ones(2); opt.step()
>>> tensors, info = optimizer_entries(opt, p)
>>> sorted(tensors), info["class"]
(['optim.state.w.exp_avg', 'optim.state.w.exp_avg_sq', 'optim.state.w.step'], 'AdamW')
"""

from __future__ import annotations

from itertools import chain
from typing import Any

import torch
from torch import Tensor

from polymodal.core.pytree import Params, flatten
from polymodal.train.checkpoint.extras import decode, encode

__all__ = ["param_keys", "optimizer_entries", "load_optimizer_state"]


def param_keys(optimizer: torch.optim.Optimizer, params: Params) -> list[list[str]]:
    """The flat key of every param of every group of ``optimizer`` (matched by identity)."""
    key_of: dict[int, str] = {}
    for k, t in flatten(params).items():
        key_of.setdefault(id(t), k)
    out = []
    for g, group in enumerate(optimizer.param_groups):
        keys = []
        for i, p in enumerate(group["params"]):
            if id(p) not in key_of:
                raise ValueError(
                    f"optimizer param group {g}, param {i} (shape {tuple(p.shape)}) is not a leaf of the params "
                    "tree; build the optimizer over leaves(params) of the tree being saved/loaded"
                )
            keys.append(key_of[id(p)])
        out.append(keys)
    return out


def optimizer_entries(optimizer: torch.optim.Optimizer, params: Params) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split the optimizer state into named tensors and a JSON-able description.

    Returns:
        ``(tensors, info)``: ``tensors`` maps ``optim.state.<key>.<name>`` (and
        ``optim.other.<i>`` for tensors among hyperparameters) to tensors; ``info`` holds the
        class name, the param groups (keys + hyperparameters) and the state layout.
    """
    keys = param_keys(optimizer, params)
    sd = optimizer.state_dict()
    id_to_key = dict(chain.from_iterable(zip(sg["params"], ks) for sg, ks in zip(sd["param_groups"], keys)))
    tensors: dict[str, Tensor] = {}

    def put(t: Tensor) -> str:
        name = f"optim.other.{sum(k.startswith('optim.other.') for k in tensors)}"
        tensors[name] = t
        return name

    groups = [
        {"params": ks, "hyper": encode({k: v for k, v in sg.items() if k not in ("params", "param_names")}, put)}
        for sg, ks in zip(sd["param_groups"], keys)
    ]
    state: dict[str, dict] = {}
    for i, st in sd["state"].items():
        if i not in id_to_key:
            raise ValueError(f"{type(optimizer).__name__} state entry {i!r} belongs to no param; cannot key it")
        key, enc = id_to_key[i], {}
        for name, v in st.items():
            if isinstance(v, Tensor) and isinstance(name, str) and "." not in name:
                tensors[f"optim.state.{key}.{name}"] = v
                enc[name] = {"__tensor__": f"optim.state.{key}.{name}"}
            else:
                enc[name] = encode(v, put)
        state[key] = enc
    return tensors, {"class": type(optimizer).__qualname__, "param_groups": groups, "state": state}


def load_optimizer_state(optimizer: torch.optim.Optimizer, params: Params, tensors: dict[str, Tensor],
                         info: dict[str, Any]) -> None:
    """Load what :func:`optimizer_entries` produced into ``optimizer`` (built over leaves of ``params``).

    Everything is checked before the optimizer is touched; problems raise ``ValueError`` naming
    the optimizer class, group counts, or missing / unexpected param keys.
    """
    name = type(optimizer).__qualname__
    if info["class"] != name:
        raise ValueError(f"optimizer state was saved from {info['class']}, cannot load it into {name}")
    live, saved = param_keys(optimizer, params), [g["params"] for g in info["param_groups"]]
    if len(live) != len(saved):
        raise ValueError(f"optimizer has {len(live)} param group(s), the saved state {len(saved)}")
    for g, (lk, sk) in enumerate(zip(live, saved)):
        if set(lk) != set(sk):
            missing, unexpected = sorted(set(sk) - set(lk)), sorted(set(lk) - set(sk))
            raise ValueError(f"optimizer param group {g} does not match the saved one: params missing from the "
                             f"optimizer {missing}, params the saved state lacks {unexpected}")

    def get(entry: str) -> Tensor:
        if entry not in tensors:
            raise ValueError(f"optimizer state entry {entry!r} is missing")
        return tensors[entry]

    ids = {k: i for i, k in enumerate(chain.from_iterable(live))}
    sd = {
        "state": {ids[k]: decode(v, get) for k, v in info["state"].items()},
        "param_groups": [{**decode(g["hyper"], get), "params": [ids[k] for k in lk]}
                         for g, lk in zip(info["param_groups"], live)],
    }
    optimizer.load_state_dict(sd)
