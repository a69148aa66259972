"""A general Vision Transformer (Dosovitskiy et al. 2021): patch embedding, transformer blocks, pooling.

The spec's fields are its sub-specs: a :class:`~polymodal.core.layers.PatchEmbedding` (conv with
or without bias, optional class token, learned or fixed 2-d sin-cos positions, optional mask
token (BEiT / FLAVA), MAE random masking), a :class:`~polymodal.core.layers.TransformerEncoder`
(pre- or post-norm, optional final LayerNorm), and the pooling (``cls``, ``gap``, ``map``: an
attention pooler with one learned query, or ``none``). :func:`vision_transformer` builds it
from the usual hyperparameters; :func:`vit_b_16` ... are the paper's Table 1. Params::

    embeddings: PatchEmbedding's (cls_token, conv_projection, position_embeddings, mask_token)
    transformer: {layers: [torch.nn.TransformerEncoderLayer names] * L, norm (final_norm)}
    pooler: AttentionPooler's (pool="map")

>>> import torch
>>> from polymodal.core import random as pr
>>> vit = vision_transformer(image_size=32, patch_size=8, width=32, layers=2, heads=4)
>>> out = vit(vit.init(key=pr.key(0)), torch.randn(2, 3, 32, 32))
>>> out.last_hidden_state.shape, out.pooled.shape
(torch.Size([2, 17, 32]), torch.Size([2, 32]))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import random as pr
from ..layers.patch import PatchEmbedding
from ..layers.pooling import AttentionPooler, cls_pool, mean_pool
from ..layers.position import sincos_2d
from ..layers.transformer import TransformerEncoder, TransformerEncoderLayer
from ..pytree import Params
from ..spec import Spec

__all__ = ["VisionTransformer", "ViTOutput", "vision_transformer", "resize_position_embeddings", "vit_b_16",
           "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14"]

_POOLS = ("cls", "gap", "map", "none")


class ViTOutput(NamedTuple):
    """What :class:`VisionTransformer` returns.

    ``last_hidden_state (B, [1 +] N_kept, D)`` after the final norm (``(B, 1, D)`` with
    ``pooled_only``); ``pooled (B, D)`` (``None`` for ``pool="none"``); ``hidden_states``: the
    block inputs and outputs when asked; ``mask (B, N)`` (1 = removed) and ``ids_restore (B, N)``
    when MAE masking ran (a key and ``mask_ratio``), else ``None``."""

    last_hidden_state: Tensor
    pooled: Tensor | None
    hidden_states: tuple[Tensor, ...] | None = None
    mask: Tensor | None = None
    ids_restore: Tensor | None = None


def resize_position_embeddings(pos: Tensor, new_grid: tuple[int, int], num_prefix_tokens: int = 1,
                               old_grid: tuple[int, int] | None = None, mode: str = "bicubic",
                               antialias: bool = True) -> Tensor:
    """A learned position table for another patch grid: the grid rows resampled by
    ``F.interpolate`` (bicubic, antialiased, ``align_corners=False``), the prefix (class token)
    rows kept, as open_clip's ``resize_pos_embed`` and timm's ``resample_abs_pos_embed`` do.

    Args:
        pos: ``(1, P + h * w, D)`` or ``(P + h * w, D)``.
        new_grid: ``(h', w')``. old_grid: ``(h, w)`` (default: square).
    Returns:
        the table for ``(h', w')`` in ``pos``'s layout and dtype.
    """
    squeeze = pos.dim() == 2
    table = pos if squeeze else pos.reshape(pos.shape[-2:])
    n, d = table.shape[0] - num_prefix_tokens, table.shape[-1]
    if old_grid is None:
        side = round(n**0.5)
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n:
        raise ValueError(f"resize_position_embeddings: pos: expected {num_prefix_tokens} + {old_grid[0]} * "
                         f"{old_grid[1]} rows, got {table.shape[0]}")
    prefix, grid = table[:num_prefix_tokens], table[num_prefix_tokens:]
    grid = grid.reshape(1, *old_grid, d).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode=mode, antialias=antialias, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(-1, d).to(table.dtype)
    out = torch.cat([prefix, grid], dim=0)
    return out if squeeze else out[None]


@dataclass(frozen=True)
class VisionTransformer(Spec):
    """``images (B, C, H, W) -> ViTOutput`` (``B`` optional, so it maps under ``vmap``).

    ``__call__(params, images, patch_mask=None, *, key=None, return_hidden_states=False,
    pooled_only=False)``: ``patch_mask (B, N)`` bool replaces those patches by the mask token
    (``embeddings.use_image_masking``); ``key`` enables MAE masking (``embeddings.patch_drop_rate``)
    and dropout / drop-path; ``pooled_only`` (``pool="cls"``) computes only the class token in the
    last block (the pooled output is the same, at a fraction of the last block's cost).
    """

    embeddings: PatchEmbedding  # patchify + positions (+ class token, mask token, random masking)
    transformer: TransformerEncoder  # the blocks; final_norm for pre-norm ViTs
    pool: str = "cls"  # "cls" (class token), "gap" (mean of the patch tokens), "map" (attention pooler), "none"
    pooler: AttentionPooler | None = None  # pool="map": one learned query attends over the tokens

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.pool not in _POOLS:
            raise ValueError(f"{name}: pool: expected one of {_POOLS}, got {self.pool!r}")
        if self.embeddings.num_frames is not None:
            raise ValueError(f"{name}: embeddings: expected an image patch embedding, got num_frames="
                             f"{self.embeddings.num_frames}")
        d, w = self.embeddings.hidden_size, self.transformer.layer.d_model
        if d != w:
            raise ValueError(f"{name}: embeddings.hidden_size ({d}) must equal transformer width ({w})")
        if self.pool == "cls" and not self.embeddings.include_cls_token:
            raise ValueError(f"{name}: pool='cls' needs embeddings.include_cls_token=True")
        if (self.pool == "map") != (self.pooler is not None):
            raise ValueError(f"{name}: pooler: expected an AttentionPooler exactly when pool='map', "
                             f"got pool={self.pool!r} and pooler={self.pooler!r}")
        if self.pooler is not None and (self.pooler.input_dim, self.pooler.num_queries) != (d, 1):
            raise ValueError(f"{name}: pooler: expected input_dim {d} and 1 query, got {self.pooler.input_dim} "
                             f"and {self.pooler.num_queries}")

    @property
    def width(self) -> int:
        return self.embeddings.hidden_size

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches (the class token)."""
        return int(self.embeddings.include_cls_token)

    def init(self, *, key: Tensor) -> Params:
        ke, kt, kp = pr.split(key, 3)
        p = {"embeddings": self.embeddings.init(key=ke), "transformer": self.transformer.init(key=kt)}
        if self.pooler is not None:
            p["pooler"] = self.pooler.init(key=kp)
        return p

    def pool_tokens(self, params: Params, x: Tensor) -> Tensor | None:
        """``(B, T, D)`` final states -> ``(B, D)`` by the spec's pooling (``None`` for ``"none"``)."""
        if self.pool == "cls":
            return cls_pool(x)
        if self.pool == "gap":
            return mean_pool(x[..., self.num_prefix_tokens:, :])
        if self.pool == "map":
            return self.pooler(params["pooler"], x)[..., 0, :]
        return None

    def __call__(self, params: Params, images: Tensor, patch_mask: Tensor | None = None, *,
                 key: Tensor | None = None, return_hidden_states: bool = False,
                 pooled_only: bool = False) -> ViTOutput:
        if pooled_only and (self.pool != "cls" or return_hidden_states):
            raise ValueError(f"{type(self).__name__}: pooled_only needs pool='cls' and no return_hidden_states, "
                             f"got pool={self.pool!r}, return_hidden_states={return_hidden_states}")
        k_emb, k_tr = pr.maybe_split(key, 2)
        emb = self.embeddings(params["embeddings"], images, patch_mask, key=k_emb)
        out = self.transformer(params["transformer"], emb.embeddings, key=k_tr,
                               return_hidden_states=return_hidden_states, select=0 if pooled_only else None)
        x = out.last_hidden_state
        return ViTOutput(x, self.pool_tokens(params, x), out.hidden_states, emb.random_mask, emb.ids_restore)

    def resized(self, params: Params, image_size: int | tuple[int, int]) -> tuple[VisionTransformer, Params]:
        """The same encoder for another input size: ``(spec, params)`` with the learned position
        table resampled (:func:`resize_position_embeddings`) or the sin-cos table recomputed."""
        emb = dataclasses.replace(self.embeddings, image_size=image_size)
        spec = dataclasses.replace(self, embeddings=emb)
        e = dict(params["embeddings"])
        if emb.position == "learned":
            e["position_embeddings"] = resize_position_embeddings(
                e["position_embeddings"], emb.grid, self.num_prefix_tokens, old_grid=self.embeddings.grid)
        elif emb.position == "sincos":
            table = sincos_2d(*emb.grid, self.width, cls_token=emb.include_cls_token)[None]
            e["position_embeddings"] = table.to(e["position_embeddings"])
        return spec, {**params, "embeddings": e}


def vision_transformer(*, image_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 16,
                       width: int = 768, layers: int = 12, heads: int = 12, mlp_dim: int | None = None,
                       num_channels: int = 3, activation: str = "gelu", norm_first: bool = True,
                       final_norm: bool | None = None, layer_norm_eps: float = 1e-6, conv_bias: bool = True,
                       cls_token: bool = True, position: str | None = "learned", pool: str = "cls",
                       mask_token: bool = False, mask_ratio: float | None = None, dropout: float = 0.0,
                       attn_dropout: float = 0.0, embed_dropout: float = 0.0, drop_path: float = 0.0,
                       pool_heads: int | None = None) -> VisionTransformer:
    """A :class:`VisionTransformer` from the usual hyperparameters (TorchMultimodal's
    ``vision_transformer``; torchvision's defaults: pre-norm, GELU, LayerNorm eps 1e-6, MLP 4 x width).

    ``final_norm`` defaults to ``norm_first`` (a pre-norm stack ends in a LayerNorm; a post-norm
    one is normalised already); ``mask_ratio`` is MAE's (patches dropped when a key is given);
    ``mask_token`` learns the BEiT / FLAVA token that ``patch_mask`` swaps in.
    """
    embeddings = PatchEmbedding(image_size=image_size, patch_size=patch_size, num_channels=num_channels,
                                hidden_size=width, conv_bias=conv_bias, include_cls_token=cls_token, position=position,
                                hidden_dropout=embed_dropout, use_image_masking=mask_token, patch_drop_rate=mask_ratio)
    layer = TransformerEncoderLayer(width, heads, dim_feedforward=mlp_dim or 4 * width, dropout=dropout,
                                    attn_dropout=attn_dropout, activation=activation, norm_first=norm_first,
                                    layer_norm_eps=layer_norm_eps)
    stack = TransformerEncoder(layer, layers, final_norm=norm_first if final_norm is None else final_norm,
                               drop_path_max=drop_path)
    pooler = AttentionPooler(width, width, pool_heads or heads, num_queries=1, layer_norm_eps=layer_norm_eps) \
        if pool == "map" else None
    return VisionTransformer(embeddings, stack, pool, pooler)


# Dosovitskiy et al. 2021 (arXiv:2010.11929), Table 1: layers, hidden size D, MLP size, heads.

def vit_b_16(**kwargs) -> VisionTransformer:
    """ViT-Base/16: 12 layers, D 768, MLP 3072, 12 heads (Table 1)."""
    return vision_transformer(**{"patch_size": 16, "width": 768, "layers": 12, "heads": 12, "mlp_dim": 3072, **kwargs})


def vit_b_32(**kwargs) -> VisionTransformer:
    """ViT-Base/32: 12 layers, D 768, MLP 3072, 12 heads (Table 1)."""
    return vision_transformer(**{"patch_size": 32, "width": 768, "layers": 12, "heads": 12, "mlp_dim": 3072, **kwargs})


def vit_l_16(**kwargs) -> VisionTransformer:
    """ViT-Large/16: 24 layers, D 1024, MLP 4096, 16 heads (Table 1)."""
    return vision_transformer(**{"patch_size": 16, "width": 1024, "layers": 24, "heads": 16, "mlp_dim": 4096, **kwargs})


def vit_l_32(**kwargs) -> VisionTransformer:
    """ViT-Large/32: 24 layers, D 1024, MLP 4096, 16 heads (Table 1)."""
    return vision_transformer(**{"patch_size": 32, "width": 1024, "layers": 24, "heads": 16, "mlp_dim": 4096, **kwargs})


def vit_h_14(**kwargs) -> VisionTransformer:
    """ViT-Huge/14: 32 layers, D 1280, MLP 5120, 16 heads (Table 1)."""
    return vision_transformer(**{"patch_size": 14, "width": 1280, "layers": 32, "heads": 16, "mlp_dim": 5120, **kwargs})
