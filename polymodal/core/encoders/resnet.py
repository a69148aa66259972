"""torchvision's ResNet body (He et al. 2016) with frozen batch norm: DETR / MDETR's image backbone.

Params use torchvision's ``resnet{18,34,50,101,152}`` names, so its state dicts load after dropping
``fc.*`` and the ``num_batches_tracked`` counters (:func:`from_torchvision`)::

    conv1 {weight}, bn1 {weight, bias, running_mean, running_var},
    layer1..layer4: [block] * n    block: conv1, bn1, conv2, bn2, [conv3, bn3], [downsample: [conv, bn]]

Every batch norm is *frozen* (TorchMultimodal / DETR's ``FrozenBatchNorm2d``): it always normalises
with its stored statistics and affine values, none of which is trained, so the four tensors sit in
the params tree as torchvision stores them and the call detaches them (their gradient is None; an
optimizer skips them). ``trainable_layers`` (torchvision's ``trainable_backbone_layers``: 0..5)
detaches the convolutions of the leading stages too: MDETR trains ``layer2..layer4`` only (3).

``ResNet(...)(params, images) -> (B, C_out, H / 32, W / 32)``: the last stage's feature map (no
pooling, no classifier), stateless.

>>> import torch
>>> from polymodal.core import random as pr
>>> net = resnet(layers=(1, 1, 1, 1), block="basic", width=8)
>>> net(net.init(key=pr.key(0)), torch.randn(2, 3, 64, 64)).shape
torch.Size([2, 64, 2, 2])
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import random as pr
from ..layers.batchnorm import outside_func_transforms
from ..layers.conv import Conv2d
from ..layers.seam import run_layers
from ..pytree import Params
from ..spec import Spec, check_floating, check_ndim, check_param_dtype, take_params

__all__ = ["FrozenBatchNorm2d", "ResNetBlock", "ResNet", "resnet", "resnet18", "resnet50", "resnet101",
           "from_torchvision", "to_torchvision"]

_EXPANSION = {"basic": 1, "bottleneck": 4}


@dataclass(frozen=True)
class FrozenBatchNorm2d(Spec):
    """``x * w / sqrt(var + eps) + (b - mean * w / sqrt(var + eps))`` per channel, nothing trained.

    Params ``weight``, ``bias``, ``running_mean``, ``running_var`` ``(C,)`` (torchvision's batch-norm
    keys less ``num_batches_tracked``); ``(B, C, H, W) -> (B, C, H, W)``. The arithmetic is
    TorchMultimodal's (``scale = w * rsqrt(var + eps)``, ``x * scale + (b - mean * scale)``).
    """

    num_features: int  # C
    eps: float = 1e-5  # added to the variance

    def init(self, *, key: Tensor | None = None) -> Params:
        c = self.num_features
        return {"weight": torch.ones(c), "bias": torch.zeros(c), "running_mean": torch.zeros(c),
                "running_var": torch.ones(c)}

    def __call__(self, params: Params, x: Tensor, *, fresh: bool = False) -> Tensor:
        """``fresh=True``: ``x`` is a tensor nobody else holds whose value no backward needs (a convolution's
        output); it is then overwritten (``x.mul_(scale).add_(shift)``: no new activation, the same autograd
        graph and numbers) where that is plain tensor arithmetic (no vmap / grad transform, same dtype)."""
        w, b, rm, rv = (t.detach() for t in take_params(params, self, weight=True, bias=True, running_mean=True,
                                                           running_var=True))
        scale = w * (rv + self.eps).rsqrt()
        shift = b - rm * scale
        scale, shift = scale.reshape(1, -1, 1, 1), shift.reshape(1, -1, 1, 1)
        if fresh and scale.dtype == x.dtype and outside_func_transforms():
            return x.mul_(scale).add_(shift)
        return x * scale + shift


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> Conv2d:
    return Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)


def _detach_tree(t):
    if isinstance(t, dict):
        return {k: _detach_tree(v) for k, v in t.items()}
    if isinstance(t, list):
        return [_detach_tree(v) for v in t]
    return t.detach()


@dataclass(frozen=True)
class ResNetBlock(Spec):
    """torchvision's ``BasicBlock`` (3x3, 3x3) or ``Bottleneck`` (1x1, 3x3 with the stride, 1x1 x4;
    ResNet v1.5), residual with a 1x1 + batch-norm shortcut when the shape changes.
    ``(B, inplanes, H, W) -> (B, planes * expansion, H / stride, W / stride)``."""

    inplanes: int  # input channels
    planes: int  # block width (the output has planes * expansion)
    stride: int = 1  # downsampling factor
    kind: str = "bottleneck"  # "basic" (resnet18/34) or "bottleneck" (resnet50/101/152)
    bn_eps: float = 1e-5  # eps of the frozen batch norms

    def __post_init__(self) -> None:
        if self.kind not in _EXPANSION:
            raise ValueError(f"ResNetBlock: kind must be one of {tuple(_EXPANSION)}, got {self.kind!r}")

    @property
    def out_channels(self) -> int:
        return self.planes * _EXPANSION[self.kind]

    @property
    def has_downsample(self) -> bool:
        return self.stride != 1 or self.inplanes != self.out_channels

    def _layers(self) -> dict[str, Spec]:
        p, e = self.planes, self.bn_eps
        if self.kind == "basic":
            return {"conv1": _conv(self.inplanes, p, 3, self.stride), "bn1": FrozenBatchNorm2d(p, e),
                    "conv2": _conv(p, p, 3), "bn2": FrozenBatchNorm2d(p, e)}
        return {"conv1": _conv(self.inplanes, p, 1), "bn1": FrozenBatchNorm2d(p, e),
                "conv2": _conv(p, p, 3, self.stride), "bn2": FrozenBatchNorm2d(p, e),
                "conv3": _conv(p, self.out_channels, 1), "bn3": FrozenBatchNorm2d(self.out_channels, e)}

    def _shortcut(self) -> tuple[Conv2d, FrozenBatchNorm2d]:
        return _conv(self.inplanes, self.out_channels, 1, self.stride), FrozenBatchNorm2d(self.out_channels, self.bn_eps)

    def init(self, *, key: Tensor) -> Params:
        layers = self._layers()
        keys = dict(zip(layers, pr.split(key, len(layers) + 1)))
        p = {n: s.init(key=keys[n]) for n, s in layers.items()}
        if self.has_downsample:
            conv, bn = self._shortcut()
            p["downsample"] = [conv.init(key=pr.fold_in(key, 99)), bn.init()]
        return p

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        layers = self._layers()
        convs = [n for n in layers if n.startswith("conv")]
        out = x
        for j, n in enumerate(convs):
            bn = f"bn{n[-1]}"
            out = layers[bn](params[bn], layers[n](params[n], out), fresh=True)
            if j < len(convs) - 1:
                out = F.relu_(out)  # in place on the fresh normalised output (no backward reads it)
        identity = x
        if self.has_downsample:
            conv, bn = self._shortcut()
            identity = bn(params["downsample"][1], conv(params["downsample"][0], x), fresh=True)
        return F.relu_(out.add_(identity))  # as torchvision: fewer large allocations, same autograd


@dataclass(frozen=True)
class ResNet(Spec):
    """torchvision's ResNet without pooling and classifier, frozen batch norm (see the module docstring):
    ``images (B, 3, H, W) -> (B, width * 8 * expansion, ceil(H / 32), ceil(W / 32))``."""

    layers: tuple[int, int, int, int] = (3, 4, 23, 3)  # blocks per stage (resnet101)
    block: str = "bottleneck"  # "basic" or "bottleneck"
    width: int = 64  # stem width; stage s has width * 2**s planes
    trainable_layers: int = 5  # stages that get gradients, counted from layer4 back (5: all, incl. the stem)
    bn_eps: float = 1e-5  # eps of the frozen batch norms

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        if len(self.layers) != 4 or any(n < 1 for n in self.layers):
            raise ValueError(f"ResNet: layers: expected 4 positive block counts, got {self.layers}")
        if self.block not in _EXPANSION:
            raise ValueError(f"ResNet: block must be one of {tuple(_EXPANSION)}, got {self.block!r}")
        if not 0 <= self.trainable_layers <= 5:
            raise ValueError(f"ResNet: trainable_layers must be in [0, 5], got {self.trainable_layers}")

    @property
    def out_channels(self) -> int:
        """Channels of the returned feature map (resnet50/101: 2048; resnet18: 512)."""
        return self.width * 8 * _EXPANSION[self.block]

    def block_stacks(self) -> list[str]:
        return ["layer1", "layer2", "layer3", "layer4"]

    def block_at(self, stage: int, i: int) -> ResNetBlock:
        """Block ``i`` of stage ``stage`` (0-based): the first changes width and (after stage 0) stride."""
        planes = self.width * 2**stage
        e = _EXPANSION[self.block]
        if i == 0:
            inplanes = self.width if stage == 0 else self.width * 2 ** (stage - 1) * e
            return ResNetBlock(inplanes, planes, 1 if stage == 0 else 2, self.block, self.bn_eps)
        return ResNetBlock(planes * e, planes, 1, self.block, self.bn_eps)

    def stem(self) -> tuple[Conv2d, FrozenBatchNorm2d]:
        return Conv2d(3, self.width, 7, stride=2, padding=3, bias=False), FrozenBatchNorm2d(self.width, self.bn_eps)

    def init(self, *, key: Tensor) -> Params:
        k_stem, k_stages = pr.split(key)
        conv, bn = self.stem()
        p: Params = {"conv1": conv.init(key=k_stem), "bn1": bn.init()}
        for s, (n, k) in enumerate(zip(self.layers, pr.split(k_stages, 4))):
            p[f"layer{s + 1}"] = [self.block_at(s, i).init(key=ki) for i, ki in enumerate(pr.split(k, n))]
        return p

    def __call__(self, params: Params, images: Tensor) -> Tensor:
        check_floating(images, "images", self)
        check_ndim(images, "images", 4, "(B, 3, H, W)", self)
        if images.shape[1] != 3:
            raise ValueError(f"ResNet: images: expected shape (B, 3, H, W), got {tuple(images.shape)}")
        frozen_upto = 5 - self.trainable_layers  # 0: none; 1: the stem; 2: stem + layer1; ...
        conv, bn = self.stem()
        stem = _detach_tree({"conv1": params["conv1"]}) if frozen_upto >= 1 else params
        check_param_dtype(images, "images", params["conv1"]["weight"], self)
        x = F.relu_(bn(params["bn1"], conv(stem["conv1"], images), fresh=True))
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        for s in range(4):
            blocks = params[f"layer{s + 1}"]
            if frozen_upto >= s + 2:
                blocks = _detach_tree(blocks)
            x, _ = run_layers(lambda i, p, h, _k, _e, s=s: (self.block_at(s, i)(p, h), None), blocks, x)
        return x


def resnet(*, layers=(3, 4, 23, 3), block: str = "bottleneck", width: int = 64, trainable_layers: int = 5) -> ResNet:
    """A :class:`ResNet` body (defaults: resnet101's stages)."""
    return ResNet(tuple(layers), block, width, trainable_layers)


def resnet18(**kw) -> ResNet:
    """torchvision ``resnet18`` (He et al. 2016, Table 1: [2, 2, 2, 2] basic blocks): 11,186,112 values in the body
    (torchvision's 11,176,512 parameters without ``fc`` + the running statistics)."""
    return resnet(**({"layers": (2, 2, 2, 2), "block": "basic"} | kw))


def resnet50(**kw) -> ResNet:
    """torchvision ``resnet50`` (He et al. 2016, Table 1: [3, 4, 6, 3] bottlenecks)."""
    return resnet(**({"layers": (3, 4, 6, 3)} | kw))


def resnet101(**kw) -> ResNet:
    """torchvision ``resnet101`` (He et al. 2016, Table 1: [3, 4, 23, 3] bottlenecks): 42,605,504 values in the body
    (torchvision's 42,500,160 parameters without ``fc`` + 105,344 running statistics)."""
    return resnet(**kw)


def from_torchvision(state_dict: Mapping[str, Tensor], spec: ResNet, prefix: str = "") -> Params:
    """A torchvision ResNet state dict (``resnet101().state_dict()``; keys under ``prefix``) -> params of
    ``spec``; ``fc.*`` and ``num_batches_tracked`` are dropped. One error names every mismatched key."""
    from ..convert import Rule, Table

    table = Table((Rule(prefix + "{k*}", "{k*}"),), drop=(prefix + "fc.{r*}", prefix + "{r*}.num_batches_tracked"),
                  name="from_torchvision: the torchvision ResNet state dict")
    return table.to_ours({k: v for k, v in state_dict.items() if k.startswith(prefix)}, spec)


def to_torchvision(params: Params, spec: ResNet) -> dict[str, Tensor]:
    """Params -> torchvision's keys (without ``fc`` and ``num_batches_tracked``: load with ``strict=False``)."""
    from ..convert import Rule, Table

    return Table((Rule("{k*}", "{k*}"),), name="torchvision ResNet").to_theirs(params, spec=spec)
