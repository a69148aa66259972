"""CLIP's modified ResNet image tower, with batch-norm statistics as explicit state.

Differences from torchvision's ResNet (Radford et al. 2021, section 2.4): a stem of three 3x3
convs with an average pool instead of a max pool; anti-aliased downsampling (a stride-s average
pool before the third conv and before the shortcut's 1x1 conv, all convs stride 1); and an
attention pool (the mean feature queries the ``H*W`` features) instead of global average pooling.

Params and state use OpenAI's / open_clip's names, so their state dicts map one to one::

    params: conv1..3 {weight}, bn1..3 {weight, bias}, layer1..4: [Bottleneck] * n,
            attnpool: {positional_embedding (1 + G*G, C), q_proj, k_proj, v_proj, c_proj: {weight, bias}}
    Bottleneck: conv1..3 {weight}, bn1..3 {weight, bias}, [downsample: [{weight} (conv), {weight, bias} (bn)]]
    state: the same tree of BatchNorms holding {running_mean, running_var, num_batches_tracked};
           a block's shortcut BatchNorm sits at downsample: {"1": ...}

``y, new_state = resnet(params, x, state, training=...)``: ``training=False`` (the default)
normalises with the running statistics and returns ``state`` unchanged (frozen, as in
evaluation); ``training=True`` uses batch statistics and returns advanced running statistics,
exactly as ``torch.nn.BatchNorm2d`` in train mode, unless the spec sets ``frozen_bn``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core import random as pr
from ...core.layers.batchnorm import BatchNorm2d, outside_func_transforms
from ...core.layers.conv import Conv2d
from ...core.layers.linear import Linear
from ...core.layers.attention import attention, merge_heads, split_heads
from ...core.layers.seam import run_layers
from ...core.pytree import Params, tree_map
from ...core.spec import Spec, check_floating, check_ndim
from .vision import check_images, check_positive

__all__ = ["ModifiedResNet", "Bottleneck", "AttentionPool2d"]

EXPANSION = 4


def _bn(cfg: Bottleneck | ModifiedResNet, channels: int) -> BatchNorm2d:
    return BatchNorm2d(channels, eps=cfg.bn_eps, momentum=cfg.bn_momentum, frozen=cfg.frozen_bn)


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> Conv2d:
    return Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)


@dataclass(frozen=True)
class Bottleneck(Spec):
    """1x1 -> 3x3 -> [avgpool(stride)] -> 1x1 (x4 channels), residual; ``(B, inplanes, H, W) ->
    (B, 4 * planes, H / stride, W / stride)``. Returns ``(y, new_state)``."""

    inplanes: int  # input channels
    planes: int  # bottleneck channels (the output has 4 * planes)
    stride: int = 1  # downsampling factor (by average pooling)
    bn_eps: float = 1e-5  # eps of every BatchNorm
    bn_momentum: float = 0.1  # running-statistics update factor in training mode
    frozen_bn: bool = False  # always normalise with the running statistics

    @property
    def has_downsample(self) -> bool:
        return self.stride > 1 or self.inplanes != self.planes * EXPANSION

    def _layers(self) -> dict[str, Spec]:
        p, out = self.planes, self.planes * EXPANSION
        return {"conv1": _conv(self.inplanes, p, 1), "bn1": _bn(self, p), "conv2": _conv(p, p, 3),
                "bn2": _bn(self, p), "conv3": _conv(p, out, 1), "bn3": _bn(self, out)}

    def init(self, *, key: Tensor) -> Params:
        k1, k2, k3, kd = pr.split(key, 4)
        keys = {"conv1": k1, "conv2": k2, "conv3": k3}
        p = {n: s.init(key=keys.get(n, key)) for n, s in self._layers().items()}
        p["bn3"]["weight"] = torch.zeros_like(p["bn3"]["weight"])  # OpenAI: each block starts as identity
        if self.has_downsample:
            out = self.planes * EXPANSION
            p["downsample"] = [_conv(self.inplanes, out, 1).init(key=kd), _bn(self, out).init()]
        return p

    def init_state(self) -> Params:
        s = {n: spec.init_state() for n, spec in self._layers().items() if n.startswith("bn")}
        if self.has_downsample:
            s["downsample"] = {"1": _bn(self, self.planes * EXPANSION).init_state()}
        return s

    def __call__(self, params: Params, x: Tensor, state: Params, *, training: bool = False) -> tuple[Tensor, Params]:
        L = self._layers()
        new: Params = {}

        def conv_bn(h: Tensor, i: int) -> Tensor:
            h = L[f"conv{i}"](params[f"conv{i}"], h)
            h, new[f"bn{i}"] = L[f"bn{i}"](params[f"bn{i}"], h, state[f"bn{i}"], training=training)
            return h

        out = F.relu(conv_bn(x, 1))
        out = F.relu(conv_bn(out, 2))
        if self.stride > 1:
            out = F.avg_pool2d(out, self.stride)
        out = conv_bn(out, 3)
        identity = x
        if self.has_downsample:
            if self.stride > 1:
                identity = F.avg_pool2d(identity, self.stride)
            out_c = self.planes * EXPANSION
            identity = _conv(self.inplanes, out_c, 1)(params["downsample"][0], identity)
            identity, ds = _bn(self, out_c)(params["downsample"][1], identity, state["downsample"]["1"],
                                                training=training)
            new["downsample"] = {"1": ds}
        return F.relu(out + identity), new


@dataclass(frozen=True)
class AttentionPool2d(Spec):
    """Pool ``(B, C, G, G)`` to ``(B, output_dim)``: the spatial mean (plus positions) attends over
    itself and the ``G*G`` features, through q/k/v projections and ``c_proj`` (OpenAI's names)."""

    grid: int  # G, side of the feature map
    embed_dim: int  # C, channels of the features
    num_heads: int  # attention heads
    output_dim: int  # size of the pooled output

    def init(self, *, key: Tensor) -> Params:
        kp, kq, kk, kv, kc = pr.split(key, 5)
        std = self.embed_dim**-0.5  # OpenAI: N(0, C**-0.5) weights, torch-default biases

        def lin(k: Tensor, out: int) -> Params:
            kw, kb = pr.split(k)
            return {"weight": pr.normal(kw, (out, self.embed_dim)) * std,
                    "bias": Linear(self.embed_dim, out).init(key=kb)["bias"]}

        return {"positional_embedding": pr.normal(kp, (self.grid**2 + 1, self.embed_dim)) * std,
                "k_proj": lin(kk, self.embed_dim), "q_proj": lin(kq, self.embed_dim), "v_proj": lin(kv, self.embed_dim),
                "c_proj": lin(kc, self.output_dim)}

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        check_floating(x, "x", self)
        check_ndim(x, "x", 4, f"(B, {self.embed_dim}, {self.grid}, {self.grid})", self)
        x = x.flatten(2).transpose(1, 2)  # (B, G*G, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + params["positional_embedding"].to(x.dtype)
        p = params
        # Only the mean token's output is kept, so only it is used as a query.
        q = split_heads(F.linear(x[:, :1], p["q_proj"]["weight"], p["q_proj"]["bias"]), self.num_heads)
        k = split_heads(F.linear(x, p["k_proj"]["weight"], p["k_proj"]["bias"]), self.num_heads)
        v = split_heads(F.linear(x, p["v_proj"]["weight"], p["v_proj"]["bias"]), self.num_heads)
        out, _ = attention(q, k, v)
        return F.linear(merge_heads(out)[:, 0], p["c_proj"]["weight"], p["c_proj"]["bias"])


@dataclass(frozen=True)
class ModifiedResNet(Spec):
    """CLIP ResNet (CLIP paper, Table 19; "width" there is ``32 * width`` here; the defaults are RN50's):
    ``images (B, 3, S, S) -> ((B, embed_dim), new_state)``; see the module docstring.

    >>> import torch
    >>> from polymodal.core import random as pr
    >>> rn = ModifiedResNet(image_size=64, layers=(1, 1, 1, 1), width=16, heads=2, embed_dim=32)
    >>> p, s = rn.init(key=pr.key(0)), rn.init_state()
    >>> y, s2 = rn(p, torch.randn(2, 3, 64, 64), s)
    >>> y.shape, s2 is s
    (torch.Size([2, 32]), True)
    """

    image_size: int = 224  # side of the square input image (a multiple of 32)
    layers: tuple[int, int, int, int] = (3, 4, 6, 3)  # bottleneck blocks per stage
    width: int = 64  # stem width; stage s has width * 2**s planes, expanded x4
    heads: int = 32  # heads of the attention pooling (OpenAI: 32 * width // 64)
    embed_dim: int = 1024  # output size (the joint embedding)
    bn_eps: float = 1e-5  # eps of every BatchNorm
    bn_momentum: float = 0.1  # running-statistics update factor in training mode
    frozen_bn: bool = False  # always normalise with the running statistics, even when training=True

    def __post_init__(self) -> None:
        name = type(self).__name__
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        if len(self.layers) != 4 or any(n < 1 for n in self.layers):
            raise ValueError(f"{name}: layers: expected 4 positive block counts, got {self.layers}")
        check_positive(name, image_size=self.image_size, width=self.width, heads=self.heads, embed_dim=self.embed_dim)
        if self.image_size % 32:
            raise ValueError(f"{name}: image_size ({self.image_size}) must be a multiple of 32")
        if self.width % 2 or (32 * self.width) % self.heads:
            raise ValueError(f"{name}: width ({self.width}) must be even and 32 * width divisible by heads ({self.heads})")

    @property
    def grid(self) -> int:
        """Side of the final feature map (the attention pool's grid)."""
        return self.image_size // 32

    @property
    def feature_dim(self) -> int:
        """Channels of the last stage, pooled by attention (RN50: 2048)."""
        return self.width * 32

    def _stem(self) -> list[tuple[str, Spec]]:
        w = self.width
        return [("conv1", Conv2d(3, w // 2, 3, stride=2, padding=1, bias=False)), ("bn1", _bn(self, w // 2)),
                ("conv2", _conv(w // 2, w // 2, 3)), ("bn2", _bn(self, w // 2)),
                ("conv3", _conv(w // 2, w, 3)), ("bn3", _bn(self, w))]

    def block_stacks(self) -> list[str]:
        return ["layer1", "layer2", "layer3", "layer4"]  # the stem and attnpool run outside the seam

    def block(self, stage: int, i: int) -> Bottleneck:
        """Block ``i`` of stage ``stage`` (0-based): the first changes width and stride."""
        w = self.width
        bn = {"bn_eps": self.bn_eps, "bn_momentum": self.bn_momentum, "frozen_bn": self.frozen_bn}
        planes = w * 2**stage
        if i == 0:
            inplanes = w if stage == 0 else w * 2 ** (stage - 1) * EXPANSION
            return Bottleneck(inplanes, planes, 1 if stage == 0 else 2, **bn)
        return Bottleneck(planes * EXPANSION, planes, 1, **bn)

    def attnpool(self) -> AttentionPool2d:
        return AttentionPool2d(self.grid, self.feature_dim, self.heads, self.embed_dim)

    def init(self, *, key: Tensor) -> Params:
        k_stem, k_stages, k_pool = pr.split(key, 3)
        stem_keys = pr.split(k_stem, 3)
        p: Params = {n: s.init(key=stem_keys[int(n[-1]) - 1]) for n, s in self._stem()}
        for s, (n, k) in enumerate(zip(self.layers, pr.split(k_stages, 4))):
            p[f"layer{s + 1}"] = [self.block(s, i).init(key=ki) for i, ki in enumerate(pr.split(k, n))]
        p["attnpool"] = self.attnpool().init(key=k_pool)
        return p

    def init_state(self) -> Params:
        s: Params = {n: spec.init_state() for n, spec in self._stem() if n.startswith("bn")}
        for stage, n in enumerate(self.layers):
            s[f"layer{stage + 1}"] = [self.block(stage, i).init_state() for i in range(n)]
        return s

    def __call__(self, params: Params, images: Tensor, state: Params | None = None, *,
                 training: bool = False) -> tuple[Tensor, Params]:
        """``images (B, 3, S, S)``, ``state`` from :meth:`init_state` (None: fresh statistics).

        Returns ``((B, embed_dim), new_state)``; without training (or with ``frozen_bn``) the
        returned state is ``state`` itself.
        """
        check_images(type(self).__name__, images, self.image_size)
        if state is None:
            state = tree_map(lambda t: t.to(images.device), self.init_state())
        train = training and not self.frozen_bn
        new: Params = {}
        x = images
        if images.device.type == "cpu" and outside_func_transforms():
            # oneDNN's convolutions (and their backward) run ~1.3x faster on channels-last activations
            x = images.contiguous(memory_format=torch.channels_last)
        for name, spec in self._stem():
            if name.startswith("conv"):
                x = spec(params[name], x)
            else:
                x, new[name] = spec(params[name], x, state[name], training=train)
                x = F.relu(x)
        x = F.avg_pool2d(x, 2)
        for s in range(4):
            name = f"layer{s + 1}"

            def block(i, p, h, _key, st, s=s):
                return self.block(s, i)(p, h, st, training=train)

            x, new[name] = run_layers(block, params[name], x, extras=state[name])
        y = self.attnpool()(params["attnpool"], x)
        return y, (new if train else state)
