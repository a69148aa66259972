"""The video VQ-VAE's encoder and decoder (VideoGPT, Yan et al. 2021; TorchMultimodal's ``video_vqvae``).

Encoder: TensorFlow-"SAME" 3-d convolutions (ReLU between, the strided ones downsample), a stack of
axial-attention residual blocks, batch norm + ReLU, a 1x1x1 convolution to the codebook width.
Decoder: the mirror image (1x1x1 convolution in, residual stack, transposed convolutions out).

Batch norm makes both stateful: ``(y, new_state) = spec(params, x, state, training=...)`` with the
running statistics in ``state`` (``res_blocks[i].{bn1, bn2, bn3}``, ``res_norm``).

>>> import torch
>>> from polymodal.core import random as pr
>>> enc = VideoEncoder(convs=(SamePadConv3d(3, 8, 4, 2),), res_blocks=(AttentionResidualBlock(8),) * 2,
...                    res_norm=BatchNorm3d(8), conv_out=SamePadConv3d(8, 4, 1))
>>> z, s = enc(enc.init(key=pr.key(0)), torch.rand(1, 3, 4, 8, 8), enc.init_state())
>>> z.shape
torch.Size([1, 4, 2, 4, 4])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ...core import random as pr
from ...core.layers.attention import MultiHeadAttention
from ...core.layers.batchnorm import BatchNorm3d
from ...core.layers.conv import SamePadConv3d, SamePadConvTranspose3d
from ...core.layers.seam import run_layers
from ...core.pytree import Params
from ...core.spec import Spec, check_floating

__all__ = ["AxialAttentionBlock", "AttentionResidualBlock", "VideoEncoder", "VideoDecoder"]


def _check_video(spec: Spec, x: Tensor, channels: int, what: str) -> None:
    check_floating(x, what, spec)
    if x.dim() != 5 or x.shape[1] != channels:
        raise ValueError(f"{type(spec).__name__}: {what}: expected shape (B, {channels}, T, H, W), "
                         f"got {tuple(x.shape)}")


@dataclass(frozen=True)
class AxialAttentionBlock(Spec):
    """Multi-head attention along each of the 3 latent axes separately, outputs summed:
    ``(B, C, T, H, W) -> (B, C, T, H, W)``. Params ``mha_attns[i]`` (one per axis) with bias-free
    ``q_proj``/``k_proj``/``v_proj`` and a biased ``out_proj`` (TorchMultimodal's ``AxialAttentionBlock``)."""

    qkv_dim: int  # channels C
    num_heads: int = 2  # heads per axis (divides C)
    n_dims: int = 3  # latent axes (3 for video)

    def mha(self) -> MultiHeadAttention:
        return MultiHeadAttention(self.qkv_dim, self.num_heads, fused_qkv=False, bias=False, out_bias=True,
                                  weight_init="uniform_fan_in")

    def init(self, *, key: Tensor) -> Params:
        return {"mha_attns": [self.mha().init(key=k) for k in pr.split(key, self.n_dims)]}

    def __call__(self, params: Params, x: Tensor) -> Tensor:
        check_floating(x, "x", self)
        if x.dim() != self.n_dims + 2 or x.shape[1] != self.qkv_dim:
            raise ValueError(f"AxialAttentionBlock: x: expected shape (B, {self.qkv_dim}, "
                             f"<{self.n_dims} latent axes>), got {tuple(x.shape)}")
        h = x.movedim(1, -1)  # (B, *latent, C)
        out = None
        for axis, p in enumerate(params["mha_attns"]):
            a = h.movedim(1 + axis, -2)  # (B, ..., L_axis, C)
            flat = a.reshape(-1, a.shape[-2], a.shape[-1])
            y = self.mha()(p, flat).output.reshape(a.shape).movedim(-2, 1 + axis)
            out = y if out is None else out + y
        return out.movedim(-1, 1)


@dataclass(frozen=True)
class AttentionResidualBlock(Spec):
    """``x + axial_attn(relu(bn3(conv2(relu(bn2(conv1(relu(bn1(x)))))))))``, conv1 3x3x3 to C/2 and
    conv2 1x1x1 back to C, both bias-free (VideoGPT's residual block). State: ``bn1``, ``bn2``, ``bn3``."""

    hidden_dim: int  # channels C (>= 2)
    num_heads: int = 2  # axial attention heads

    def __post_init__(self) -> None:
        if self.hidden_dim < 2 or self.hidden_dim % 2:
            raise ValueError(f"AttentionResidualBlock: expected an even hidden_dim >= 2, got {self.hidden_dim}")

    def parts(self) -> dict[str, Spec]:
        c, h = self.hidden_dim, self.hidden_dim // 2
        return {"bn1": BatchNorm3d(c), "conv1": SamePadConv3d(c, h, 3, bias=False), "bn2": BatchNorm3d(h),
                "conv2": SamePadConv3d(h, c, 1, bias=False), "bn3": BatchNorm3d(c),
                "attn": AxialAttentionBlock(c, self.num_heads)}

    def init(self, *, key: Tensor) -> Params:
        ks = pr.split(key, 6)
        return {name: spec.init(key=k) for (name, spec), k in zip(self.parts().items(), ks)}

    def init_state(self) -> Params:
        return {name: spec.init_state() for name, spec in self.parts().items() if name.startswith("bn")}

    def __call__(self, params: Params, x: Tensor, state: Params | None = None, *,
                 training: bool = False) -> tuple[Tensor, Params]:
        _check_video(self, x, self.hidden_dim, "x")
        parts, state = self.parts(), state if state is not None else self.init_state()
        new_state = {}
        h = x
        for name in ("bn1", "conv1", "bn2", "conv2", "bn3"):
            if name.startswith("bn"):
                h, new_state[name] = parts[name](params[name], h, state[name], training=training)
                h = F.relu(h)
            else:
                h = parts[name](params[name], h)
        return x + parts["attn"](params["attn"], h), new_state


def _res_stack(blocks: tuple[AttentionResidualBlock, ...], norm: BatchNorm3d, params: Params, h: Tensor,
               state: Params, training: bool) -> tuple[Tensor, Params]:
    h, block_states = run_layers(lambda i, p, x, _k, s: blocks[i](p, x, s, training=training), params["res_blocks"],
                                 h, extras=state["res_blocks"])
    h, norm_state = norm(params["res_norm"], h, state["res_norm"], training=training)
    return F.relu(h), {"res_blocks": list(block_states), "res_norm": norm_state}


@dataclass(frozen=True)
class VideoEncoder(Spec):
    """``(B, C_in, T, H, W) -> (B, D, T / s_T, H / s_H, W / s_W)`` for the product ``s`` of the conv strides.

    Params: ``convs[i].conv``, ``res_blocks[i]``, ``res_norm``, ``conv_out.conv``."""

    convs: tuple[SamePadConv3d, ...]  # the downsampling stack (ReLU between, none after the last)
    res_blocks: tuple[AttentionResidualBlock, ...]  # axial-attention residual blocks
    res_norm: BatchNorm3d  # batch norm (then ReLU) after the residual blocks
    conv_out: SamePadConv3d  # 1x1x1 projection to the codebook width D

    @property
    def in_channels(self) -> int:
        return self.convs[0].in_channels

    @property
    def out_channels(self) -> int:
        return self.conv_out.out_channels

    @property
    def downsample(self) -> tuple[int, int, int]:
        """Total stride per axis (T, H, W)."""
        return tuple([math.prod([c.stride[i] for c in self.convs]) for i in range(3)])

    def init(self, *, key: Tensor) -> Params:
        ks = pr.split(key, len(self.convs) + len(self.res_blocks) + 1)
        n = len(self.convs)
        return {"convs": [c.init(key=k) for c, k in zip(self.convs, ks[:n])],
                "res_blocks": [b.init(key=k) for b, k in zip(self.res_blocks, ks[n:-1])],
                "res_norm": self.res_norm.init(), "conv_out": self.conv_out.init(key=ks[-1])}

    def init_state(self) -> Params:
        return {"res_blocks": [b.init_state() for b in self.res_blocks], "res_norm": self.res_norm.init_state()}

    def block_stacks(self) -> list[str]:
        return ["res_blocks"]

    def __call__(self, params: Params, x: Tensor, state: Params | None = None, *,
                 training: bool = False) -> tuple[Tensor, Params]:
        _check_video(self, x, self.in_channels, "x")
        state = self.init_state() if state is None else state
        h = x
        for i, (conv, p) in enumerate(zip(self.convs, params["convs"])):
            h = conv(p, h)
            h = F.relu(h) if i < len(self.convs) - 1 else h
        h, new_state = _res_stack(self.res_blocks, self.res_norm, params, h, state, training)
        return self.conv_out(params["conv_out"], h), new_state


@dataclass(frozen=True)
class VideoDecoder(Spec):
    """``(B, D, t, h, w) -> (B, C_out, t * s_T, h * s_H, w * s_W)``.

    Params: ``conv_in.conv``, ``res_blocks[i]``, ``res_norm``, ``convts[i].convt``."""

    conv_in: SamePadConv3d  # 1x1x1 projection from the codebook width D
    res_blocks: tuple[AttentionResidualBlock, ...]  # axial-attention residual blocks
    res_norm: BatchNorm3d  # batch norm (then ReLU) after the residual blocks
    convts: tuple[SamePadConvTranspose3d, ...]  # the upsampling stack (ReLU between, none after the last)

    @property
    def in_channels(self) -> int:
        return self.conv_in.in_channels

    def init(self, *, key: Tensor) -> Params:
        ks = pr.split(key, len(self.convts) + len(self.res_blocks) + 1)
        n = len(self.res_blocks)
        return {"conv_in": self.conv_in.init(key=ks[0]),
                "res_blocks": [b.init(key=k) for b, k in zip(self.res_blocks, ks[1:1 + n])],
                "res_norm": self.res_norm.init(),
                "convts": [c.init(key=k) for c, k in zip(self.convts, ks[1 + n:])]}

    def init_state(self) -> Params:
        return {"res_blocks": [b.init_state() for b in self.res_blocks], "res_norm": self.res_norm.init_state()}

    def block_stacks(self) -> list[str]:
        return ["res_blocks"]

    def __call__(self, params: Params, z: Tensor, state: Params | None = None, *,
                 training: bool = False) -> tuple[Tensor, Params]:
        _check_video(self, z, self.in_channels, "z")
        state = self.init_state() if state is None else state
        h = self.conv_in(params["conv_in"], z)
        h, new_state = _res_stack(self.res_blocks, self.res_norm, params, h, state, training)
        for i, (conv, p) in enumerate(zip(self.convts, params["convts"])):
            h = conv(p, h)
            h = F.relu(h) if i < len(self.convts) - 1 else h
        return h, new_state
