"""TorchMultimodal ``Omnivore`` state dicts <-> :class:`~.model.Omnivore` params (a table on core/convert.py).

=================================================  ==========================================
TorchMultimodal                                    ours
=================================================  ==========================================
``encoder.patch_embed.{patch_embed,depth_patch_embed}.*``  the same
``encoder.features.{2i}.{j}.*``                    ``encoder.stages.{i}.{j}.*``
``encoder.features.{2i+1}.*``                      ``encoder.merges.{i}.*``
``encoder.norm.*``                                 ``encoder.norm.*``
``heads.video.1.*`` (``Sequential(Dropout, Linear)``)  ``heads.video.*``
``heads.{image,rgbd}.*``                           the same
=================================================  ==========================================

The ``relative_position_index`` buffers are a function of the window: checked on the way in,
regenerated on the way out. The published weights come as two files (encoder, heads);
:func:`from_torchmultimodal` also takes the encoder's keys without the ``encoder.`` prefix
and the heads' without ``heads.`` when they are merged into one dict by
:func:`merge_published`.

>>> from polymodal.core import random as pr
>>> from polymodal.models.omnivore.builders import omnivore_tiny
>>> spec = omnivore_tiny()
>>> params = spec.init(key=pr.key(0))
>>> sd = to_torchmultimodal(params, spec)
>>> sd["heads.video.1.weight"].shape, "encoder.features.0.0.attn.relative_position_index" in sd
(torch.Size([4, 64]), True)
>>> back = from_torchmultimodal(sd, spec)
>>> bool((back["encoder"]["merges"][0]["reduction"]["weight"] == params["encoder"]["merges"][0]["reduction"]["weight"]).all())
True
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ...core.convert import Derived, Rule, Table
from ...core.layers.window import relative_position_index
from ...core.pytree import Params, flatten, unflatten
from .builders import omnivore, omnivore_encoder
from .model import Omnivore

__all__ = ["TORCHMULTIMODAL", "from_torchmultimodal", "to_torchmultimodal", "infer_spec", "merge_published"]

TORCHMULTIMODAL = Table(
    (Rule("encoder.features.{2i}.{j}.{rest*}", "encoder.stages.{i}.{j}.{rest*}"),
     Rule("encoder.features.{2i+1}.{rest*}", "encoder.merges.{i}.{rest*}"),
     Rule("encoder.patch_embed.{rest*}", "encoder.patch_embed.{rest*}"),
     Rule("encoder.norm.{p}", "encoder.norm.{p}"),
     Rule("heads.video.1.{p}", "heads.video.{p}"),
     Rule("heads.{name}.{p}", "heads.{name}.{p}")),
    derived=(Derived("encoder.features.{2i}.{j}.attn.relative_position_index",
                     "encoder.stages.{i}.{j}.attn.relative_position_bias_table",
                     lambda spec, device: relative_position_index(spec.encoder.window_size, device),
                     lambda spec: f"window_size {spec.encoder.window_size}"),),
    name="TorchMultimodal Omnivore state dict",
)
"""TorchMultimodal's ``Omnivore(encoder=SwinTransformer3d(patch_embed=PatchEmbedOmnivore), heads)`` layout."""


def merge_published(encoder: Mapping[str, Tensor], heads: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The published encoder file's keys (``patch_embed.*``, ``features.*``, ``norm.*``) and heads
    file's (``image.*``, ``rgbd.*``, ``video.1.*``) as one ``Omnivore`` state dict."""
    out = {k if k.startswith("encoder.") else f"encoder.{k}": v for k, v in encoder.items()}
    out |= {k if k.startswith("heads.") else f"heads.{k}": v for k, v in (heads or {}).items()}
    return out


def infer_spec(state_dict: Mapping[str, Tensor]) -> Omnivore:
    """The :class:`Omnivore` whose params have these shapes (the window is read off the bias tables and
    index buffers, with equal height and width; without index buffers an ambiguous table size is taken
    to mean a 7 x 7 spatial window, as in every reference configuration)."""
    flat = TORCHMULTIMODAL.rename(state_dict)
    try:
        w = flat["encoder.patch_embed.patch_embed.proj.weight"]
        depth_w = flat["encoder.patch_embed.depth_patch_embed.proj.weight"]
        depths, heads = [], []
        while f"encoder.stages.{len(depths)}.0.norm1.weight" in flat:
            i, j = len(depths), 0
            while f"encoder.stages.{i}.{j}.norm1.weight" in flat:
                j += 1
            depths.append(j)
            heads.append(flat[f"encoder.stages.{i}.0.attn.relative_position_bias_table"].shape[1])
        rows = flat["encoder.stages.0.0.attn.relative_position_bias_table"].shape[0]
        hidden = flat["encoder.stages.0.0.mlp.0.weight"].shape[0]
    except KeyError as e:
        raise ValueError(f"cannot read an Omnivore layout from these keys: missing {e.args[0]!r}") from None
    window = _window(rows, state_dict.get("encoder.features.0.0.attn.relative_position_index"))
    enc = omnivore_encoder(patch_size=tuple(w.shape[2:]), embed_dim=w.shape[0], depths=depths, num_heads=heads,
                           window_size=window, mlp_ratio=hidden / w.shape[0], depth_channels=depth_w.shape[1])
    names = sorted({k.split(".")[1] for k in flat if k.startswith("heads.") and k.endswith(".weight")})
    modality = {"image": "image", "video": "video", "rgbd": "rgbd"}
    head_specs = [(n, modality.get(n, "image"), flat[f"heads.{n}.weight"].shape[0],
                   0.5 if f"heads.{n}.1.weight" in state_dict else 0.0) for n in names]
    return omnivore(enc, head_specs)


def _window(rows: int, index: Tensor | None) -> tuple[int, int, int]:
    """The window ``(Wd, Wh, Wh)`` whose bias table has ``rows`` rows (and, if given, whose index buffer is
    ``index``); among several, the reference's spatial 7 x 7 first."""
    found = [(d, h, h) for h in range(1, 33) for d in range(1, 65) if (2 * d - 1) * (2 * h - 1) ** 2 == rows]
    if index is not None:
        found = [w for w in found if tuple(index.shape) == (w[0] * w[1] * w[2],) * 2
                 and torch.equal(index, relative_position_index(w, index.device))]
    if not found:
        raise ValueError(f"relative_position_bias_table has {rows} rows: expected (2 Wd - 1) (2 Wh - 1) (2 Ww - 1) "
                         "for a window with Wh = Ww (and a relative_position_index that fits it)")
    return sorted(found, key=lambda w: (w[1] != 7, w[1]))[0]


def from_torchmultimodal(state_dict: Mapping[str, Tensor], spec: Omnivore | None = None) -> Params:
    """TorchMultimodal ``Omnivore`` state dict -> params of ``spec`` (default: :func:`infer_spec`).

    Tensors are shared, not copied. Raises ``ValueError`` naming unknown, missing, unexpected and
    mis-shaped keys, or a ``relative_position_index`` that does not fit the window.
    """
    unknown = TORCHMULTIMODAL.unknown(state_dict)
    if unknown:
        raise ValueError(f"TorchMultimodal Omnivore state dict: unknown keys ({len(unknown)}): {', '.join(unknown)}")
    spec = spec if spec is not None else infer_spec(state_dict)
    flat = flatten(TORCHMULTIMODAL.to_ours(state_dict, spec))
    return unflatten({k: flat[k] for k in TORCHMULTIMODAL.rename(state_dict) if k in flat})  # the reference's order


def to_torchmultimodal(params: Params, spec: Omnivore | None = None) -> dict[str, Tensor]:
    """Params -> a state dict TorchMultimodal's ``Omnivore`` loads strictly (index buffers regenerated)."""
    flat = flatten(params)
    unknown = TORCHMULTIMODAL.unknown(flat, ours=True)
    if unknown:
        raise ValueError(f"Omnivore params: unknown keys ({len(unknown)}): {', '.join(unknown)}")
    spec = spec if spec is not None else infer_spec(to_theirs_names(flat))
    out = TORCHMULTIMODAL.to_theirs(params, spec=spec)
    return dict(sorted(out.items(), key=_tmm_order))  # stable: the reference's module order


def _tmm_order(item: tuple[str, Tensor]) -> tuple[int, int]:
    parts = item[0].split(".")
    if parts[0] == "heads":
        return (3, 0)
    return {"patch_embed": (0, 0), "norm": (2, 0)}.get(parts[1], (1, int(parts[2])) if parts[1] == "features" else (4, 0))


def to_theirs_names(flat: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our flat keys renamed to the reference's (no derived keys): enough to infer a spec from."""
    out = {}
    for k, v in flat.items():
        parts = k.split(".")
        if k.startswith("encoder.stages."):
            k = ".".join(["encoder", "features", str(2 * int(parts[2])), *parts[3:]])
        elif k.startswith("encoder.merges."):
            k = ".".join(["encoder", "features", str(2 * int(parts[2]) + 1), *parts[3:]])
        elif k.startswith("heads.video."):
            k = ".".join(["heads", "video", "1", *parts[2:]])
        out[k] = v
    return out
