"""torchvision ``SwinTransformer3d`` state dicts <-> :class:`~polymodal.core.encoders.swin3d.Swin3D` params.

The key map is short: torchvision's ``features`` interleaves stages and merges, so
``features.{2i}.{j}.*`` is ``stages.{i}.{j}.*`` and ``features.{2i+1}.*`` is ``merges.{i}.*``;
every other key (``patch_embed``, ``norm``, ``head``, and the names inside blocks) is the same.
The ``relative_position_index`` buffers are a function of the window size: they are checked and
dropped on the way in, and regenerated on the way out. TorchMultimodal's ``SwinTransformer3d``
(head-less) uses the same keys.

>>> import torchvision
>>> tv = torchvision.models.video.swin3d_t(weights=None)
>>> params = from_torchvision(tv.state_dict())
>>> sorted(params)
['head', 'merges', 'norm', 'patch_embed', 'stages']
>>> sorted(to_torchvision(params)) == sorted(tv.state_dict())
True
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

import torch
from torch import Tensor

from ...core import random as pr
from ...core.encoders.swin3d import Swin3D
from ...core.layers.window import relative_position_index
from ...core.pytree import Params, check_like, flatten, unflatten

__all__ = ["from_torchvision", "to_torchvision", "infer_spec"]

_FEATURE = re.compile(r"features\.(\d+)\.(.+)")
_STAGE = re.compile(r"(stages|merges)\.(\d+)\.(.+)")
_TOP = ("patch_embed.", "norm.", "head.")
_INDEX = "relative_position_index"
_TV_WINDOW = (8, 7, 7)  # every torchvision Swin3D builder uses this window


def _to_ours(key: str) -> str | None:
    m = _FEATURE.fullmatch(key)
    if m:
        i = int(m[1])
        return f"{'stages' if i % 2 == 0 else 'merges'}.{i // 2}.{m[2]}"
    return key if key.startswith(_TOP) else None


def _to_theirs(key: str) -> str | None:
    m = _STAGE.fullmatch(key)
    if m:
        i = int(m[2])
        return f"features.{2 * i if m[1] == 'stages' else 2 * i + 1}.{m[3]}"
    return key if key.startswith(_TOP) else None


def infer_spec(flat: Mapping[str, Tensor], window_size: tuple[int, int, int] | None = None) -> Swin3D:
    """The :class:`Swin3D` whose params have these shapes (either key layout).

    The window cannot be read from the shapes alone; it defaults to torchvision's (8, 7, 7)
    and must agree with the bias tables' size.
    """
    flat = {(_to_ours(k) or k) if k.startswith("features.") else k: v for k, v in flat.items()}
    try:
        w = flat["patch_embed.proj.weight"]
        depths, heads, stage = [], [], 0
        while f"stages.{stage}.0.norm1.weight" in flat:
            j = 0
            while f"stages.{stage}.{j}.norm1.weight" in flat:
                j += 1
            depths.append(j)
            heads.append(flat[f"stages.{stage}.0.attn.relative_position_bias_table"].shape[1])
            stage += 1
        hidden = flat["stages.0.0.mlp.0.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"cannot read a Swin3D layout from these keys: missing {e.args[0]!r}") from None
    head = flat.get("head.weight")
    spec = Swin3D(
        patch_size=tuple(w.shape[2:]), embed_dim=w.shape[0], depths=tuple(depths), num_heads=tuple(heads),
        window_size=window_size or _TV_WINDOW, mlp_ratio=hidden / w.shape[0], in_channels=w.shape[1],
        num_classes=None if head is None else head.shape[0],
    )
    rows = flat["stages.0.0.attn.relative_position_bias_table"].shape[0]
    expected = spec.blocks(0)[0].attn().table_size
    if rows != expected:
        raise ValueError(
            f"relative_position_bias_table has {rows} rows, but window_size {spec.window_size} needs {expected}; "
            "pass the model's window_size (or spec)"
        )
    return spec


@functools.lru_cache(maxsize=8)
def _shapes(spec: Swin3D) -> tuple[tuple[str, tuple[int, ...]], ...]:
    # Shapes only: initialising on the meta device allocates nothing (but takes a second or two).
    return tuple((k, tuple(v.shape)) for k, v in flatten(spec.init(key=pr.key(0, device="meta"))).items())


def _expected(spec: Swin3D) -> Params:
    return unflatten({k: torch.empty(shape, device="meta") for k, shape in _shapes(spec)})


def from_torchvision(state_dict: Mapping[str, Tensor], spec: Swin3D | None = None) -> Params:
    """torchvision (or TorchMultimodal) ``SwinTransformer3d`` state dict -> :class:`Swin3D` params.

    Args:
        state_dict: ``model.state_dict()`` (tensors are shared, not copied).
        spec: the target model; default inferred from the shapes (window (8, 7, 7)).

    Raises:
        ValueError: naming unknown keys, missing or unexpected keys and shape mismatches
            against ``spec``, or a ``relative_position_index`` that does not fit the window.
    """
    unknown = sorted(k for k in state_dict if _to_ours(k) is None)
    if unknown:
        raise ValueError(f"torchvision Swin3D state dict: unknown keys ({len(unknown)}): {', '.join(unknown)}")
    spec = spec if spec is not None else infer_spec(state_dict)
    flat, index = {}, None
    for k, v in state_dict.items():
        if k.endswith("." + _INDEX):
            index = relative_position_index(spec.window_size) if index is None else index
            if tuple(v.shape) != tuple(index.shape) or not torch.equal(v.cpu(), index):
                raise ValueError(f"{k}: does not match window_size {spec.window_size} (shape {tuple(v.shape)})")
            continue
        flat[k] = v
    # Checked in torchvision's key space, so the error names the keys the caller passed.
    theirs = unflatten({_to_theirs(k): v for k, v in flatten(_expected(spec)).items()})
    check_like(flat, theirs, what="torchvision Swin3D state dict")
    return unflatten({_to_ours(k): v for k, v in flat.items()})


def to_torchvision(params: Params, spec: Swin3D | None = None) -> dict[str, Tensor]:
    """:class:`Swin3D` params -> a state dict ``torchvision``'s ``SwinTransformer3d`` loads strictly.

    The ``relative_position_index`` buffers are regenerated from ``spec.window_size``
    (default inferred, window (8, 7, 7)).
    """
    flat = flatten(params)
    unknown = sorted(k for k in flat if _to_theirs(k) is None)
    if unknown:
        raise ValueError(f"Swin3D params: unknown keys ({len(unknown)}): {', '.join(unknown)}")
    spec = spec if spec is not None else infer_spec(flat)
    check_like(flat, _expected(spec), what="Swin3D params")
    out: dict[str, Tensor] = {}
    for k, v in flat.items():
        out[_to_theirs(k)] = v
        if k.endswith(".attn.relative_position_bias_table"):
            out[_to_theirs(k)[: -len("relative_position_bias_table")] + _INDEX] = relative_position_index(
                spec.window_size, v.device)
    return dict(sorted(out.items(), key=_tv_order))  # stable: torchvision's module order


def _tv_order(item: tuple[str, Tensor]) -> tuple[int, int]:
    key = item[0]
    m = _FEATURE.fullmatch(key)
    return (1, int(m[1])) if m else ({"patch_embed": 0, "norm": 2, "head": 3}[key.split(".")[0]], 0)
