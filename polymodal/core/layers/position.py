"""Position embeddings: a learned table, fixed sin-cos tables (1-d, MAE's 2-d, 3-d), diffusion
timestep embeddings, and TorchMultimodal's per-axis ``BroadcastedPositionEmbedding`` (VideoGPT).

The sin-cos tables are computed in float64 and cast (as MAE's numpy code does), so they are
exact constants under any dtype; they carry no parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import random as pr
from ..pytree import Params
from ..spec import Spec, check_dtype, check_floating

__all__ = [
    "LearnedPositionEmbedding", "BroadcastedPositionEmbedding", "sincos_1d", "sincos_2d", "sincos_3d",
    "timestep_embedding", "decode_idx",
]

_INT = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def sincos_1d(
    positions: int | Tensor, dim: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> Tensor:
    """``[sin(p * w_i), cos(p * w_i)]`` with ``w_i = 10000 ** (-i / (dim / 2))``, ``i < dim / 2``.

    Args:
        positions: a length ``N`` (positions ``0..N-1``) or a tensor of positions ``(*)``.
        dim: embedding size (even).
    Returns:
        ``(N, dim)`` or ``(*, dim)`` (MAE's ``get_1d_sincos_pos_embed_from_grid``).

    >>> sincos_1d(4, 6).shape
    torch.Size([4, 6])
    """
    if dim % 2:
        raise ValueError(f"sincos_1d: dim must be even, got {dim}")
    if isinstance(positions, int):
        pos = torch.arange(positions, dtype=torch.float64, device=device)
    else:
        pos = positions.to(torch.float64)
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2.0))
    out = pos[..., None] * omega
    return torch.cat([out.sin(), out.cos()], dim=-1).to(dtype)


def sincos_2d(
    grid_h: int, grid_w: int, dim: int, cls_token: bool = False, *, dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """MAE's fixed 2-d table (``get_2d_sincos_pos_embed``): ``(grid_h * grid_w [+ 1], dim)``.

    Row ``r * grid_w + c`` is ``[sincos_1d(c, dim / 2), sincos_1d(r, dim / 2)]`` (column first,
    as MAE's ``meshgrid(w, h)``); with ``cls_token`` a zero row comes first.

    >>> sincos_2d(2, 3, 8, cls_token=True).shape
    torch.Size([7, 8])
    """
    if dim % 4:
        raise ValueError(f"sincos_2d: dim must be divisible by 4, got {dim}")
    rows = torch.arange(grid_h, device=device).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, device=device).repeat(grid_h)
    emb = torch.cat([sincos_1d(cols, dim // 2, dtype=dtype), sincos_1d(rows, dim // 2, dtype=dtype)], dim=-1)
    if cls_token:
        emb = torch.cat([emb.new_zeros(1, dim), emb], dim=0)
    return emb


def sincos_3d(
    t: int, h: int, w: int, dim: int, cls_token: bool = False, *, dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """Video table ``(t * h * w [+ 1], dim)``: ``dim / 4`` temporal then ``3 dim / 4`` spatial (2-d)
    features per row, rows in ``(t, h, w)`` order (TorchMultimodal's ``get_3d_sin_cos_embeddings``).

    >>> sincos_3d(2, 2, 3, 16).shape
    torch.Size([12, 16])
    """
    if dim % 16:  # both the temporal (dim/4) and each spatial half (3 dim/8) need an even size
        raise ValueError(f"sincos_3d: dim must be divisible by 16, got {dim}")
    spatial = sincos_2d(h, w, dim // 4 * 3, dtype=dtype, device=device)  # (h*w, 3d/4)
    temporal = sincos_1d(t, dim // 4, dtype=dtype, device=device)  # (t, d/4)
    emb = torch.cat(
        [temporal[:, None].expand(t, h * w, dim // 4), spatial[None].expand(t, h * w, dim // 4 * 3)], dim=-1
    ).reshape(t * h * w, dim)
    if cls_token:
        emb = torch.cat([emb.new_zeros(1, dim), emb], dim=0)
    return emb


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Diffusion timestep embedding (DDPM; TorchMultimodal's ``SinusoidalPositionEmbeddings``).

    ``[sin(t * f_i), cos(t * f_i)]`` with ``f_i = exp(-i * ln(10000) / (dim / 2 - 1))``; an odd
    ``dim`` gets a zero last feature. ``t (*)`` (int or float) -> ``(*, dim)`` float32.

    >>> timestep_embedding(torch.tensor([0, 10, 999]), 128).shape
    torch.Size([3, 128])
    """
    if dim < 4:
        raise ValueError(f"timestep_embedding: dim must be at least 4, got {dim}")
    half = dim // 2
    # Same op order and precision as the reference (a float32 log, then divide).
    scale = torch.log(torch.tensor(10000.0, device=t.device)) / (half - 1)
    freqs = torch.exp(torch.arange(half, device=t.device) * -scale)
    args = t[..., None] * freqs
    emb = torch.cat([args.sin(), args.cos()], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


@dataclass(frozen=True)
class LearnedPositionEmbedding(Spec):
    """A learned table ``weight (num_positions, dim)`` added to a sequence.

    ``__call__(params, x, offset=0)``: ``x (*, N, dim) -> x + weight[offset:offset + N]``;
    :meth:`lookup` returns rows for integer ids ``(*) -> (*, dim)``. The key matches
    ``nn.Embedding`` (``position_embeddings.weight`` in BERT-style checkpoints).

    >>> import torch
    >>> from polymodal.core import random as pr
    >>> pe = LearnedPositionEmbedding(16, 8)
    >>> pe(pe.init(key=pr.key(0)), torch.zeros(2, 5, 8)).shape
    torch.Size([2, 5, 8])
    """

    num_positions: int  # rows of the table (the longest sequence)
    dim: int  # embedding size
    init_std: float = 0.02  # std of the truncated-normal init (cut at 2 std)

    def init(self, *, key: Tensor) -> Params:
        return {"weight": pr.truncated_normal(key, (self.num_positions, self.dim)) * self.init_std}

    def __call__(self, params: Params, x: Tensor, offset: int = 0) -> Tensor:
        check_floating(x, "x", self)
        n = x.shape[-2] if x.dim() >= 2 else -1
        if x.dim() < 2 or x.shape[-1] != self.dim or n + offset > self.num_positions:
            raise ValueError(
                f"{type(self).__name__}: x: expected shape (..., N, {self.dim}) with offset + N <= "
                f"{self.num_positions} (offset {offset}), got {tuple(x.shape)}"
            )
        return x + params["weight"][offset : offset + n].to(x.dtype)

    def lookup(self, params: Params, position_ids: Tensor) -> Tensor:
        """Rows for integer ``position_ids (*)`` -> ``(*, dim)``."""
        check_dtype(position_ids, "position_ids", _INT, self)
        return F.embedding(position_ids, params["weight"])


def decode_idx(flat: Tensor, shape: Sequence[int]) -> Tensor:
    """Flat row-major indices ``(*)`` -> coordinates ``(*, len(shape))`` in a grid of ``shape``
    (VideoGPT's ``decode_idx``); negative indices count from the end, as in Python indexing.

    >>> decode_idx(torch.tensor([0, 5, -1]), (2, 3)).tolist()
    [[0, 0], [1, 2], [1, 2]]
    """
    flat = torch.where(flat < 0, flat + math.prod(shape), flat)
    coords = []
    for s in reversed(tuple(shape)):
        coords.append(torch.remainder(flat, s))
        flat = torch.div(flat, s, rounding_mode="floor")
    return torch.stack(coords[::-1], dim=-1)


@dataclass(frozen=True)
class BroadcastedPositionEmbedding(Spec):
    """One table per latent axis, each broadcast over the other axes and concatenated
    (TorchMultimodal's ``BroadcastedPositionEmbedding``, VideoGPT).

    Params ``embedding.d_i (latent_shape[i], embedding_dim / n)`` for ``n = len(latent_shape)``,
    so TorchMultimodal checkpoints load as they are. ``__call__(params, position_ids)`` maps flat
    row-major positions ``(*)`` (``-1`` = last) to ``(*, embedding_dim)``; with ``position_ids=None``
    it returns the whole table ``(prod(latent_shape), embedding_dim)``.

    >>> import torch
    >>> from polymodal.core import random as pr
    >>> pe = BroadcastedPositionEmbedding((2, 3), 6)
    >>> pe(pe.init(key=pr.key(0)), torch.tensor([[0, 4]])).shape
    torch.Size([1, 2, 6])
    """

    latent_shape: tuple[int, ...]  # shape of the latent grid, e.g. (T, H, W)
    embedding_dim: int  # output size (a multiple of len(latent_shape))

    def __post_init__(self) -> None:
        object.__setattr__(self, "latent_shape", tuple(int(s) for s in self.latent_shape))
        if not self.latent_shape or self.embedding_dim % len(self.latent_shape):
            raise ValueError(
                f"{type(self).__name__}: embedding_dim ({self.embedding_dim}) must be a multiple of "
                f"len(latent_shape) ({len(self.latent_shape)})"
            )

    def init(self, *, key: Tensor) -> Params:
        n, keys = len(self.latent_shape), pr.split(key, len(self.latent_shape))
        d = self.embedding_dim // n
        return {"embedding": {f"d_{i}": pr.normal(keys[i], (s, d)) * 0.01 for i, s in enumerate(self.latent_shape)}}

    def table(self, params: Params) -> Tensor:
        """The broadcast table ``(*latent_shape, embedding_dim)``; axis ``i`` fills features
        ``[i * D / n, (i + 1) * D / n)``."""
        n, shape = len(self.latent_shape), self.latent_shape
        parts = []
        for i, s in enumerate(shape):
            emb = params["embedding"][f"d_{i}"]
            parts.append(emb.reshape((1,) * i + (s,) + (1,) * (n - i - 1) + (-1,)).expand(*shape, -1))
        return torch.cat(parts, dim=-1)

    def indices(self) -> Tensor:
        """Coordinates of every flat position, ``(prod(latent_shape), n)`` (TorchMultimodal's ``indices``)."""
        return torch.cartesian_prod(*[torch.arange(s) for s in self.latent_shape]).reshape(-1, len(self.latent_shape))

    def __call__(self, params: Params, position_ids: Tensor | None = None) -> Tensor:
        flat = self.table(params).reshape(-1, self.embedding_dim)
        if position_ids is None:
            return flat
        check_dtype(position_ids, "position_ids", _INT, self)
        # Plain indexing: negative ids count from the end (the reference allows -1); ids out of
        # range fail in torch's indexing (values are not inspected here).
        return flat[position_ids]
