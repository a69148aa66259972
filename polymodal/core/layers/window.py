"""Shifted-window 3-D self-attention (Video Swin), as ``torchvision.models.video.swin_transformer``.

Tokens ``(*, T, H, W, C)`` are padded to whole windows, cyclically shifted (every other block),
cut into non-overlapping ``Wd x Wh x Ww`` windows, attended within each window with a learned
relative position bias (and, when shifted, a mask keeping tokens that were not neighbours
apart), then put back. The static rules follow torchvision exactly:

* an axis no longer than its window takes the whole axis as the window and is not shifted;
* the bias of a shrunk window is ``table[index[:n, :n]]`` of the *configured* window's index
  (as torchvision and the original Video-Swin code do; it is what checkpoints were trained with);
* zero padding is added after the norm and is not masked out of unshifted windows.

Params (torchvision's names): ``qkv {weight (3C, C), bias}``, ``proj {weight (C, C), bias}``,
``relative_position_bias_table ((2Wd-1)(2Wh-1)(2Ww-1), heads)``. torchvision's
``relative_position_index`` buffer is a function of the window size, so it is recomputed here.

>>> import torch
>>> from polymodal.core import random as pr
>>> attn = ShiftedWindowAttention3d(dim=8, num_heads=2, window_size=(2, 3, 3), shift_size=(1, 1, 1))
>>> attn(attn.init(key=pr.key(0)), torch.ones(2, 3, 5, 5, 8)).shape
torch.Size([2, 3, 5, 5, 8])
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import random as pr
from ..pytree import Params
from ..spec import Spec, check_floating
from . import attention_kernel  # noqa: F401  (registers the fused kernels' vmap batching rules)
from .dropout import dropout as _dropout
from .init import trunc_normal
from .linear import Linear

__all__ = [
    "check_tokens",
    "window_and_shift",
    "pad_to_windows",
    "window_partition",
    "window_reverse",
    "relative_position_index",
    "relative_position_bias",
    "shifted_window_mask",
    "ShiftedWindowAttention3d",
]

Size3 = tuple[int, int, int]


def triple(v: int | Sequence[int], what: str, owner: str) -> Size3:
    t = (int(v),) * 3 if isinstance(v, int) else tuple([int(i) for i in v])
    if len(t) != 3:
        raise ValueError(f"{owner}: {what} must be an int or 3 ints (T, H, W), got {v!r}")
    return t  # type: ignore[return-value]


def check_tokens(x: Tensor, dim: int, spec: Spec) -> Tensor:
    """``x`` must be floating ``(*, T, H, W, dim)``; the error names expected vs got."""
    check_floating(x, "x", spec)
    if x.dim() < 4 or x.shape[-1] != dim:
        raise ValueError(f"{type(spec).__name__}: x: expected shape (*, T, H, W, {dim}), got {tuple(x.shape)}")
    return x


def window_and_shift(size: Sequence[int], window_size: Sequence[int], shift_size: Sequence[int]) -> tuple[Size3, Size3]:
    """The window and shift actually used for an input of ``size = (T, H, W)``.

    An axis no longer than its window uses the whole axis and no shift (torchvision's
    ``_get_window_and_shift_size``).

    >>> window_and_shift((2, 16, 5), (8, 7, 7), (4, 3, 3))
    ((2, 7, 5), (0, 3, 0))
    """
    window = tuple([s if s <= w else w for s, w in zip(size, window_size)])
    shift = tuple([0 if s <= w else sh for s, w, sh in zip(size, window_size, shift_size)])
    return window, shift  # type: ignore[return-value]


def pad_to_windows(x: Tensor, window: Sequence[int]) -> Tensor:
    """Zero-pad ``(*, T, H, W, C)`` at the end of T, H, W up to multiples of ``window``."""
    t, h, w = x.shape[-4:-1]
    pt, ph, pw = [(wi - s % wi) % wi for s, wi in zip((t, h, w), window)]
    if pt or ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph, 0, pt))
    return x


def window_partition(x: Tensor, window: Sequence[int]) -> Tensor:
    """Cut ``(*, T, H, W, C)`` into windows: ``(*, nW, Wd*Wh*Ww, C)``, windows in (t, h, w) order.

    T, H and W must be multiples of the window (see :func:`pad_to_windows`).

    >>> window_partition(torch.zeros(2, 4, 6, 6, 3), (2, 3, 3)).shape
    torch.Size([2, 8, 18, 3])
    """
    if x.dim() < 4:
        raise ValueError(f"window_partition: x: expected shape (*, T, H, W, C), got {tuple(x.shape)}")
    *lead, t, h, w, c = x.shape
    wd, wh, ww = window
    if t % wd or h % wh or w % ww:
        raise ValueError(f"window_partition: (T, H, W) = {(t, h, w)} is not a multiple of the window {tuple(window)}")
    n = len(lead)
    x = x.reshape(*lead, t // wd, wd, h // wh, wh, w // ww, ww, c)
    x = x.permute(*range(n), n, n + 2, n + 4, n + 1, n + 3, n + 5, n + 6)
    return x.reshape(*lead, (t // wd) * (h // wh) * (w // ww), wd * wh * ww, c)


def window_reverse(windows: Tensor, window: Sequence[int], size: Sequence[int]) -> Tensor:
    """Inverse of :func:`window_partition`: ``(*, nW, Wd*Wh*Ww, C)`` -> ``(*, T, H, W, C)``."""
    *lead, _, _, c = windows.shape
    t, h, w = size
    wd, wh, ww = window
    n = len(lead)
    x = windows.reshape(*lead, t // wd, h // wh, w // ww, wd, wh, ww, c)
    x = x.permute(*range(n), n, n + 3, n + 1, n + 4, n + 2, n + 5, n + 6)
    return x.reshape(*lead, t, h, w, c)


def relative_position_index(window: Sequence[int], device: torch.device | str | None = None) -> Tensor:
    """``(N, N)`` int64 rows into the bias table for each token pair of a window (N = Wd*Wh*Ww).

    Equals torchvision's ``relative_position_index`` buffer.
    """
    wd, wh, ww = window
    axes = [torch.arange(n, device=device) for n in window]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij")).flatten(1)  # (3, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (3, N, N)
    return (rel[0] + wd - 1) * (2 * wh - 1) * (2 * ww - 1) + (rel[1] + wh - 1) * (2 * ww - 1) + (rel[2] + ww - 1)


def relative_position_bias(table: Tensor, window_size: Sequence[int], window: Sequence[int]) -> Tensor:
    """``(heads, n, n)`` bias for the used ``window`` (n its volume) from a table of the configured ``window_size``."""
    n = math.prod(window)
    # every block of every call needs it: (3, N, N) integer arithmetic costs as much as a matmul
    index = _static(_flat_index, tuple(window_size), n, table.device)
    return table.index_select(0, index).reshape(n, n, -1).permute(2, 0, 1)  # index_select: half of [] indexing


def _flat_index(window_size: tuple[int, ...], n: int, device: torch.device) -> Tensor:
    return relative_position_index(window_size, device)[:n, :n].reshape(-1)


def _static(fn, *args) -> Tensor:
    """``fn(*args)``, a tensor that depends only on the (hashable) ``args``: computed once per ``args`` and then
    read (never written), except while ``torch.compile`` traces (traced once into the graph; no Python cache
    inside it)."""
    return fn(*args) if torch.compiler.is_compiling() else _cached(fn, *args)


@functools.lru_cache(maxsize=128)
def _cached(fn, *args) -> Tensor:
    # Made outside inference mode: a cached inference tensor could not be saved for backward when a later call trains.
    with torch.inference_mode(False):
        return fn(*args)


def shifted_window_mask(
    padded_size: Sequence[int], window: Sequence[int], shift: Sequence[int],
    dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
) -> Tensor:
    """``(nW, N, N)`` additive mask: ``-100`` between tokens of different pre-shift regions, else 0.

    Equals torchvision's ``_compute_attention_mask_3d``, built without in-place writes: along each
    shifted axis of padded length P, positions ``[0, P-w)``, ``[P-w, P-s)``, ``[P-s, P)`` are regions.
    """
    ids = []
    for p, w, s in zip(padded_size, window, shift):
        pos = torch.arange(p, device=device)
        ids.append((pos >= p - w).long() + (pos >= p - s).long() if s > 0 else torch.zeros_like(pos))
    region = ids[0][:, None, None] * 9 + ids[1][None, :, None] * 3 + ids[2][None, None, :]
    region = window_partition(region[..., None], window)[..., 0]  # (nW, N)
    differ = region[:, None, :] != region[:, :, None]
    return differ.to(dtype) * -100.0


@dataclass(frozen=True)
class ShiftedWindowAttention3d(Spec):
    """(Shifted) window self-attention with relative position bias: ``(*, T, H, W, dim)`` -> same.

    Any T, H, W: inputs are zero-padded to whole windows and cropped back. Equals
    torchvision's ``ShiftedWindowAttention3d``. Without attention dropout it runs on the fused
    kernel (``F.scaled_dot_product_attention``, vmap-batched on CPU by
    :mod:`polymodal.core.layers.attention_kernel`) with the bias
    and shift mask as its additive mask; with it, and on CPU when the bias takes a gradient (SDPA's
    CPU kernel would fall back to its guarded math path), on explicit softmax. ``key`` drives both dropouts.

    >>> import torch
    >>> from polymodal.core import random as pr
    >>> a = ShiftedWindowAttention3d(dim=6, num_heads=3, window_size=(2, 2, 2))
    >>> a(a.init(key=pr.key(0)), torch.ones(1, 3, 3, 3, 6)).shape
    torch.Size([1, 3, 3, 3, 6])
    """

    dim: int  # channels C of the tokens
    num_heads: int  # attention heads (dim must be divisible by it)
    window_size: Size3 = (8, 7, 7)  # (Wd, Wh, Ww) configured window
    shift_size: Size3 = (0, 0, 0)  # cyclic shift per axis; 0 <= shift < window (torchvision: window // 2 every other block)
    qkv_bias: bool = True  # bias in the fused q/k/v projection
    proj_bias: bool = True  # bias in the output projection
    attention_dropout: float = 0.0  # dropout on the attention probabilities
    dropout: float = 0.0  # dropout after the output projection
    weight_init: str = "trunc_normal"  # Linear init: SwinTransformer3d re-inits every Linear to trunc_normal(0.02), zero bias
    init_std: float = 0.02  # std of the Linears' and the bias table's truncated-normal init

    def __post_init__(self) -> None:
        name = type(self).__name__
        object.__setattr__(self, "window_size", triple(self.window_size, "window_size", name))
        object.__setattr__(self, "shift_size", triple(self.shift_size, "shift_size", name))
        if self.dim % self.num_heads:
            raise ValueError(f"{name}: dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if min(self.window_size) < 1 or any(not 0 <= s < w for s, w in zip(self.shift_size, self.window_size)):
            raise ValueError(
                f"{name}: expected window_size >= 1 and 0 <= shift_size < window_size per axis, "
                f"got window_size={self.window_size}, shift_size={self.shift_size}"
            )

    @property
    def table_size(self) -> int:
        """Rows of the relative position bias table: ``(2Wd-1)(2Wh-1)(2Ww-1)``."""
        return math.prod([2 * w - 1 for w in self.window_size])

    def qkv(self) -> Linear:
        return Linear(self.dim, 3 * self.dim, self.qkv_bias, self.weight_init, self.init_std)

    def proj(self) -> Linear:
        return Linear(self.dim, self.dim, self.proj_bias, self.weight_init, self.init_std)

    def init(self, *, key: Tensor) -> Params:
        kq, kp, kt = pr.split(key, 3)
        return {
            "qkv": self.qkv().init(key=kq),
            "proj": self.proj().init(key=kp),
            "relative_position_bias_table": trunc_normal(kt, (self.table_size, self.num_heads), std=self.init_std),
        }

    def __call__(self, params: Params, x: Tensor, *, key: Tensor | None = None) -> Tensor:
        """``x (*, T, H, W, dim)`` -> ``(*, T, H, W, dim)``; ``key=None``: no dropout."""
        check_tokens(x, self.dim, self)
        table = params["relative_position_bias_table"]
        if tuple(table.shape) != (self.table_size, self.num_heads):
            raise ValueError(
                f"{type(self).__name__}: relative_position_bias_table: expected shape "
                f"{(self.table_size, self.num_heads)}, got {tuple(table.shape)}"
            )
        *lead, t, h, w, c = x.shape
        window, shift = window_and_shift((t, h, w), self.window_size, self.shift_size)
        x = pad_to_windows(x, window)
        padded = tuple(x.shape[-4:-1])
        shifted = sum(shift) > 0
        if shifted:
            x = torch.roll(x, shifts=(-shift[0], -shift[1], -shift[2]), dims=(-4, -3, -2))
        windows = window_partition(x, window)  # (*, nW, N, C)
        nw, n = windows.shape[-3], windows.shape[-2]
        head_dim = c // self.num_heads
        qkv = self.qkv()(params["qkv"], windows).reshape(*lead, nw, n, 3, self.num_heads, head_dim)
        q, k, v = qkv.movedim(-3, 0).transpose(-3, -2).unbind(0)  # each (*, nW, heads, N, head_dim)
        bias = relative_position_bias(table, self.window_size, window).to(q.dtype)  # (heads, N, N)
        if shifted:
            mask = _static(shifted_window_mask, padded, window, tuple(shift), q.dtype, q.device)  # (nW, N, N)
            bias = bias + mask[:, None]  # (nW, heads, N, N)
        k_attn, k_out = pr.maybe_split(key, 2)
        drop = k_attn is not None and self.attention_dropout > 0
        # On CPU, SDPA's fused kernel gives no gradient to a mask, so with a learnt bias it takes its math path,
        # whose guard against fully masked rows (an `all`, an `isneginf` and a `where` per call: ~3 % of a
        # swin_t train step) window attention never needs. The formula itself, as torchvision writes it:
        if drop or (q.device.type == "cpu" and torch.is_grad_enabled() and bias.requires_grad):
            scores = (q * head_dim**-0.5) @ k.transpose(-2, -1) + bias
            out = _dropout(scores.softmax(-1), self.attention_dropout, key=k_attn if drop else None) @ v
        else:
            # Every (window, head) is its own attention. Unshifted, the (heads, N, N) bias broadcasts
            # over batch x windows; shifted, the (windows, heads) bias broadcasts over the batch.
            fold = (-1, nw * self.num_heads, n, head_dim) if shifted else (-1, self.num_heads, n, head_dim)
            bias = bias.reshape(1, -1, n, n)
            # No row is ever fully masked (a token always sees itself: bias finite, mask 0 on the
            # diagonal), so the kernel is called directly, without sdpa's fully-masked-row guard.
            out = F.scaled_dot_product_attention(q.reshape(fold), k.reshape(fold), v.reshape(fold),
                                                 attn_mask=bias).reshape(q.shape)
        out = out.transpose(-3, -2).reshape(*lead, nw, n, c)
        out = _dropout(self.proj()(params["proj"], out), self.dropout, key=k_out)
        x = window_reverse(out, window, padded)
        if shifted:
            x = torch.roll(x, shifts=shift, dims=(-4, -3, -2))
        return x[..., :t, :h, :w, :]
