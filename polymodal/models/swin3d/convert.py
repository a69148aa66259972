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

import re
from collections.abc import Mapping

from torch import Tensor

from ...core.convert import Derived, Rule, Table
from ...core.encoders.swin3d import Swin3D, swin3d
from ...core.layers.window import relative_position_index
from ...core.pytree import Params, flatten, unflatten

__all__ = ["from_torchvision", "to_torchvision", "infer_spec", "TORCHVISION"]

_FEATURE = re.compile(r"features\.(\d+)\.(.+)")
_TV_WINDOW = (8, 7, 7)  # every torchvision Swin3D builder uses this window

TORCHVISION = Table(
    (Rule("features.{2i}.{j}.{rest*}", "stages.{i}.{j}.{rest*}"),
     Rule("features.{2i+1}.{rest*}", "merges.{i}.{rest*}"),
     Rule("patch_embed.{rest*}", "patch_embed.{rest*}"),
     Rule("norm.{p}", "norm.{p}"),
     Rule("head.{p}", "head.{p}")),
    derived=(Derived("features.{2i}.{j}.attn.relative_position_index", "stages.{i}.{j}.attn.relative_position_bias_table",
                     lambda spec, device: relative_position_index(spec.window_size, device),
                     lambda spec: f"window_size {spec.window_size}"),),
    name="torchvision Swin3D state dict",
)
"""torchvision's (and TorchMultimodal's) ``SwinTransformer3d`` layout."""


def infer_spec(flat: Mapping[str, Tensor], window_size: tuple[int, int, int] | None = None) -> Swin3D:
    """The :class:`Swin3D` whose params have these shapes (either key layout).

    The window cannot be read from the shapes alone; it defaults to torchvision's (8, 7, 7)
    and must agree with the bias tables' size.
    """
    flat = {k: v for k, v in flat.items() if not k.startswith("features.")} | TORCHVISION.rename(
        {k: v for k, v in flat.items() if k.startswith("features.")})
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
    spec = swin3d(
        patch_size=tuple(w.shape[2:]), embed_dim=w.shape[0], depths=tuple(depths), num_heads=tuple(heads),
        window_size=window_size or _TV_WINDOW, mlp_ratio=hidden / w.shape[0], in_channels=w.shape[1],
        num_classes=None if head is None else head.shape[0],
    )
    rows = flat["stages.0.0.attn.relative_position_bias_table"].shape[0]
    expected = spec.stages[0][0].attn().table_size
    if rows != expected:
        raise ValueError(
            f"relative_position_bias_table has {rows} rows, but window_size {spec.window_size} needs {expected}; "
            "pass the model's window_size (or spec)"
        )
    return spec


def from_torchvision(state_dict: Mapping[str, Tensor], spec: Swin3D | None = None) -> Params:
    """torchvision (or TorchMultimodal) ``SwinTransformer3d`` state dict -> :class:`Swin3D` params.

    Args:
        state_dict: ``model.state_dict()`` (tensors are shared, not copied).
        spec: the target model; default inferred from the shapes (window (8, 7, 7)).

    Raises:
        ValueError: naming unknown keys, missing or unexpected keys and shape mismatches
            against ``spec``, or a ``relative_position_index`` that does not fit the window.
    """
    unknown = TORCHVISION.unknown(state_dict)
    if unknown:
        raise ValueError(f"torchvision Swin3D state dict: unknown keys ({len(unknown)}): {', '.join(unknown)}")
    spec = spec if spec is not None else infer_spec(state_dict)
    flat = flatten(TORCHVISION.to_ours(state_dict, spec))
    # torchvision's order (its parameters before its sub-modules'), so to_torchvision gives it back
    return unflatten({k: flat[k] for k in TORCHVISION.rename(state_dict) if k in flat})


def to_torchvision(params: Params, spec: Swin3D | None = None) -> dict[str, Tensor]:
    """:class:`Swin3D` params -> a state dict ``torchvision``'s ``SwinTransformer3d`` loads strictly.

    The ``relative_position_index`` buffers are regenerated from ``spec.window_size``
    (default inferred, window (8, 7, 7)).
    """
    flat = flatten(params)
    unknown = TORCHVISION.unknown(flat, ours=True)
    if unknown:
        raise ValueError(f"Swin3D params: unknown keys ({len(unknown)}): {', '.join(unknown)}")
    spec = spec if spec is not None else infer_spec(flat)
    out = TORCHVISION.to_theirs(params, spec=spec)
    return dict(sorted(out.items(), key=_tv_order))  # stable: torchvision's module order


def _tv_order(item: tuple[str, Tensor]) -> tuple[int, int]:
    key = item[0]
    m = _FEATURE.fullmatch(key)
    return (1, int(m[1])) if m else ({"patch_embed": 0, "norm": 2, "head": 3}[key.split(".")[0]], 0)
