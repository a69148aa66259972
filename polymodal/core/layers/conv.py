"""Convolutions: ``Conv`` / ``ConvTranspose`` over 1, 2 or 3 spatial axes (torch.nn's layout and
default init), and TorchMultimodal's TensorFlow-"SAME" padded ``SamePadConv3d`` /
``SamePadConvTranspose3d`` (VideoGPT / MUGEN VQ-VAE).

Inputs are ``(B, C, *spatial)`` or unbatched ``(C, *spatial)``, as torch accepts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import random as pr
from ..pytree import Params
from ..spec import Spec, check_floating, check_param_dtype, check_sizes, take_params
from .init import uniform_fan_in

__all__ = [
    "Conv", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
    "SamePadConv3d", "SamePadConvTranspose3d", "same_padding", "same_transpose_padding",
]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_AXES = {1: "L", 2: "H, W", 3: "D, H, W"}
_PAD_MODES = ("zeros", "reflect", "replicate", "circular")


def _tuple(v: int | Sequence[int], n: int, what: str, owner: str) -> tuple[int, ...]:
    t = (int(v),) * n if isinstance(v, int) else tuple(int(i) for i in v)
    if len(t) != n:
        raise ValueError(f"{owner}: {what} must be an int or a tuple of {n} ints, got {v!r}")
    return t


def _check_input(spec: Spec, x: Tensor, channels: int, dims: int) -> None:
    """``(B, C, *spatial)`` or ``(C, *spatial)`` with ``C == channels``; errors quote the expected layout."""
    name = type(spec).__name__
    check_floating(x, "x", spec)
    if x.dim() not in (dims + 1, dims + 2):
        raise ValueError(f"{name}: x: expected shape (B, C, {_AXES[dims]}) or (C, {_AXES[dims]}), got {tuple(x.shape)}")
    if x.shape[x.dim() - dims - 1] != channels:
        raise ValueError(
            f"{name}: expected input with {channels} channels (B, {channels}, {_AXES[dims]}), got {tuple(x.shape)}"
        )


def _init_conv(key: Tensor, weight_shape: tuple[int, ...], fan_in: int, bias: int | None) -> Params:
    # torch.nn's default: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)), bias the same.
    kw, kb = pr.split(key)
    p = {"weight": uniform_fan_in(kw, weight_shape, fan_in=fan_in)}
    if bias is not None:
        p["bias"] = uniform_fan_in(kb, (bias,), fan_in=fan_in)
    return p


@dataclass(frozen=True)
class Conv(Spec):
    """N-d convolution; params ``weight (out, in / groups, *kernel)``, ``bias (out,)`` as torch.nn.ConvNd.

    ``(B, in, *spatial) -> (B, out, *spatial')`` (or unbatched without ``B``).

    >>> import torch
    >>> from polymodal.core import random as pr
    >>> conv = Conv(2, 3, 8, kernel_size=3, padding="same")
    >>> conv(conv.init(key=pr.key(0)), torch.ones(2, 3, 5, 5)).shape
    torch.Size([2, 8, 5, 5])
    """

    dims: int  # number of spatial axes: 1, 2 or 3
    in_channels: int  # C of the input
    out_channels: int  # C of the output
    kernel_size: int | tuple[int, ...]  # int or one per spatial axis
    stride: int | tuple[int, ...] = 1  # int or one per spatial axis
    padding: int | tuple[int, ...] | str = 0  # int, one per axis, "same" (stride 1 only) or "valid"
    dilation: int | tuple[int, ...] = 1  # int or one per spatial axis
    groups: int = 1  # channel groups (in and out must divide)
    bias: bool = True  # learn an additive bias
    padding_mode: str = "zeros"  # "zeros", "reflect", "replicate" or "circular"

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_sizes(self, in_channels=self.in_channels, out_channels=self.out_channels)
        if self.dims not in _CONV:
            raise ValueError(f"{name}: dims must be 1, 2 or 3, got {self.dims}")
        for f in ("kernel_size", "stride", "dilation"):
            object.__setattr__(self, f, _tuple(getattr(self, f), self.dims, f, name))
        if isinstance(self.padding, str):
            if self.padding not in ("same", "valid"):
                raise ValueError(f"{name}: padding must be an int, a tuple, 'same' or 'valid', got {self.padding!r}")
            if self.padding == "same" and any(s != 1 for s in self.stride):
                raise ValueError(f"{name}: padding='same' needs stride 1, got stride {self.stride}")
        else:
            object.__setattr__(self, "padding", _tuple(self.padding, self.dims, "padding", name))
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(
                f"{name}: in_channels ({self.in_channels}) and out_channels ({self.out_channels}) "
                f"must be divisible by groups ({self.groups})"
            )
        if self.padding_mode not in _PAD_MODES:
            raise ValueError(f"{name}: padding_mode must be one of {_PAD_MODES}, got {self.padding_mode!r}")

    def init(self, *, key: Tensor) -> Params:
        shape = (self.out_channels, self.in_channels // self.groups) + self.kernel_size
        fan_in = math.prod(shape[1:])
        return _init_conv(key, shape, fan_in, self.out_channels if self.bias else None)

    def _explicit_padding(self) -> list[int]:
        """F.pad widths (last axis first) that ``padding`` stands for, as torch's ``_reversed_padding_repeated_twice``."""
        out: list[int] = []
        for i in reversed(range(self.dims)):
            if self.padding == "same":
                total = self.dilation[i] * (self.kernel_size[i] - 1)
                out += [total // 2, total - total // 2]
            elif self.padding == "valid":
                out += [0, 0]
            else:
                out += [self.padding[i]] * 2
        return out

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        w, b = take_params(params, self, weight=True, bias=self.bias)
        _check_input(self, x, self.in_channels, self.dims)
        check_param_dtype(x, "x", w, self)
        conv = _CONV[self.dims]
        if self.padding_mode != "zeros":
            x = F.pad(x, self._explicit_padding(), mode=self.padding_mode)
            return conv(x, w, b, self.stride, 0, self.dilation, self.groups)
        return conv(x, w, b, self.stride, self.padding, self.dilation, self.groups)


@dataclass(frozen=True)
class ConvTranspose(Spec):
    """N-d transposed convolution; params ``weight (in, out / groups, *kernel)``, ``bias (out,)``.

    ``(B, in, *spatial) -> (B, out, *spatial')`` with
    ``spatial' = (spatial - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1``.

    >>> import torch
    >>> from polymodal.core import random as pr
    >>> up = ConvTranspose(2, 4, 2, kernel_size=2, stride=2)
    >>> up(up.init(key=pr.key(0)), torch.ones(1, 4, 3, 3)).shape
    torch.Size([1, 2, 6, 6])
    """

    dims: int  # number of spatial axes: 1, 2 or 3
    in_channels: int  # C of the input
    out_channels: int  # C of the output
    kernel_size: int | tuple[int, ...]  # int or one per spatial axis
    stride: int | tuple[int, ...] = 1  # int or one per spatial axis
    padding: int | tuple[int, ...] = 0  # trimmed from each side of the output
    output_padding: int | tuple[int, ...] = 0  # added to one side of the output (< stride or dilation)
    groups: int = 1  # channel groups
    bias: bool = True  # learn an additive bias
    dilation: int | tuple[int, ...] = 1  # int or one per spatial axis

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.dims not in _CONV_T:
            raise ValueError(f"{name}: dims must be 1, 2 or 3, got {self.dims}")
        for f in ("kernel_size", "stride", "padding", "output_padding", "dilation"):
            object.__setattr__(self, f, _tuple(getattr(self, f), self.dims, f, name))
        if any(op >= max(s, d) for op, s, d in zip(self.output_padding, self.stride, self.dilation)):
            raise ValueError(
                f"{name}: output_padding {self.output_padding} must be smaller than stride {self.stride} or dilation {self.dilation}"
            )
        if self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(
                f"{name}: in_channels ({self.in_channels}) and out_channels ({self.out_channels}) "
                f"must be divisible by groups ({self.groups})"
            )

    def init(self, *, key: Tensor) -> Params:
        shape = (self.in_channels, self.out_channels // self.groups) + self.kernel_size
        fan_in = math.prod(shape[1:])  # torch computes fan_in from weight.size(1) for transposed convs too
        return _init_conv(key, shape, fan_in, self.out_channels if self.bias else None)

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        _check_input(self, x, self.in_channels, self.dims)
        return _CONV_T[self.dims](
            x, params["weight"], params.get("bias"), self.stride, self.padding, self.output_padding, self.groups,
            self.dilation,
        )


def _preset(base: type, dims: int, torch_name: str) -> type:
    ns = {"__annotations__": {"dims": int}, "dims": field(default=dims, init=False), "__module__": __name__,
          "__doc__": f":class:`{base.__name__}` with ``dims={dims}`` (``torch.nn.{torch_name}``).\n\n{base.__doc__}"}
    return dataclass(frozen=True)(type(torch_name, (base,), ns))


Conv1d = _preset(Conv, 1, "Conv1d")
Conv2d = _preset(Conv, 2, "Conv2d")
Conv3d = _preset(Conv, 3, "Conv3d")
ConvTranspose1d = _preset(ConvTranspose, 1, "ConvTranspose1d")
ConvTranspose2d = _preset(ConvTranspose, 2, "ConvTranspose2d")
ConvTranspose3d = _preset(ConvTranspose, 3, "ConvTranspose3d")


def same_padding(kernel_size: Sequence[int], stride: Sequence[int], spatial: Sequence[int]) -> tuple[int, ...]:
    """TensorFlow "SAME" padding as ``F.pad`` widths (last axis first; the odd extra goes before).

    Output size ``ceil(d / s)`` per axis; total pad ``max(k - s, 0)`` when ``s`` divides ``d``, else
    ``max(k - d % s, 0)`` (TorchMultimodal's ``calculate_same_padding``).

    >>> same_padding((3, 3, 3), (1, 2, 2), (4, 8, 7))
    (1, 1, 1, 0, 1, 1)
    """
    total = [max(k - s, 0) if d % s == 0 else max(k - d % s, 0) for k, s, d in zip(kernel_size, stride, spatial)]
    out: list[int] = []
    for p in reversed(total):
        out += [p // 2 + p % 2, p // 2]
    return tuple(out)


def same_transpose_padding(
    kernel_size: Sequence[int], stride: Sequence[int], spatial: Sequence[int], input_pad: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(padding, output_padding)`` making a transposed conv of an input padded by ``input_pad``
    (F.pad widths) output ``d * s`` per axis (TorchMultimodal's ``calculate_transpose_padding``)."""
    n = len(spatial)
    pad_total = [input_pad[2 * (n - 1 - i)] + input_pad[2 * (n - 1 - i) + 1] for i in range(n)]
    tpad, opad = [], []
    for d, k, s, p in zip(spatial, kernel_size, stride, pad_total):
        actual, expected = k + (d + p - 1) * s, d * s
        tpad.append(max((actual - expected + 1) // 2, 0))
        opad.append(expected - (actual - 2 * tpad[-1]))
    return tuple(tpad), tuple(opad)


@dataclass(frozen=True)
class _SamePad3d(Spec):
    """Fields shared by the TensorFlow-"SAME" 3-d (transposed) convolutions."""

    in_channels: int  # C of the input
    out_channels: int  # C of the output
    kernel_size: int | tuple[int, int, int]  # int or (kd, kh, kw)
    stride: int | tuple[int, int, int] = 1  # int or (sd, sh, sw)
    bias: bool = True  # learn an additive bias
    groups: int = 1  # channel groups

    def __post_init__(self) -> None:
        for f in ("kernel_size", "stride"):
            object.__setattr__(self, f, _tuple(getattr(self, f), 3, f, type(self).__name__))


@dataclass(frozen=True)
class SamePadConv3d(_SamePad3d):
    """3-d convolution with TensorFlow "SAME" padding for any stride: ``(B, C, D, H, W) -> (B, out,
    ceil(D / s), ...)``; params ``conv.weight``/``conv.bias`` (TorchMultimodal's layout).

    Unlike TorchMultimodal, which caches the padding of the first input it sees, the padding
    follows each input's shape.

    >>> import torch
    >>> from polymodal.core import random as pr
    >>> c = SamePadConv3d(2, 4, kernel_size=3, stride=2)
    >>> c(c.init(key=pr.key(0)), torch.ones(1, 2, 4, 7, 8)).shape
    torch.Size([1, 4, 2, 4, 4])
    """

    def conv(self) -> Conv:
        return Conv(3, self.in_channels, self.out_channels, self.kernel_size, self.stride, 0, 1, self.groups, self.bias)

    def init(self, *, key: Tensor) -> Params:
        return {"conv": self.conv().init(key=key)}

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        _check_input(self, x, self.in_channels, 3)
        pad = same_padding(self.kernel_size, self.stride, x.shape[-3:])
        conv = self.conv()
        if (x.dim() == 5 and x.device.type == "cpu" and x.dtype == torch.float32 and self.groups == 1
                and not torch.compiler.is_compiling()):  # eager CPU: pick the faster formulation
            w, b = take_params(params["conv"], conv, weight=True, bias=self.bias)
            check_param_dtype(x, "x", w, conv)
            if _cpu_uses_mkldnn(x.shape, w.shape, self.stride):
                if pad[::2] == pad[1::2]:  # symmetric: the conv pads (no padded copy, no pad backward)
                    return F.conv3d(x, w, b, self.stride, pad[::2][::-1])
            elif math.prod(self.kernel_size) > 1 and not _cpu_uses_mkldnn(_padded(x.shape, pad), w.shape, self.stride):
                return _conv3d_as_conv2d(F.pad(x, pad), w, b, self.stride)
        return conv(params["conv"], F.pad(x, pad))


def _padded(shape: Sequence[int], pad: Sequence[int]) -> tuple[int, ...]:
    """``shape`` after ``F.pad(x, pad)`` (widths last axis first)."""
    n = len(pad) // 2
    grown = [d + pad[2 * (n - 1 - i)] + pad[2 * (n - 1 - i) + 1] for i, d in enumerate(shape[-n:])]
    return tuple(shape[:-n]) + tuple(grown)


def _cpu_uses_mkldnn(x_shape: Sequence[int], w_shape: Sequence[int], stride: Sequence[int]) -> bool:
    """Whether torch's CPU ``conv3d`` of a float32 ``x`` (ungrouped, undilated, unpadded) runs oneDNN
    rather than its native ``slow_conv3d`` (``ConvParams::use_mkldnn`` in ATen's Convolution.cpp)."""
    if not torch.backends.mkldnn.is_available() or not torch.backends.mkldnn.enabled:
        return False
    n, c, d = x_shape[0], x_shape[1], x_shape[2]
    kh, kw = w_shape[-2], w_shape[-1]
    first = any(s != 1 for s in stride) or n >= 16 or kw != 1 or kh != 1 or torch.get_num_threads() > 1
    return first and ((kw > 3 and kh > 3) or n > 1 or n * c * d * x_shape[3] > 20480)


def _conv3d_as_conv2d(x: Tensor, w: Tensor, b: Tensor | None, stride: Sequence[int]) -> Tensor:
    """An unpadded ``conv3d(x (B, C, D, H, W), w (O, C, kd, kh, kw))`` as one ``conv2d`` over the
    output depths: the ``kd`` input slices each output depth reads are stacked into the channels
    (``(B * D_out, C * kd, H, W)``, weight ``(O, C * kd, kh, kw)``). The same sums in another order;
    used where torch would run its native ``slow_conv3d`` (batch 1, small inputs), which is slower
    than oneDNN's ``conv2d`` on the batch of depths."""
    bsz, c, d, h, wd = x.shape
    o, _, kd, kh, kw = w.shape
    sd = stride[0]
    dout = (d - kd) // sd + 1
    cols = torch.stack([x[:, :, i:i + sd * (dout - 1) + 1:sd] for i in range(kd)], 2)  # (B, C, kd, D_out, H, W)
    cols = cols.permute(0, 3, 1, 2, 4, 5).reshape(bsz * dout, c * kd, h, wd)
    y = F.conv2d(cols, w.reshape(o, c * kd, kh, kw), b, tuple(stride[1:]))
    return y.reshape(bsz, dout, o, *y.shape[-2:]).transpose(1, 2)


@dataclass(frozen=True)
class SamePadConvTranspose3d(_SamePad3d):
    """3-d transposed convolution whose output is the input size times the stride:
    ``(B, C, D, H, W) -> (B, out, D * s, H * s, W * s)``; params ``convt.weight``/``convt.bias``
    (TorchMultimodal's layout and padding rule).

    >>> import torch
    >>> from polymodal.core import random as pr
    >>> c = SamePadConvTranspose3d(4, 2, kernel_size=4, stride=2)
    >>> c(c.init(key=pr.key(0)), torch.ones(1, 4, 2, 3, 3)).shape
    torch.Size([1, 2, 4, 6, 6])
    """

    def convt(self) -> ConvTranspose:
        return ConvTranspose(3, self.in_channels, self.out_channels, self.kernel_size, self.stride, 0, 0, self.groups, self.bias)

    def init(self, *, key: Tensor) -> Params:
        return {"convt": self.convt().init(key=key)}

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        _check_input(self, x, self.in_channels, 3)
        spatial = tuple(x.shape[-3:])
        pad = same_padding(self.kernel_size, self.stride, spatial)
        tpad, opad = same_transpose_padding(self.kernel_size, self.stride, spatial, pad)
        p = params["convt"]
        w = p["weight"]
        if (x.dim() == 5 and x.shape[0] > 1 and x.device.type == "cpu" and x.dtype == torch.float32
                and not torch.compiler.is_compiling() and not torch._C._functorch.is_functorch_wrapped_tensor(x)):
            # batched eager CPU: oneDNN's channels-last kernels (~2x); not under vmap/grad transforms
            x, w = (t.contiguous(memory_format=torch.channels_last_3d) for t in (x, w))
        inner = tuple(t - q * s for t, q, s in zip(tpad, pad[::2][::-1], self.stride))
        if pad[::2] == pad[1::2] and min(inner) >= 0:  # symmetric: crop less instead of padding the input
            return F.conv_transpose3d(x, w, p.get("bias"), self.stride, inner, opad, self.groups)
        return F.conv_transpose3d(F.pad(x, pad), w, p.get("bias"), self.stride, tpad, opad, self.groups)
