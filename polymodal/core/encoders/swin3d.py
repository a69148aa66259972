"""Video Swin Transformer (Swin3D) encoder, as ``torchvision.models.video.SwinTransformer3d``.

``x (B, C, T, H, W)`` -> patch embedding (Conv3d, stride = kernel = patch, then LayerNorm) ->
stages of :class:`SwinTransformerBlock3d` (window attention, shifted every other block) with
:class:`PatchMerging` between stages (halves H and W, doubles C; T is kept) -> final LayerNorm ->
mean over (T', H', W') -> optional linear head. Each stage's blocks run through the block seam
(:func:`polymodal.core.layers.seam.run_layers`); stochastic depth grows linearly over all blocks.

``Swin3D(patch_embed, stages, merges, norm, head, dropout)``: the fields are the parts, built once
by :func:`swin3d` from the usual hyperparameters; ``swin3d_t/s/b`` are the paper's configurations.
Params nest under the field names: ``patch_embed {proj, norm}``, ``stages`` (a list per stage of
block trees), ``merges``, ``norm``, ``head`` (when there is one). Block trees carry torchvision's
names (``norm1``, ``attn.qkv``, ``attn.proj``, ``attn.relative_position_bias_table``, ``norm2``,
``mlp.0``, ``mlp.3``), so torchvision's ``features.{2i}.{j}`` / ``features.{2i+1}`` keys map onto
``stages.{i}.{j}`` / ``merges.{i}`` (``polymodal.models.swin3d.convert``).

>>> import torch
>>> from polymodal.core import random as pr
>>> spec = swin3d(embed_dim=8, depths=(1, 1), num_heads=(1, 2), window_size=(2, 2, 2), num_classes=5)
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
from ..layers.dropout import drop_path, dropout as _dropout
from ..layers.init import uniform_fan_in
from ..layers.linear import Linear
from ..layers.norm import LayerNorm
from ..layers.seam import run_layers
from ..layers.window import ShiftedWindowAttention3d, Size3, triple, check_tokens

__all__ = ["PatchEmbed3d", "PatchMerging", "SwinTransformerBlock3d", "Swin3D", "Swin3DOutput", "swin3d",
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
        object.__setattr__(self, "patch_size", triple(self.patch_size, "patch_size", type(self).__name__))

    def init(self, *, key: Tensor) -> Params:
        kw, kb = pr.split(key)
        fan_in = self.in_channels * self.patch_size[0] * self.patch_size[1] * self.patch_size[2]
        shape = (self.embed_dim, self.in_channels, *self.patch_size)
        p: Params = {"proj": {"weight": uniform_fan_in(kw, shape, fan_in=fan_in),
                              "bias": uniform_fan_in(kb, (self.embed_dim,), fan_in=fan_in)}}
        if self.norm:
            p["norm"] = LayerNorm(self.embed_dim, self.norm_eps).init(key=key)
        return p

    def check_input(self, x: Tensor, owner: Spec | None = None) -> Tensor:
        """Raise unless ``x`` is ``(B, in_channels, T, H, W)`` or unbatched; errors name ``owner`` (default self)."""
        return _check_video(x, self.in_channels, owner if owner is not None else self)

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        self.check_input(x)
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
        object.__setattr__(self, "window_size", triple(self.window_size, "window_size", type(self).__name__))
        object.__setattr__(self, "shift_size", triple(self.shift_size, "shift_size", type(self).__name__))

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
        h = _dropout(fc1(params["mlp"]["0"], self.norm()(params["norm2"], x), activation="gelu"), self.dropout, key=k_h)
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

    The fields are the parts, built once by :func:`swin3d` (or ``swin3d_t/s/b``): stage ``i``'s
    blocks are ``embed_dim * 2**i`` wide, odd blocks shift by ``window // 2``, and each carries its
    own drop-path rate. With a ``head`` the logits equal torchvision's
    ``SwinTransformer3d.forward`` (norm, average pool, head). ``key`` drives dropout and
    stochastic depth (``None``: inference).
    """

    patch_embed: PatchEmbed3d  # video -> (B, T', H', W', embed_dim) tokens (Conv3d, LayerNorm)
    stages: tuple[tuple[SwinTransformerBlock3d, ...], ...]  # the blocks of each stage, run through the seam
    merges: tuple[PatchMerging, ...]  # one between consecutive stages (halves H and W, doubles C)
    norm: LayerNorm  # final LayerNorm over the last stage's channels
    head: Linear | None = None  # classifier on the pooled features, or None (TorchMultimodal's head-less encoder)
    dropout: float = 0.0  # dropout on the patch tokens (torchvision's pos_drop)

    def __post_init__(self) -> None:
        name = type(self).__name__
        object.__setattr__(self, "stages", tuple(tuple(s) for s in self.stages))
        object.__setattr__(self, "merges", tuple(self.merges))
        _check_type(self.patch_embed, PatchEmbed3d, "patch_embed")
        _check_type(self.norm, LayerNorm, "norm")
        if self.head is not None:
            _check_type(self.head, Linear, "head")
        if not self.stages or not all(self.stages):
            raise ValueError(f"{name}: stages: expected at least one stage of at least one block, "
                             f"got depths {tuple(len(s) for s in self.stages)}")
        if len(self.merges) != len(self.stages) - 1:
            raise ValueError(f"{name}: merges: expected {len(self.stages) - 1} (one between consecutive stages), "
                             f"got {len(self.merges)}")
        for i, stage in enumerate(self.stages):
            for j, block in enumerate(stage):
                _check_type(block, SwinTransformerBlock3d, f"stages[{i}][{j}]")
        dim, window = self.patch_embed.embed_dim, self.stages[0][0].window_size
        for i, stage in enumerate(self.stages):
            for j, block in enumerate(stage):
                if block.dim != dim:
                    raise ValueError(f"{name}: stages[{i}][{j}]: expected dim {dim}, got {block.dim}")
                if block.window_size != window:
                    raise ValueError(f"{name}: stages[{i}][{j}]: expected the window of every block, {window}, "
                                     f"got {block.window_size}")
            if i < len(self.merges):
                _check_type(self.merges[i], PatchMerging, f"merges[{i}]")
                if self.merges[i].dim != dim:
                    raise ValueError(f"{name}: merges[{i}]: expected dim {dim}, got {self.merges[i].dim}")
                dim *= 2
        if self.norm.dim != dim:
            raise ValueError(f"{name}: norm: expected dim {dim} (the last stage's), got {self.norm.dim}")
        if self.head is not None and self.head.in_features != dim:
            raise ValueError(f"{name}: head: expected in_features {dim}, got {self.head.in_features}")

    @property
    def in_channels(self) -> int:
        return self.patch_embed.in_channels

    @property
    def patch_size(self) -> tuple[int, int, int]:
        return self.patch_embed.patch_size

    @property
    def embed_dim(self) -> int:
        """Channels after the patch embedding (doubled by each PatchMerging)."""
        return self.patch_embed.embed_dim

    @property
    def depths(self) -> tuple[int, ...]:
        """Blocks per stage."""
        return tuple(len(s) for s in self.stages)

    @property
    def num_heads(self) -> tuple[int, ...]:
        """Attention heads per stage (of its first block)."""
        return tuple(s[0].num_heads for s in self.stages)

    @property
    def window_size(self) -> tuple[int, int, int]:
        """The attention window ``(Wd, Wh, Ww)`` every block shares."""
        return self.stages[0][0].window_size

    @property
    def num_features(self) -> int:
        """Channels of the last stage: ``embed_dim * 2 ** (stages - 1)``."""
        return self.norm.dim

    @property
    def num_classes(self) -> int | None:
        return None if self.head is None else self.head.out_features

    def drop_path_rates(self) -> list[float]:
        """The blocks' stochastic-depth rates over all stages, in order."""
        return [b.stochastic_depth_prob for s in self.stages for b in s]

    def block_stacks(self) -> list[str]:
        """Each stage's blocks run through the seam; the patch-merging layers between them do not."""
        return [f"stages.{i}" for i in range(len(self.stages))]

    def init(self, *, key: Tensor) -> Params:
        n = len(self.stages)
        keys = pr.split(key, 2 * n + 1)
        p: Params = {"patch_embed": self.patch_embed.init(key=keys[0])}
        p["stages"] = [[b.init(key=k) for b, k in zip(stage, pr.split(keys[1 + i], len(stage)))]
                       for i, stage in enumerate(self.stages)]
        p["merges"] = [m.init(key=keys[1 + n + i]) for i, m in enumerate(self.merges)]
        p["norm"] = self.norm.init(key=key)
        if self.head is not None:
            p["head"] = self.head.init(key=keys[2 * n])
        return p

    def __call__(self, params: Params, x: Tensor, *, key: Tensor | None = None) -> Swin3DOutput:
        """``x (B, in_channels, T, H, W)`` -> ``Swin3DOutput``; leading B may be absent."""
        self.patch_embed.check_input(x, self)  # a patch embedding may accept other channel counts (RGB-D)
        n = len(self.stages)
        keys = pr.maybe_split(key, n + 1)
        x = _dropout(self.patch_embed(params["patch_embed"], x), self.dropout, key=keys[0])
        for i, blocks in enumerate(self.stages):
            x, _ = run_layers(lambda j, p, h, k, _e, b=blocks: (b[j](p, h, key=k), None),
                              params["stages"][i], x, key=keys[1 + i])
            if i < n - 1:
                x = self.merges[i](params["merges"][i], x)
        x = self.norm(params["norm"], x)
        pooled = x.mean(dim=(-4, -3, -2))
        logits = self.head(params["head"], pooled) if self.head is not None else None
        return Swin3DOutput(x, pooled, logits)


def _check_type(value: object, cls: type, name: str) -> None:
    if not isinstance(value, cls):
        raise TypeError(f"Swin3D: {name}: expected {cls.__name__}, got {type(value).__name__}")


def swin3d(*, patch_size: Size3 = (2, 4, 4), embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
           num_heads: Sequence[int] = (3, 6, 12, 24), window_size: Size3 = (8, 7, 7), mlp_ratio: float = 4.0,
           dropout: float = 0.0, attention_dropout: float = 0.0, stochastic_depth_prob: float = 0.1,
           num_classes: int | None = None, in_channels: int = 3, norm_eps: float = 1e-5) -> Swin3D:
    """A :class:`Swin3D` from the usual hyperparameters (torchvision's ``SwinTransformer3d``
    arguments; the defaults are ``swin3d_t`` without a head).

    Args:
        patch_size: ``(pt, ph, pw)`` of the patch embedding. embed_dim: its channels (stage 0).
        depths, num_heads: blocks and attention heads per stage (stage ``i`` is ``embed_dim * 2**i`` wide).
        window_size: ``(Wd, Wh, Ww)`` of every block; odd blocks of a stage shift by ``window // 2``.
        mlp_ratio: MLP hidden width / channels. dropout: on the patch tokens, attention projections
            and MLPs. attention_dropout: on attention probabilities.
        stochastic_depth_prob: drop-path rate of the last block; block ``k`` of ``N`` over all stages
            gets ``stochastic_depth_prob * k / (N - 1)`` (torchvision's rule).
        num_classes: head size, or ``None`` for no head. in_channels: of the video. norm_eps: every LayerNorm's.
    """
    window = triple(window_size, "window_size", "swin3d")
    depths, num_heads = tuple(int(d) for d in depths), tuple(int(h) for h in num_heads)
    if len(depths) != len(num_heads) or not depths or min(depths) < 1:
        raise ValueError(f"swin3d: expected one positive depth per stage and as many num_heads, "
                         f"got depths={depths}, num_heads={num_heads}")
    total = sum(depths)
    rates = [stochastic_depth_prob * k / max(total - 1, 1) for k in range(total)]
    shifted = tuple(w // 2 for w in window)
    stages, first = [], 0
    for i, (depth, heads) in enumerate(zip(depths, num_heads)):
        stages.append(tuple(
            SwinTransformerBlock3d(embed_dim * 2**i, heads, window_size=window,
                                   shift_size=(0, 0, 0) if j % 2 == 0 else shifted, mlp_ratio=mlp_ratio,
                                   dropout=dropout, attention_dropout=attention_dropout,
                                   stochastic_depth_prob=rates[first + j], norm_eps=norm_eps)
            for j in range(depth)))
        first += depth
    num_features = embed_dim * 2 ** (len(depths) - 1)
    return Swin3D(
        patch_embed=PatchEmbed3d(patch_size, in_channels, embed_dim, norm=True, norm_eps=norm_eps),
        stages=tuple(stages),
        merges=tuple(PatchMerging(embed_dim * 2**i, norm_eps) for i in range(len(depths) - 1)),
        norm=LayerNorm(num_features, norm_eps),
        head=None if num_classes is None else Linear(num_features, num_classes, weight_init="trunc_normal"),
        dropout=dropout)


def swin3d_t(num_classes: int | None = 400, **overrides) -> Swin3D:
    """Swin3D-T: Liu et al., "Video Swin Transformer" (CVPR 2022, arXiv:2106.13230), Section 3.3
    "Architecture Variants" (Swin-T: C = 96, layers {2, 2, 6, 2}; head dimension 32, so heads
    (3, 6, 12, 24); MLP ratio 4; window 8 x 7 x 7) and Section 3.1 (2 x 4 x 4 patches); Kinetics-400
    results in Table 1. Stochastic depth 0.1 and 400 classes are torchvision's ``swin3d_t``'s.
    ``num_classes=None``: no head; ``overrides``: any other :func:`swin3d` argument."""
    return swin3d(**{"embed_dim": 96, "depths": (2, 2, 6, 2), "num_heads": (3, 6, 12, 24), "num_classes": num_classes,
                     **overrides})


def swin3d_s(num_classes: int | None = 400, **overrides) -> Swin3D:
    """Swin3D-S: Liu et al. 2022, Section 3.3 (Swin-S: C = 96, layers {2, 2, 18, 2}, heads (3, 6, 12, 24));
    otherwise as :func:`swin3d_t` (torchvision's ``swin3d_s``)."""
    return swin3d(**{"embed_dim": 96, "depths": (2, 2, 18, 2), "num_heads": (3, 6, 12, 24), "num_classes": num_classes,
                     **overrides})


def swin3d_b(num_classes: int | None = 400, **overrides) -> Swin3D:
    """Swin3D-B: Liu et al. 2022, Section 3.3 (Swin-B: C = 128, layers {2, 2, 18, 2}, heads (4, 8, 16, 32));
    otherwise as :func:`swin3d_t` (torchvision's ``swin3d_b``)."""
    return swin3d(**{"embed_dim": 128, "depths": (2, 2, 18, 2), "num_heads": (4, 8, 16, 32), "num_classes": num_classes,
                     **overrides})
