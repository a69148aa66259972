"""Video Swin Transformer (Swin3D) encoder, as ``torchvision.models.video.SwinTransformer3d``.

``x (B, C, T, H, W)`` -> patch embedding (Conv3d, stride = kernel = patch, then LayerNorm) ->
stages of :class:`SwinTransformerBlock3d` (window attention, shifted every other block) with
:class:`PatchMerging` between stages (halves H and W, doubles C; T is kept) -> final LayerNorm ->
mean over (T', H', W') -> optional linear head. Each stage's blocks run through the block seam
(:func:`polymodal.core.layers.seam.run_layers`); stochastic depth grows linearly over all blocks.

Params: ``patch_embed {proj, norm}``, ``stages`` (a list per stage of block trees), ``merges``
(one :class:`PatchMerging` tree between consecutive stages), ``norm``, ``head`` (with
``num_classes``). Block trees carry torchvision's names (``norm1``, ``attn.qkv``, ``attn.proj``,
``attn.relative_position_bias_table``, ``norm2``, ``mlp.0``, ``mlp.3``), so torchvision's
``features.{2i}.{j}`` / ``features.{2i+1}`` keys map onto ``stages.{i}.{j}`` / ``merges.{i}``
(``polymodal.models.swin3d.convert``).

>>> import torch
>>> from polymodal.core import random as pr
>>> spec = Swin3D(embed_dim=8, depths=(1, 1), num_heads=(1, 2), window_size=(2, 2, 2), num_classes=5)
>>> out = spec(spec.init(key=pr.key(0)), torch.ones(1, 3, 4, 16, 16))
>>> out.features.shape, out.pooled.shape, out.logits.shape
(torch.Size([1, 2, 2, 2, 16]), torch.Size([1, 16]), torch.Size([1, 5]))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import random as pr
from ..pytree import Params
from ..spec import Spec, check_floating
from ..layers.activation import gelu
from ..layers.dropout import drop_path, dropout as _dropout
from ..layers.init import uniform_fan_in
from ..layers.linear import Linear
from ..layers.norm import LayerNorm
from ..layers.seam import run_layers
from ..layers.window import ShiftedWindowAttention3d, Size3, _triple, check_tokens

__all__ = ["PatchEmbed3d", "PatchMerging", "SwinTransformerBlock3d", "Swin3D", "Swin3DOutput",
           "swin3d_t", "swin3d_s", "swin3d_b"]


def _check_video(x: Tensor, channels: int, spec: Spec) -> Tensor:
    check_floating(x, "x", spec)
    if x.dim() not in (4, 5) or x.shape[-4] != channels:
        raise ValueError(
            f"{type(spec).__name__}: x: expected shape (B, {channels}, T, H, W) or ({channels}, T, H, W), got {tuple(x.shape)}"
        )
    return x


@dataclass(frozen=True)
class PatchEmbed3d(Spec):
    """Video to patch tokens: ``(*, C_in, T, H, W)`` -> ``(*, ceil(T/pt), ceil(H/ph), ceil(W/pw), embed_dim)``.

    Pads T, H, W at the end to multiples of the patch, then a Conv3d with stride = kernel = patch
    and an optional LayerNorm. Params ``proj {weight (E, C_in, pt, ph, pw), bias}``, ``norm``.

    >>> import torch
    >>> from polymodal.core import random as pr
    >>> pe = PatchEmbed3d((2, 4, 4), embed_dim=8)
    >>> pe(pe.init(key=pr.key(0)), torch.ones(1, 3, 3, 10, 8)).shape
    torch.Size([1, 2, 3, 2, 8])
    """

    patch_size: Size3 = (2, 4, 4)  # (pt, ph, pw): kernel and stride of the projection
    in_channels: int = 3  # C_in of the video
    embed_dim: int = 96  # E, channels of the tokens
    norm: bool = True  # LayerNorm over E after the projection (SwinTransformer3d always passes one)
    norm_eps: float = 1e-5  # LayerNorm epsilon

    def __post_init__(self) -> None:
        object.__setattr__(self, "patch_size", _triple(self.patch_size, "patch_size", type(self).__name__))

    def init(self, *, key: Tensor) -> Params:
        kw, kb = pr.split(key)
        fan_in = self.in_channels * self.patch_size[0] * self.patch_size[1] * self.patch_size[2]
        shape = (self.embed_dim, self.in_channels, *self.patch_size)
        p: Params = {"proj": {"weight": uniform_fan_in(kw, shape, fan_in=fan_in),
                              "bias": uniform_fan_in(kb, (self.embed_dim,), fan_in=fan_in)}}
        if self.norm:
            p["norm"] = LayerNorm(self.embed_dim, self.norm_eps).init(key=key)
        return p

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        _check_video(x, self.in_channels, self)
        pads = [(p - s % p) % p for s, p in zip(x.shape[-3:], self.patch_size)]
        if any(pads):
            x = F.pad(x, (0, pads[2], 0, pads[1], 0, pads[0]))
        x = F.conv3d(x, params["proj"]["weight"], params["proj"]["bias"], stride=self.patch_size)
        x = x.movedim(-4, -1)
        if self.norm:
            x = LayerNorm(self.embed_dim, self.norm_eps)(params["norm"], x)
        return x


@dataclass(frozen=True)
class PatchMerging(Spec):
    """Merge 2x2 neighbours in (H, W): ``(*, H, W, dim)`` -> ``(*, ceil(H/2), ceil(W/2), 2 dim)``.

    torchvision's ``PatchMerging`` (which ``SwinTransformer3d`` uses on ``(B, T, H, W, C)``, so T
    is kept): pad odd H/W, concatenate the four sub-grids, LayerNorm(4 dim), bias-free Linear to
    2 dim. Params ``reduction {weight (2 dim, 4 dim)}``, ``norm``.

    >>> import torch
    >>> from polymodal.core import random as pr
    >>> pm = PatchMerging(4)
    >>> pm(pm.init(key=pr.key(0)), torch.ones(2, 3, 5, 6, 4)).shape
    torch.Size([2, 3, 3, 3, 8])
    """

    dim: int  # channels of the input tokens
    norm_eps: float = 1e-5  # LayerNorm epsilon
    init_std: float = 0.02  # trunc-normal std of the reduction (SwinTransformer3d's Linear init)

    def reduction(self) -> Linear:
        return Linear(4 * self.dim, 2 * self.dim, bias=False, weight_init="trunc_normal", init_std=self.init_std)

    def init(self, *, key: Tensor) -> Params:
        return {"reduction": self.reduction().init(key=key), "norm": LayerNorm(4 * self.dim, self.norm_eps).init(key=key)}

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        check_floating(x, "x", self)
        if x.dim() < 3 or x.shape[-1] != self.dim:
            raise ValueError(f"PatchMerging: x: expected shape (*, H, W, {self.dim}), got {tuple(x.shape)}")
        h, w = x.shape[-3], x.shape[-2]
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[..., 0::2, 0::2, :], x[..., 1::2, 0::2, :], x[..., 0::2, 1::2, :], x[..., 1::2, 1::2, :]], -1)
        x = LayerNorm(4 * self.dim, self.norm_eps)(params["norm"], x)
        return self.reduction()(params["reduction"], x)


@dataclass(frozen=True)
class SwinTransformerBlock3d(Spec):
    """Pre-norm Swin block: ``x + dp(attn(norm1(x)))``, then ``x + dp(mlp(norm2(x)))``; ``(*, T, H, W, dim)``.

    torchvision's ``SwinTransformerBlock(attn_layer=ShiftedWindowAttention3d)``; ``mlp`` is
    ``Linear -> GELU -> Dropout -> Linear -> Dropout`` with params under ``mlp.0`` and ``mlp.3``
    (torchvision's Sequential indices). ``dp`` is stochastic depth, one draw per example
    (every leading axis before T). Linears init as SwinTransformer3d re-inits them
    (trunc_normal 0.02, zero bias), not as the standalone block (xavier).

    >>> import torch
    >>> from polymodal.core import random as pr
    >>> blk = SwinTransformerBlock3d(8, 2, window_size=(2, 2, 2), shift_size=(1, 1, 1))
    >>> blk(blk.init(key=pr.key(0)), torch.ones(1, 2, 4, 4, 8)).shape
    torch.Size([1, 2, 4, 4, 8])
    """

    dim: int  # channels of the tokens
    num_heads: int  # attention heads
    window_size: Size3 = (8, 7, 7)  # configured window (Wd, Wh, Ww)
    shift_size: Size3 = (0, 0, 0)  # cyclic shift (window // 2 on odd blocks of a stage)
    mlp_ratio: float = 4.0  # hidden width of the MLP = int(dim * mlp_ratio)
    dropout: float = 0.0  # dropout after the attention projection and in the MLP
    attention_dropout: float = 0.0  # dropout on attention probabilities
    stochastic_depth_prob: float = 0.0  # drop-path rate of both residual branches
    norm_eps: float = 1e-5  # LayerNorm epsilon
    init_std: float = 0.02  # trunc-normal std of every Linear and the bias table

    def __post_init__(self) -> None:
        object.__setattr__(self, "window_size", _triple(self.window_size, "window_size", type(self).__name__))
        object.__setattr__(self, "shift_size", _triple(self.shift_size, "shift_size", type(self).__name__))

    @property
    def hidden_dim(self) -> int:
        return int(self.dim * self.mlp_ratio)

    def attn(self) -> ShiftedWindowAttention3d:
        return ShiftedWindowAttention3d(
            self.dim, self.num_heads, self.window_size, self.shift_size,
            attention_dropout=self.attention_dropout, dropout=self.dropout, init_std=self.init_std,
        )

    def norm(self) -> LayerNorm:
        return LayerNorm(self.dim, self.norm_eps)

    def mlp(self) -> tuple[Linear, Linear]:
        return (Linear(self.dim, self.hidden_dim, weight_init="trunc_normal", init_std=self.init_std),
                Linear(self.hidden_dim, self.dim, weight_init="trunc_normal", init_std=self.init_std))

    def init(self, *, key: Tensor) -> Params:
        ka, k1, k2 = pr.split(key, 3)
        fc1, fc2 = self.mlp()
        return {
            "norm1": self.norm().init(key=key),
            "attn": self.attn().init(key=ka),
            "norm2": self.norm().init(key=key),
            "mlp": {"0": fc1.init(key=k1), "3": fc2.init(key=k2)},
        }

    def __call__(self, params: Params, x: Tensor, *, key: Tensor | None = None) -> Tensor:
        """``x (*, T, H, W, dim)`` -> same shape; ``key=None``: no dropout / drop path."""
        check_tokens(x, self.dim, self)
        k_attn, k_h, k_o, k_dp1, k_dp2 = pr.maybe_split(key, 5)
        batch_dims = x.dim() - 4
        y = self.attn()(params["attn"], self.norm()(params["norm1"], x), key=k_attn)
        x = x + drop_path(y, self.stochastic_depth_prob, key=k_dp1, batch_dims=batch_dims)
        fc1, fc2 = self.mlp()
        h = _dropout(gelu(fc1(params["mlp"]["0"], self.norm()(params["norm2"], x))), self.dropout, key=k_h)
        y = _dropout(fc2(params["mlp"]["3"], h), self.dropout, key=k_o)
        return x + drop_path(y, self.stochastic_depth_prob, key=k_dp2, batch_dims=batch_dims)


class Swin3DOutput(NamedTuple):
    """``features (B, T', H', W', C)`` after the final norm; ``pooled (B, C)`` their mean over
    (T', H', W') (TorchMultimodal's head-less output); ``logits (B, num_classes)`` or ``None``."""

    features: Tensor
    pooled: Tensor
    logits: Tensor | None = None


@dataclass(frozen=True)
class Swin3D(Spec):
    """Video Swin encoder: ``x (B, in_channels, T, H, W)`` (or unbatched) -> :class:`Swin3DOutput`.

    Defaults are ``swin3d_t`` without a head. With ``num_classes`` the logits equal torchvision's
    ``SwinTransformer3d.forward`` (norm, average pool, head). ``key`` drives dropout and
    stochastic depth (``None``: inference).
    """

    patch_size: Size3 = (2, 4, 4)  # (pt, ph, pw) of the patch embedding
    embed_dim: int = 96  # channels after the patch embedding (doubled by each PatchMerging)
    depths: tuple[int, ...] = (2, 2, 6, 2)  # blocks per stage
    num_heads: tuple[int, ...] = (3, 6, 12, 24)  # attention heads per stage
    window_size: Size3 = (8, 7, 7)  # attention window (Wd, Wh, Ww); odd blocks shift by window // 2
    mlp_ratio: float = 4.0  # MLP hidden width / channels
    dropout: float = 0.0  # dropout after the patch embedding, attention projections and MLPs
    attention_dropout: float = 0.0  # dropout on attention probabilities
    stochastic_depth_prob: float = 0.1  # drop-path rate of the last block (0 for the first, linear between)
    num_classes: int | None = None  # classification head size, or None for no head
    in_channels: int = 3  # channels of the video
    norm_eps: float = 1e-5  # LayerNorm epsilon everywhere

    def __post_init__(self) -> None:
        name = type(self).__name__
        object.__setattr__(self, "patch_size", _triple(self.patch_size, "patch_size", name))
        object.__setattr__(self, "window_size", _triple(self.window_size, "window_size", name))
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))
        object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))
        if len(self.depths) != len(self.num_heads) or not self.depths or min(self.depths) < 1:
            raise ValueError(f"{name}: expected one positive depth per stage and as many num_heads, "
                             f"got depths={self.depths}, num_heads={self.num_heads}")

    @property
    def num_features(self) -> int:
        """Channels of the last stage: ``embed_dim * 2 ** (stages - 1)``."""
        return self.embed_dim * 2 ** (len(self.depths) - 1)

    def drop_path_rates(self) -> list[float]:
        """Per block over all stages: ``stochastic_depth_prob * i / (total - 1)`` (torchvision)."""
        total = sum(self.depths)
        return [self.stochastic_depth_prob * i / max(total - 1, 1) for i in range(total)]

    def patch_embed(self) -> PatchEmbed3d:
        return PatchEmbed3d(self.patch_size, self.in_channels, self.embed_dim, True, self.norm_eps)

    def blocks(self, stage: int) -> list[SwinTransformerBlock3d]:
        first = sum(self.depths[:stage])
        rates = self.drop_path_rates()[first: first + self.depths[stage]]
        return [
            SwinTransformerBlock3d(
                self.embed_dim * 2**stage, self.num_heads[stage], self.window_size,
                tuple([0 if j % 2 == 0 else w // 2 for w in self.window_size]), self.mlp_ratio, self.dropout,
                self.attention_dropout, rate, self.norm_eps,
            )
            for j, rate in enumerate(rates)
        ]

    def merge(self, stage: int) -> PatchMerging:
        return PatchMerging(self.embed_dim * 2**stage, self.norm_eps)

    def head(self) -> Linear:
        return Linear(self.num_features, self.num_classes or 0, weight_init="trunc_normal")

    def block_stacks(self) -> list[str]:
        """Each stage's blocks run through the seam; the patch-merging layers between them do not."""
        return [f"stages.{i}" for i in range(len(self.depths))]

    def init(self, *, key: Tensor) -> Params:
        n = len(self.depths)
        keys = pr.split(key, 2 * n + 1)
        p: Params = {"patch_embed": self.patch_embed().init(key=keys[0])}
        p["stages"] = [[b.init(key=k) for b, k in zip(self.blocks(i), pr.split(keys[1 + i], self.depths[i]))]
                       for i in range(n)]
        p["merges"] = [self.merge(i).init(key=keys[1 + n + i]) for i in range(n - 1)]
        p["norm"] = LayerNorm(self.num_features, self.norm_eps).init(key=key)
        if self.num_classes is not None:
            p["head"] = self.head().init(key=keys[2 * n])
        return p

    def __call__(self, params: Params, x: Tensor, *, key: Tensor | None = None) -> Swin3DOutput:
        """``x (B, in_channels, T, H, W)`` -> ``Swin3DOutput``; leading B may be absent."""
        _check_video(x, self.in_channels, self)
        n = len(self.depths)
        keys = pr.maybe_split(key, n + 1)
        x = _dropout(self.patch_embed()(params["patch_embed"], x), self.dropout, key=keys[0])
        for i in range(n):
            blocks = self.blocks(i)
            x, _ = run_layers(lambda j, p, h, k, _e, b=blocks: (b[j](p, h, key=k), None),
                              params["stages"][i], x, key=keys[1 + i])
            if i < n - 1:
                x = self.merge(i)(params["merges"][i], x)
        x = LayerNorm(self.num_features, self.norm_eps)(params["norm"], x)
        pooled = x.mean(dim=(-4, -3, -2))
        logits = self.head()(params["head"], pooled) if self.num_classes is not None else None
        return Swin3DOutput(x, pooled, logits)


def _builder(embed_dim: int, depths: Sequence[int], num_heads: Sequence[int], num_classes: int | None, **kw) -> Swin3D:
    cfg = dict(patch_size=(2, 4, 4), embed_dim=embed_dim, depths=tuple(depths), num_heads=tuple(num_heads),
               window_size=(8, 7, 7), stochastic_depth_prob=0.1, num_classes=num_classes)
    return Swin3D(**{**cfg, **kw})


def swin3d_t(num_classes: int | None = 400, **overrides) -> Swin3D:
    """Swin3D-T (Liu et al., "Video Swin Transformer", arXiv:2106.13230, Table 1/6; torchvision
    ``swin3d_t``: embed 96, depths [2, 2, 6, 2], heads [3, 6, 12, 24], window (8, 7, 7), patch
    (2, 4, 4), stochastic depth 0.1, 400 Kinetics classes). ``num_classes=None``: no head."""
    return _builder(96, (2, 2, 6, 2), (3, 6, 12, 24), num_classes, **overrides)


def swin3d_s(num_classes: int | None = 400, **overrides) -> Swin3D:
    """Swin3D-S (arXiv:2106.13230; torchvision ``swin3d_s``: embed 96, depths [2, 2, 18, 2],
    heads [3, 6, 12, 24], window (8, 7, 7), patch (2, 4, 4), stochastic depth 0.1)."""
    return _builder(96, (2, 2, 18, 2), (3, 6, 12, 24), num_classes, **overrides)


def swin3d_b(num_classes: int | None = 400, **overrides) -> Swin3D:
    """Swin3D-B (arXiv:2106.13230; torchvision ``swin3d_b``: embed 128, depths [2, 2, 18, 2],
    heads [4, 8, 16, 32], window (8, 7, 7), patch (2, 4, 4), stochastic depth 0.1)."""
    return _builder(128, (2, 2, 18, 2), (4, 8, 16, 32), num_classes, **overrides)
