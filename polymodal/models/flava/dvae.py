"""The DALL-E dVAE encoder (Ramesh et al. 2021): FLAVA's image tokenizer for masked image modelling.

A ResNet-like stack of 3x3 convolutions with identity-or-1x1 shortcuts and a ``1 / n_layers**2`` gain on
the residual path; max-pooling after each of the first three groups, so a 112 px image gives a 14 x 14
grid of logits over ``vocab_size`` (8192) codes; the code of a patch is their argmax. Params keep the
published checkpoint's names (OpenAI's ``dall_e`` ``Encoder``, TorchMultimodal's ``DalleEncoder``)::

    blocks: {input: {w, b}, group_{g}: {block_{i}: {[id_path: {w, b}], res_path: {conv_{1..4}: {w, b}}}},
             output: {conv: {w, b}}}

>>> import torch
>>> from polymodal.core import random as pr
>>> enc = DalleEncoder(n_hid=8, vocab_size=16, image_size=32)
>>> enc.codebook_indices(enc.init(key=pr.key(0)), torch.rand(2, 3, 32, 32)).shape
torch.Size([2, 4, 4])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core import random as pr
from ...core.pytree import Params
from ...core.spec import Spec, check_floating, check_sizes

__all__ = ["DalleEncoder"]


def _conv(p: Params, x: Tensor) -> Tensor:
    kw = p["w"].shape[-1]
    return F.conv2d(x, p["w"], p["b"], padding=(kw - 1) // 2)


def _conv_init(key: Tensor, n_in: int, n_out: int, kw: int) -> Params:
    return {"w": pr.normal(key, (n_out, n_in, kw, kw)) / math.sqrt(n_in * kw**2), "b": torch.zeros(n_out)}


@dataclass(frozen=True)
class DalleEncoder(Spec):
    """``images (B, C, S, S) -> logits (B, vocab_size, S / 8, S / 8)`` (DALL-E's dVAE encoder).

    ``codebook_indices`` gives the ``(B, S / 8, S / 8)`` argmax codes (no gradient: tokenizer targets).
    Inputs are expected in DALL-E's pixel range (``map_pixels``: ``x * 0.8 + 0.1`` of ``[0, 1]`` images).
    """

    group_count: int = 4  # groups of blocks (a 2x max-pool after each but the last)
    n_hid: int = 256  # width of the first group (doubles per group: 1, 2, 4, 8 x)
    n_blk_per_group: int = 2  # residual blocks per group
    input_channels: int = 3  # C of the input
    vocab_size: int = 8192  # codes (output channels)
    image_size: int = 112  # S of the input (divisible by 2**(group_count - 1))

    def __post_init__(self) -> None:
        check_sizes(self, group_count=self.group_count, n_hid=self.n_hid, n_blk_per_group=self.n_blk_per_group,
                    input_channels=self.input_channels, vocab_size=self.vocab_size, image_size=self.image_size)
        if self.group_count != 4:
            raise ValueError(f"DalleEncoder: group_count: expected 4 (the published layout), got {self.group_count}")
        if self.image_size % 8:
            raise ValueError(f"DalleEncoder: image_size: expected a multiple of 8, got {self.image_size}")

    @property
    def grid(self) -> int:
        """Codes per side: ``image_size / 8``."""
        return self.image_size // 8

    def _widths(self) -> list[tuple[int, int]]:
        h = self.n_hid
        return [(1 * h, 1 * h), (1 * h, 2 * h), (2 * h, 4 * h), (4 * h, 8 * h)]

    def init(self, *, key: Tensor) -> Params:
        keys = iter(pr.split(key, 2 + self.group_count * self.n_blk_per_group * 5))
        blocks: Params = {"input": _conv_init(next(keys), self.input_channels, self.n_hid, 7)}
        for g, (n_in, n_out) in enumerate(self._widths(), 1):
            group = {}
            for i in range(self.n_blk_per_group):
                a = n_in if i == 0 else n_out
                hid = n_out // 4
                blk: Params = {}
                k = next(keys)
                if a != n_out:
                    blk["id_path"] = _conv_init(k, a, n_out, 1)
                blk["res_path"] = {"conv_1": _conv_init(next(keys), a, hid, 3), "conv_2": _conv_init(next(keys), hid, hid, 3),
                                   "conv_3": _conv_init(next(keys), hid, hid, 3), "conv_4": _conv_init(next(keys), hid, n_out, 1)}
                group[f"block_{i + 1}"] = blk
            blocks[f"group_{g}"] = group
        blocks["output"] = {"conv": _conv_init(next(keys), 8 * self.n_hid, self.vocab_size, 1)}
        return {"blocks": blocks}

    def _check(self, x: Tensor) -> None:
        check_floating(x, "images", self)
        want = (self.input_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"DalleEncoder: images: expected shape (B, {', '.join(map(str, want))}), "
                             f"got {tuple(x.shape)}")

    def __call__(self, params: Params, images: Tensor) -> Tensor:
        self._check(images)
        b = params["blocks"]
        gain = 1.0 / (self.group_count * self.n_blk_per_group) ** 2
        # channels-last activations: oneDNN's convolutions run the narrow stacks (the tiny presets' widths)
        # about a quarter faster in this layout, and no slower at the published width.
        x = _conv(b["input"], images.contiguous(memory_format=torch.channels_last))
        for g in range(1, self.group_count + 1):
            for i in range(self.n_blk_per_group):
                blk = b[f"group_{g}"][f"block_{i + 1}"]
                ident = _conv(blk["id_path"], x) if "id_path" in blk else x
                h = x
                for c in range(1, 5):
                    h = _conv(blk["res_path"][f"conv_{c}"], F.relu(h))
                x = ident + gain * h
            if g < self.group_count:
                x = F.max_pool2d(x, 2)
        return _conv(b["output"]["conv"], F.relu(x))

    def codebook_indices(self, params: Params, images: Tensor) -> Tensor:
        """``(B, S / 8, S / 8)`` int64 codes: the argmax of the logits (computed without a graph)."""
        detached = torch.utils._pytree.tree_map(lambda t: t.detach(), params)
        return self(detached, images.detach()).argmax(1)

    def codebook_probs(self, params: Params, images: Tensor) -> Tensor:
        """``(B, vocab_size, S / 8, S / 8)`` softmax over the codes."""
        return self(params, images).softmax(1)
