"""Patch embedding for images and videos (ViT / MAE / FLAVA), and keyed random patch masking
(MAE's per-example shuffle, Audio-MAE's 2-d masking).

Masking draws its noise from a key only: the same key gives the same mask, and under ``vmap``
each mapped key masks its own example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .. import random as pr
from ..pytree import Params
from ..spec import Spec, check_floating, check_tensor
from .conv import Conv
from .dropout import check_rate, dropout
from .position import sincos_2d, sincos_3d

__all__ = ["PatchEmbedding", "PatchEmbeddingOutput", "RandomMaskingOutput", "random_masking", "random_masking_2d"]


class RandomMaskingOutput(NamedTuple):
    """``x_masked (*, len_keep, D)``; ``mask (*, L)`` 1 = removed, 0 = kept, in original order;
    ``ids_restore (*, L)`` undoes the shuffle; ``ids_keep (*, len_keep)`` the kept positions."""

    x_masked: Tensor
    mask: Tensor
    ids_restore: Tensor
    ids_keep: Tensor


class PatchEmbeddingOutput(NamedTuple):
    """``embeddings (*, [1 +] N_kept, D)``; ``random_mask``/``ids_restore (*, N)`` when 1-d patch
    dropping ran, else ``None`` (TorchMultimodal's ``PatchEmbeddingsOutput``)."""

    embeddings: Tensor
    random_mask: Tensor | None = None
    ids_restore: Tensor | None = None


def _len_keep(n: int, ratio: float, what: str) -> int:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"{what}: mask ratio must be in [0, 1), got {ratio}")
    keep = int(n * (1 - ratio))
    if keep < 1:
        raise ValueError(f"{what}: mask ratio {ratio} keeps no patch out of {n}; at least one must stay")
    return keep


def _shuffle(key: Tensor, shape: tuple[int, ...]) -> Tensor:
    # 32-bit noise and a stable sort: ties are (almost) impossible and never device-dependent.
    return torch.argsort(pr.bits(key, shape), dim=-1, stable=True)


def _take(x: Tensor, ids: Tensor, axis: int) -> Tensor:
    """``x`` gathered along ``axis`` (negative) at ``ids``, broadcast over the trailing axes."""
    trailing = x.shape[axis + 1 :] if axis != -1 else ()
    idx = ids.reshape(ids.shape + (1,) * len(trailing)).expand(ids.shape + tuple(trailing))
    return torch.gather(x, axis, idx)


def random_masking(x: Tensor, mask_ratio: float, *, key: Tensor) -> RandomMaskingOutput:
    """Keep a random ``len_keep = int(L * (1 - mask_ratio))`` tokens per example (MAE).

    Each example's tokens are shuffled by argsort of noise drawn from ``key``; the first
    ``len_keep`` are kept (in shuffled order). ``x (*, L, D)``; all leading axes are examples.

    >>> from polymodal.core import random as pr
    >>> out = random_masking(torch.randn(2, 8, 4), 0.75, key=pr.key(0))
    >>> out.x_masked.shape, out.mask.sum(-1).tolist()
    (torch.Size([2, 2, 4]), [6.0, 6.0])
    """
    check_floating(x, "x")
    if x.dim() < 2:
        raise ValueError(f"random_masking: x: expected shape (*, L, D), got {tuple(x.shape)}")
    keep = _len_keep(x.shape[-2], mask_ratio, "random_masking")
    ids_shuffle = _shuffle(key, tuple(x.shape[:-1]))
    ids_restore = torch.argsort(ids_shuffle, dim=-1)
    ids_keep = ids_shuffle[..., :keep]
    mask = (ids_restore >= keep).to(x.dtype)
    return RandomMaskingOutput(_take(x, ids_keep, -2), mask, ids_restore, ids_keep)


def random_masking_2d(
    x: Tensor, mask_ratio_t: float, mask_ratio_f: float, num_t: int, num_f: int, *, key: Tensor
) -> Tensor:
    """Audio-MAE's 2-d masking: drop whole rows, then whole columns, of a ``num_t x num_f`` grid.

    ``x (*, num_t * num_f, D)`` (row-major grid) -> ``(*, len_t * len_f, D)`` with
    ``len_t = int(num_t * (1 - mask_ratio_t))`` rows and ``len_f`` columns kept per example,
    in shuffled order (TorchMultimodal's ``random_masking_2d``).

    >>> from polymodal.core import random as pr
    >>> random_masking_2d(torch.randn(2, 12, 4), 0.5, 0.25, 3, 4, key=pr.key(0)).shape
    torch.Size([2, 3, 4])
    """
    check_floating(x, "x")
    if x.dim() < 2 or x.shape[-2] != num_t * num_f:
        raise ValueError(f"random_masking_2d: x: expected shape (*, {num_t * num_f}, D), got {tuple(x.shape)}")
    keep_t = _len_keep(num_t, mask_ratio_t, "random_masking_2d (t)")
    keep_f = _len_keep(num_f, mask_ratio_f, "random_masking_2d (f)")
    lead, d = tuple(x.shape[:-2]), x.shape[-1]
    kt, kf = pr.split(key)
    grid = x.reshape(lead + (num_t, num_f, d))
    grid = _take(grid, _shuffle(kt, lead + (num_t,))[..., :keep_t], -3)  # rows: (*, keep_t, num_f, D)
    cols = _shuffle(kf, lead + (num_f,))[..., None, :keep_f, None]  # one column choice for all kept rows
    grid = torch.gather(grid, -2, cols.expand(lead + (keep_t, keep_f, d)))
    return grid.reshape(lead + (keep_t * keep_f, d))


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass(frozen=True)
class PatchEmbedding(Spec):
    """Patchify with a strided conv, add position embeddings, optionally mask/drop patches,
    prepend a CLS token, dropout (TorchMultimodal's ``PatchEmbeddings``; video with ``num_frames``).

    Params (TorchMultimodal's names): ``cls_token (1, 1, D)``, ``conv_projection.weight/bias``,
    ``position_embeddings (1, [1 +] N, D)`` (a fixed sin-cos table that gets no gradient when
    ``position="sincos"``), ``mask_token (1, 1, D)``.

    ``__call__(params, x, image_patches_mask=None, *, key=None)``: ``x (B, C, H, W)`` or, for
    video, ``(B, C, T, H, W)`` (``B`` optional); ``image_patches_mask (B, N)`` bool replaces
    those patches by the mask token. With a ``key``, patches are dropped (``patch_drop_rate``:
    a float = MAE random masking, a pair = 2-d masking of the ``(h, w)`` grid) and dropout runs;
    ``key=None`` is deterministic inference.

    >>> import torch
    >>> from polymodal.core import random as pr
    >>> pe = PatchEmbedding(image_size=32, patch_size=8, hidden_size=16, patch_drop_rate=0.75)
    >>> p = pe.init(key=pr.key(0))
    >>> pe(p, torch.randn(2, 3, 32, 32)).embeddings.shape
    torch.Size([2, 17, 16])
    >>> pe(p, torch.randn(2, 3, 32, 32), key=pr.key(1)).embeddings.shape
    torch.Size([2, 5, 16])
    """

    image_size: int | tuple[int, int] = 224  # H and W of the input (int = square)
    patch_size: int | tuple[int, int] = 16  # patch height and width (int = square)
    num_channels: int = 3  # C of the input
    hidden_size: int = 768  # D, the embedding size
    num_frames: int | None = None  # T of video inputs (B, C, T, H, W); None for images
    tubelet_size: int = 1  # frames per video patch
    conv_bias: bool = True  # bias in the patch projection
    include_cls_token: bool = True  # prepend a learned CLS token
    position: str | None = "learned"  # "learned", "sincos" (fixed, MAE) or None
    hidden_dropout: float = 0.0  # dropout on the output (needs a key)
    use_image_masking: bool = False  # learn a mask token for image_patches_mask (BEiT / FLAVA)
    patch_drop_rate: float | tuple[float, float] | None = None  # MAE ratio, (h, w) ratios for 2-d, or None
    init_std: float = 0.02  # std of the learned position init (truncated at 2 std)
    conv_stem: tuple[int, ...] = ()  # widths of 3x3 stride-2 conv + ReLU layers before the projection (images)

    def __post_init__(self) -> None:
        name = type(self).__name__
        object.__setattr__(self, "image_size", _pair(self.image_size))
        object.__setattr__(self, "patch_size", _pair(self.patch_size))
        if isinstance(self.patch_drop_rate, (list, tuple)):
            object.__setattr__(self, "patch_drop_rate", tuple(float(r) for r in self.patch_drop_rate))
            if len(self.patch_drop_rate) != 2 or self.num_frames is not None:
                raise ValueError(f"{name}: a tuple patch_drop_rate must be (h, w) ratios, for images only")
        if any(s % p for s, p in zip(self.image_size, self.patch_size)):
            raise ValueError(f"{name}: image_size {self.image_size} must be divisible by patch_size {self.patch_size}")
        if self.num_frames is not None and self.num_frames % self.tubelet_size:
            raise ValueError(f"{name}: num_frames ({self.num_frames}) must be divisible by tubelet_size ({self.tubelet_size})")
        if self.position not in ("learned", "sincos", None):
            raise ValueError(f"{name}: position must be 'learned', 'sincos' or None, got {self.position!r}")
        check_rate(self.hidden_dropout, name)
        object.__setattr__(self, "conv_stem", tuple(int(w) for w in self.conv_stem))
        if self.conv_stem:
            k = 2 ** len(self.conv_stem)
            if self.num_frames is not None or any(p % k for p in self.patch_size) or min(self.conv_stem) < 1:
                raise ValueError(f"{name}: conv_stem {self.conv_stem}: expected positive widths, images only, and "
                                 f"patch_size {self.patch_size} divisible by 2 ** {len(self.conv_stem)} = {k}")

    @property
    def grid(self) -> tuple[int, ...]:
        """Patches per axis: ``(h, w)``, or ``(t, h, w)`` for video."""
        hw = tuple(s // p for s, p in zip(self.image_size, self.patch_size))
        return hw if self.num_frames is None else (self.num_frames // self.tubelet_size,) + hw

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid)

    def stem(self) -> list[Conv]:
        """The conv stem's layers (Xiao et al. 2021, "Early convolutions help transformers see better"):
        3x3, stride 2, padding 1, each followed by a ReLU; empty without ``conv_stem``."""
        widths = (self.num_channels,) + self.conv_stem
        return [Conv(2, i, o, 3, 2, padding=1) for i, o in zip(widths, widths[1:])]

    def conv(self) -> Conv:
        if self.num_frames is None:
            k = tuple(p >> len(self.conv_stem) for p in self.patch_size)
            c = self.conv_stem[-1] if self.conv_stem else self.num_channels
            return Conv(2, c, self.hidden_size, k, k, bias=self.conv_bias)
        k = (self.tubelet_size,) + self.patch_size
        return Conv(3, self.num_channels, self.hidden_size, k, k, bias=self.conv_bias)

    def _sincos(self) -> Tensor:
        fn = sincos_2d if self.num_frames is None else sincos_3d
        return fn(*self.grid, self.hidden_size, cls_token=self.include_cls_token)[None]

    def init(self, *, key: Tensor) -> Params:
        kc, kp = pr.split(key)
        conv = self.conv()
        d, fan_in = self.hidden_size, conv.in_channels * math.prod(conv.kernel_size)
        std = math.sqrt(1.0 / fan_in)  # torch's trunc_normal_(std) cuts at +-2 absolute, not 2 std
        p: Params = {"cls_token": torch.zeros(1, 1, d)} if self.include_cls_token else {}
        p["conv_projection"] = {"weight": pr.truncated_normal(kc, (d, conv.in_channels) + conv.kernel_size, -2 / std, 2 / std) * std}
        if self.conv_bias:
            p["conv_projection"]["bias"] = torch.zeros(d)
        rows = self.num_patches + int(self.include_cls_token)
        if self.position == "learned":
            p["position_embeddings"] = pr.truncated_normal(kp, (1, rows, d)) * self.init_std
        elif self.position == "sincos":
            p["position_embeddings"] = self._sincos()
        if self.use_image_masking:
            p["mask_token"] = torch.zeros(1, 1, d)
        if self.conv_stem:  # He init (N(0, 2 / fan_in), zero bias): the ReLU stack keeps the image's scale
            p["conv_stem"] = [{"weight": pr.normal(k, (c.out_channels, c.in_channels, 3, 3)) * math.sqrt(2 / (9 * c.in_channels)),
                               "bias": torch.zeros(c.out_channels)}
                              for c, k in zip(self.stem(), pr.split(pr.fold_in(key, 1), len(self.conv_stem)))]
        return p

    def _check(self, x: Tensor) -> None:
        check_floating(x, "x", self)
        spatial = self.image_size if self.num_frames is None else (self.num_frames,) + self.image_size
        want = (self.num_channels,) + spatial
        if x.dim() not in (len(want), len(want) + 1) or tuple(x.shape[-len(want) :]) != want:
            doc = ", ".join(str(s) for s in want)
            raise ValueError(f"{type(self).__name__}: x: expected shape (B, {doc}), got {tuple(x.shape)}")

    def __call__(
        self, params: Params, x: Tensor, image_patches_mask: Tensor | None = None, *, key: Tensor | None = None
    ) -> PatchEmbeddingOutput:
        self._check(x)
        d, n = self.hidden_size, self.num_patches
        if image_patches_mask is not None:
            if not self.use_image_masking:
                raise ValueError(f"{type(self).__name__}: image_patches_mask given but use_image_masking=False")
            check_tensor(image_patches_mask, "image_patches_mask", self)
            lead = tuple(x.shape[: x.dim() - 1 - len(self.grid)])
            if tuple(image_patches_mask.shape) != lead + (n,):
                raise ValueError(
                    f"{type(self).__name__}: image_patches_mask: expected shape {lead + (n,)}, got {tuple(image_patches_mask.shape)}"
                )
        if self.conv_stem:
            if image_patches_mask is not None:  # blank masked patches' pixels: the stem's 3x3 windows cross patches
                m = image_patches_mask.reshape(image_patches_mask.shape[:-1] + self.grid).to(x.dtype)
                m = m.repeat_interleave(self.patch_size[0], -2).repeat_interleave(self.patch_size[1], -1)
                x = x * (1 - m.unsqueeze(-3))
            for conv, p in zip(self.stem(), params["conv_stem"]):
                x = torch.relu(conv(p, x))
        emb = self.conv()(params["conv_projection"], x)  # (*, D, *grid)
        emb = emb.flatten(-len(self.grid)).transpose(-1, -2)  # (*, N, D)
        lead = tuple(emb.shape[:-2])
        if image_patches_mask is not None:
            w = image_patches_mask[..., None].to(emb.dtype)
            emb = emb * (1 - w) + params["mask_token"].reshape(d) * w
        pos = None
        if self.position is not None:
            pos = params["position_embeddings"].reshape(-1, d)
            pos = pos.detach() if self.position == "sincos" else pos
            emb = emb + (pos[1:] if self.include_cls_token else pos)
        k_mask, k_drop = pr.maybe_split(key, 2)
        random_mask = ids_restore = None
        if self.patch_drop_rate is not None and k_mask is not None:
            if isinstance(self.patch_drop_rate, tuple):
                emb = random_masking_2d(emb, *self.patch_drop_rate, *self.grid, key=k_mask)
            else:
                emb, random_mask, ids_restore, _ = random_masking(emb, self.patch_drop_rate, key=k_mask)
        if self.include_cls_token:
            cls = params["cls_token"].reshape(1, d)
            cls = cls + pos[:1] if pos is not None else cls
            emb = torch.cat([cls.expand(lead + (1, d)), emb], dim=-2)
        return PatchEmbeddingOutput(dropout(emb, self.hidden_dropout, key=k_drop), random_mask, ids_restore)
