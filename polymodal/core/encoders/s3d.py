"""S3D (separable 3-D CNN) video encoder with batch-norm statistics as explicit state.

Xie et al. 2018, "Rethinking Spatiotemporal Feature Learning" (S3D; Figure 2 / Table 1): an
Inception-v1 layout whose 3-D convolutions are split into a spatial ``1 x k x k`` and a
temporal ``k x 1 x 1`` convolution. The layout is torchvision's ``torchvision.models.video.S3D``
(which MUGEN's VideoCLIP video encoder wraps), and so are the names: ``flatten(params)`` and
``flatten(state)`` together are exactly the keys of torchvision's ``S3D().state_dict()``::

    params: features: {"0", "2", "3", "5", ..., "15": torchvision's nn.Sequential indices; the max pools
              (1, 4, 7, 13) hold nothing, so it is a dict keyed by the index strings, not a list}
        conv-bn-relu (Conv3dNormActivation): [{weight} (conv, no bias), {weight, bias} (bn)]
        separable conv (TemporalSeparableConv): [conv-bn-relu (1,k,k), conv-bn-relu (k,1,1)]
        inception block (SepInceptionBlock3D): {branch0: conv-bn-relu,
            branch1 / branch2: [conv-bn-relu (1x1), separable conv (3)], branch3: {"1": conv-bn-relu}}
    classifier (num_classes set): {"1": {weight (N, 1024, 1, 1, 1), bias (N,)}}
    state: the same tree with each conv-bn-relu's {"1": {running_mean, running_var, num_batches_tracked}}.

The nine inception blocks differ in width and sit between pools, so no stack of repeated blocks
runs through the seam (``block_stacks() == []``: sharded training gathers the encoder whole).

``y, new_state = s3d(params, video, state, training=...)``: ``training=False`` (the default)
normalises with the running statistics and returns ``state`` itself; ``training=True`` uses
batch statistics and returns advanced statistics, as ``torch.nn.BatchNorm3d`` in train mode
(torchvision's ``eps=1e-3, momentum=1e-3``), unless ``frozen_bn``.

The head follows torchvision: ``AvgPool3d(pool_kernel, stride=1)`` over the last feature map,
then the mean over the remaining positions (and, with ``num_classes``, dropout and the 1x1x1
classifier convolution, applied here after the mean: it is linear, so the result is the same).
MUGEN's video encoder is ``num_classes=None``: ``(B, 3, T, H, W) -> (B, 1024)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import random as pr
from ..layers.batchnorm import BatchNorm3d
from ..layers.conv import Conv3d
from ..layers.dropout import dropout as _dropout
from ..pytree import Params, tree_map
from ..spec import Spec, check_floating

__all__ = ["S3D", "s3d", "s3d_tiny", "S3D_BLOCKS"]

Block = tuple[int, int, int, int, int, int]  # (b0_out, b1_mid, b1_out, b2_mid, b2_out, b3_out)

# torchvision's S3D: the nine SepInceptionBlock3D widths (Inception-v1's 3a..5c).
S3D_BLOCKS: tuple[Block, ...] = (
    (64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64),
    (192, 96, 208, 16, 48, 64), (160, 112, 224, 24, 64, 64), (128, 128, 256, 24, 64, 64),
    (112, 144, 288, 32, 64, 64), (256, 160, 320, 32, 128, 128),
    (256, 160, 320, 32, 128, 128), (384, 192, 384, 48, 128, 128),
)
# Where the max pools sit in ``features`` (torchvision's indices) and their (kernel, stride, padding).
_POOLS = {1: ((1, 3, 3), (1, 2, 2), (0, 1, 1)), 4: ((1, 3, 3), (1, 2, 2), (0, 1, 1)),
          7: ((3, 3, 3), (2, 2, 2), (1, 1, 1)), 13: ((2, 2, 2), (2, 2, 2), (0, 0, 0))}
_BLOCK_AT = (5, 6, 8, 9, 10, 11, 12, 14, 15)  # features index of inception block i


def _out(block: Block) -> int:
    return block[0] + block[2] + block[4] + block[5]


@dataclass(frozen=True)
class _Unit:
    """Conv3d (no bias) -> BatchNorm3d -> ReLU: torchvision's ``Conv3dNormActivation``; params ``[conv, bn]``."""

    cin: int
    cout: int
    kernel: tuple[int, int, int]
    stride: tuple[int, int, int]
    padding: tuple[int, int, int]
    bn: BatchNorm3d

    def init(self, key: Tensor) -> list:
        return [Conv3d(self.cin, self.cout, self.kernel, self.stride, self.padding, bias=False).init(key=key),
                self.bn.init()]

    def init_state(self) -> Params:
        return {"1": self.bn.init_state()}

    def __call__(self, p: list, x: Tensor, st: Params, training: bool) -> tuple[Tensor, Params]:
        conv = Conv3d(self.cin, self.cout, self.kernel, self.stride, self.padding, bias=False)
        y, s = self.bn(p[1], conv(p[0], x), st["1"], training=training)
        return F.relu(y), {"1": s}


def _sep(cin: int, cout: int, k: int, stride: int, pad: int, bn: BatchNorm3d) -> tuple[_Unit, _Unit]:
    """torchvision's ``TemporalSeparableConv``: a ``(1, k, k)`` then a ``(k, 1, 1)`` conv-bn-relu."""
    return (_Unit(cin, cout, (1, k, k), (1, stride, stride), (0, pad, pad), bn),
            _Unit(cout, cout, (k, 1, 1), (stride, 1, 1), (pad, 0, 0), bn))


def _one(cin: int, cout: int, bn: BatchNorm3d) -> _Unit:
    return _Unit(cin, cout, (1, 1, 1), (1, 1, 1), (0, 0, 0), bn)


@dataclass(frozen=True)
class S3D(Spec):
    """S3D: ``video (B, 3, T, H, W) -> ((B, out_dim), new_state)``; see the module docstring.

    The defaults are torchvision's ``S3D`` (8,320,048 params with the 400-class head; 7,910,048
    without). ``T`` is reduced 8x and ``H, W`` 32x before the head, whose average pool needs at
    least ``pool_kernel`` positions (torchvision: ``(2, 7, 7)``, i.e. 16 x 224 x 224 clips or more).

    >>> import torch
    >>> from polymodal.core import random as pr
    >>> net = s3d_tiny()
    >>> p, s = net.init(key=pr.key(0)), net.init_state()
    >>> y, s2 = net(p, torch.rand(2, 3, 8, 32, 32), s)
    >>> y.shape, s2 is s
    (torch.Size([2, 64]), True)
    """

    stem: tuple[int, int, int] = (64, 64, 192)  # widths of the 7x7x7 separable conv, the 1x1 conv, the 3x3x3 one
    blocks: tuple[Block, ...] = S3D_BLOCKS  # the nine inception blocks' (b0, b1_mid, b1, b2_mid, b2, b3) widths
    pool_kernel: tuple[int, int, int] = (2, 7, 7)  # AvgPool3d kernel (stride 1) before the mean
    num_classes: int | None = None  # a 1x1x1 classifier conv on top (torchvision: 400); None: the features
    dropout: float = 0.2  # before the classifier (training calls with a key)
    bn_eps: float = 1e-3  # eps of every BatchNorm3d (torchvision's S3D)
    bn_momentum: float = 1e-3  # running-statistics update factor in training mode (torchvision's S3D)
    frozen_bn: bool = False  # always normalise with the running statistics

    def __post_init__(self) -> None:
        name = type(self).__name__
        object.__setattr__(self, "stem", tuple(int(c) for c in self.stem))
        object.__setattr__(self, "blocks", tuple(tuple(int(c) for c in b) for b in self.blocks))
        object.__setattr__(self, "pool_kernel", tuple(int(k) for k in self.pool_kernel))
        if len(self.stem) != 3 or min(self.stem) < 1:
            raise ValueError(f"{name}: stem: expected 3 positive widths, got {self.stem}")
        if len(self.blocks) != 9 or any(len(b) != 6 or min(b) < 1 for b in self.blocks):
            raise ValueError(f"{name}: blocks: expected 9 tuples of 6 positive widths, got {self.blocks}")
        if len(self.pool_kernel) != 3 or min(self.pool_kernel) < 1:
            raise ValueError(f"{name}: pool_kernel: expected 3 positive sizes, got {self.pool_kernel}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"{name}: num_classes must be positive or None, got {self.num_classes}")

    @property
    def feature_dim(self) -> int:
        """Channels of the last feature map (torchvision: 1024)."""
        return _out(self.blocks[-1])

    @property
    def out_dim(self) -> int:
        """Size of the output: ``num_classes`` with a classifier, else :attr:`feature_dim`."""
        return self.num_classes or self.feature_dim

    def _units(self, i: int):
        """``features[i]``'s spec: a unit, a pair of units, an inception block (dict) or ``None`` (max pool)."""
        bn = lambda c: BatchNorm3d(c, eps=self.bn_eps, momentum=self.bn_momentum, frozen=self.frozen_bn)  # noqa: E731
        s0, s1, s2 = self.stem
        if i == 0:
            return self._sep(3, s0, 7, 2, 3)
        if i == 2:
            return _one(s0, s1, bn(s1))
        if i == 3:
            return self._sep(s1, s2, 3, 1, 1)
        if i in _POOLS:
            return None
        b = _BLOCK_AT.index(i)
        cin = s2 if b == 0 else _out(self.blocks[b - 1])
        b0, b1m, b1, b2m, b2, b3 = self.blocks[b]
        return {"branch0": _one(cin, b0, bn(b0)),
                "branch1": (_one(cin, b1m, bn(b1m)), self._sep(b1m, b1, 3, 1, 1)),
                "branch2": (_one(cin, b2m, bn(b2m)), self._sep(b2m, b2, 3, 1, 1)),
                "branch3": {"1": _one(cin, b3, bn(b3))}}

    def _sep(self, cin: int, cout: int, k: int, stride: int, pad: int) -> tuple[_Unit, _Unit]:
        bn = BatchNorm3d(cout, eps=self.bn_eps, momentum=self.bn_momentum, frozen=self.frozen_bn)
        return _sep(cin, cout, k, stride, pad, bn)

    def block_stacks(self) -> list[str]:
        return []

    def init(self, *, key: Tensor) -> Params:
        kf, kc = pr.split(key)

        def init(u, k):
            if isinstance(u, _Unit):
                return u.init(k)
            if isinstance(u, dict):
                return {n: init(v, kk) for (n, v), kk in zip(u.items(), pr.split(k, len(u)))}
            return [init(v, kk) for v, kk in zip(u, pr.split(k, len(u)))]

        p: Params = {"features": {str(i): init(self._units(i), k) for i, k in enumerate(pr.split(kf, 16))
                                  if i not in _POOLS}}
        if self.num_classes is not None:
            p["classifier"] = {"1": Conv3d(self.feature_dim, self.num_classes, 1).init(key=kc)}
        return p

    def init_state(self) -> Params:
        def init(u):
            if isinstance(u, _Unit):
                return u.init_state()
            if isinstance(u, dict):
                return {n: init(v) for n, v in u.items()}
            return [init(v) for v in u]

        return {"features": {str(i): init(self._units(i)) for i in range(16) if i not in _POOLS}}

    def feature_shape(self, t: int, h: int, w: int) -> tuple[int, int, int]:
        """``(T', H', W')`` of the last feature map for a ``T x H x W`` clip."""
        up = lambda n: -(-n // 2)  # noqa: E731  (stride-2 conv / padded pool: ceil)
        return tuple(up(up(up(up(n)))) // 2 if i else up(up(n)) // 2 for i, n in enumerate((t, h, w)))

    def check_video(self, video: Tensor) -> None:
        name = type(self).__name__
        check_floating(video, "video", self)
        if video.dim() != 5 or video.shape[1] != 3:
            raise ValueError(f"{name}: expected video of shape (B, 3, T, H, W), got {tuple(video.shape)}")
        t, h, w = video.shape[2:]
        fs = self.feature_shape(t, h, w)
        if any(f < k for f, k in zip(fs, self.pool_kernel)):
            need = [next(n for n in range(1, 4096) if self.feature_shape(*([n] * 3))[i] >= k)
                    for i, k in enumerate(self.pool_kernel)]
            raise ValueError(f"{name}: video of {t} frames of {h}x{w} gives a {fs} feature map, smaller than the "
                             f"average pool {self.pool_kernel}: expected at least {need[0]} frames of "
                             f"{need[1]}x{need[2]}")

    def __call__(self, params: Params, video: Tensor, state: Params | None = None, *, training: bool = False,
                 key: Tensor | None = None) -> tuple[Tensor, Params]:
        """``video (B, 3, T, H, W)``; ``state`` from :meth:`init_state` (None: fresh statistics);
        ``key`` drives the classifier's dropout when training.

        Returns ``((B, out_dim), new_state)``; without training (or with ``frozen_bn``) the
        returned state is ``state`` itself."""
        self.check_video(video)
        if state is None:
            state = tree_map(lambda t: t.to(video.device), self.init_state())
        train = training and not self.frozen_bn

        def run(u, p, x, st):
            if isinstance(u, _Unit):
                return u(p, x, st, train)
            if isinstance(u, tuple):  # a chain: separable conv, or an inception branch
                new = []
                for v, pv, sv in zip(u, p, st):
                    x, s = run(v, pv, x, sv)
                    new.append(s)
                return x, new
            # an inception block: four branches, concatenated; branch3's max pool (index 0) holds nothing
            outs, new = [], {}
            for n in ("branch0", "branch1", "branch2"):
                y, new[n] = run(u[n], p[n], x, st[n])
                outs.append(y)
            y, s3 = run(u["branch3"]["1"], p["branch3"]["1"], F.max_pool3d(x, 3, 1, 1), st["branch3"]["1"])
            new["branch3"] = {"1": s3}
            return torch.cat(outs + [y], 1), new

        x, new = video, {}
        for i in range(16):
            if i in _POOLS:
                k, s, pad = _POOLS[i]
                x = F.max_pool3d(x, k, s, pad)
            else:
                x, new[str(i)] = run(self._units(i), params["features"][str(i)], x, state["features"][str(i)])
        x = F.avg_pool3d(x, self.pool_kernel, stride=1).mean((2, 3, 4))
        if self.num_classes is not None:
            x = _dropout(x, self.dropout, key=key if training else None)
            w = params["classifier"]["1"]
            x = F.linear(x, w["weight"].flatten(1), w["bias"])
        return x, ({"features": new} if train else state)


def s3d(**kw) -> S3D:
    """torchvision's ``S3D`` layout (Xie et al. 2018, Table 1; the encoder of MUGEN's VideoCLIP):
    7,910,048 params without the classifier, 8,320,048 with ``num_classes=400``."""
    return S3D(**kw)


def s3d_tiny(**kw) -> S3D:
    """The S3D layout at 1/16 of the width with a 1x1x1 pool: 8-frame 32x32 clips on 2 CPU cores."""
    blocks = tuple(tuple(max(1, c // 16) for c in b) for b in S3D_BLOCKS)
    return S3D(**(dict(stem=(8, 8, 16), blocks=blocks, pool_kernel=(1, 1, 1)) | kw))

