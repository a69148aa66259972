"""FLAVA's image tower (the shared ViT + a tanh pooler) and its multimodal encoder (class token, blocks,
LayerNorm, pooler), as TorchMultimodal's ``ImageTransformer`` / ``FLAVATransformerWithoutEmbeddings``.

Both return :class:`TowerOutput` (TorchMultimodal's ``TransformerOutput`` fields): the final states after
the LayerNorm, the pooled first token, and the block inputs / outputs (``hidden_states[-1]`` is the last
block's output *before* the LayerNorm: what FLAVA feeds the multimodal encoder). Params::

    FLAVAImageEncoder:       embeddings, transformer (the ViT's; transformer.norm = the final LayerNorm), pooler.dense
    FLAVAMultimodalEncoder:  cls_token (1, 1, D), encoder.layers, layernorm, pooler.dense

>>> import torch
>>> from polymodal.core import random as pr
>>> from polymodal.core.layers import TransformerEncoder, TransformerEncoderLayer
>>> mm = FLAVAMultimodalEncoder(TransformerEncoder(TransformerEncoderLayer(16, 2, 32, norm_first=True), 2))
>>> out = mm(mm.init(key=pr.key(0)), torch.randn(2, 5, 16), torch.tensor([[1, 1, 1, 0, 0], [1] * 5]))
>>> out.last_hidden_state.shape, out.pooler_output.shape
(torch.Size([2, 6, 16]), torch.Size([2, 16]))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from ...core import random as pr
from ...core.encoders.vit import VisionTransformer
from ...core.layers.linear import Linear
from ...core.layers.norm import LayerNorm
from ...core.layers.transformer import TransformerEncoder
from ...core.pytree import Params
from ...core.spec import Spec, check_floating

__all__ = ["TowerOutput", "FLAVAImageEncoder", "FLAVAMultimodalEncoder", "tanh_pooler"]


class TowerOutput(NamedTuple):
    """``last_hidden_state (B, T, D)`` after the final LayerNorm; ``pooler_output (B, D)``: tanh(dense(first
    token)); ``hidden_states``: the first block's input and every block's output (before the LayerNorm)."""

    last_hidden_state: Tensor
    pooler_output: Tensor | None
    hidden_states: tuple[Tensor, ...] | None = None


def tanh_pooler(params: Params, x: Tensor) -> Tensor:
    """``tanh(dense(x[..., 0, :]))``: BERT's / FLAVA's pooler; ``params = {"dense": {weight, bias}}``."""
    d = params["dense"]
    return torch.tanh(torch.nn.functional.linear(x[..., 0, :], d["weight"], d["bias"]))


def _pooler_init(key: Tensor, d: int, std: float) -> Params:
    return {"dense": Linear(d, d, weight_init="normal", init_std=std).init(key=key)}


@dataclass(frozen=True)
class FLAVAImageEncoder(Spec):
    """``images (B, C, H, W) [, patch_mask (B, N)] -> TowerOutput`` over the shared ViT (its pre-norm blocks
    and final LayerNorm, ``pool="cls"``, mask token), plus the tanh pooler on the class token."""

    vit: VisionTransformer  # patch embedding with the mask token, pre-norm blocks, final LayerNorm
    init_std: float = 0.02  # N(0, std) init of the pooler

    @property
    def width(self) -> int:
        return self.vit.width

    @property
    def num_patches(self) -> int:
        return self.vit.embeddings.num_patches

    def init(self, *, key: Tensor) -> Params:
        kv, kp = pr.split(key, 2)
        return {**self.vit.init(key=kv), "pooler": _pooler_init(kp, self.width, self.init_std)}

    def block_stacks(self) -> list[str]:
        return self.vit.block_stacks()

    def __call__(self, params: Params, images: Tensor, patch_mask: Tensor | None = None, *,
                 key: Tensor | None = None) -> TowerOutput:
        out = self.vit(params, images, patch_mask, key=key, return_hidden_states=True)
        x = out.last_hidden_state
        return TowerOutput(x, tanh_pooler(params["pooler"], x), out.hidden_states)


@dataclass(frozen=True)
class FLAVAMultimodalEncoder(Spec):
    """``hidden_states (B, S, D) [, attention_mask (B, S)] -> TowerOutput`` of ``(B, 1 + S, D)``: a learned
    class token prepended, pre-norm blocks, a LayerNorm, the tanh pooler.

    ``attention_mask`` (1 = real, 0 = padding) covers the *input* positions; the class token is always
    attended (TorchMultimodal's bug #533: its mask and the class-token-extended sequence differ in length).
    """

    encoder: TransformerEncoder  # pre-norm blocks (no final norm in the stack: ``layernorm`` is ours)
    init_std: float = 0.02  # N(0, std) init of the pooler

    def __post_init__(self) -> None:
        if self.encoder.final_norm:
            raise ValueError("FLAVAMultimodalEncoder: encoder: expected final_norm=False (the LayerNorm is the "
                             "multimodal encoder's own 'layernorm')")

    @property
    def width(self) -> int:
        return self.encoder.layer.d_model

    def norm(self) -> LayerNorm:
        lay = self.encoder.layer
        return LayerNorm(self.width, eps=lay.layer_norm_eps, fp32=lay.fp32_norm)

    def init(self, *, key: Tensor) -> Params:
        ke, kp = pr.split(key, 2)
        return {"cls_token": torch.zeros(1, 1, self.width), "encoder": self.encoder.init(key=ke),
                "layernorm": self.norm().init(key=key), "pooler": _pooler_init(kp, self.width, self.init_std)}

    def __call__(self, params: Params, hidden_states: Tensor, attention_mask: Tensor | None = None, *,
                 key: Tensor | None = None) -> TowerOutput:
        name = type(self).__name__
        check_floating(hidden_states, "hidden_states", self)
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.width:
            raise ValueError(f"{name}: hidden_states: expected shape (B, S, {self.width}), "
                             f"got {tuple(hidden_states.shape)}")
        pad = None
        if attention_mask is not None:
            if tuple(attention_mask.shape) != tuple(hidden_states.shape[:2]):
                raise ValueError(f"{name}: attention_mask: expected shape {tuple(hidden_states.shape[:2])} (B, S of "
                                 f"hidden_states, without the class token), got {tuple(attention_mask.shape)}")
            real = attention_mask.bool()
            pad = ~torch.cat([real.new_ones(real.shape[0], 1), real], dim=1)
        b = hidden_states.shape[0]
        cls = params["cls_token"].reshape(1, 1, self.width).to(hidden_states.dtype).expand(b, 1, self.width)
        x = torch.cat([cls, hidden_states], dim=1)
        out = self.encoder(params["encoder"], x, key_padding_mask=pad, key=key, return_hidden_states=True)
        h = self.norm()(params["layernorm"], out.last_hidden_state)
        return TowerOutput(h, tanh_pooler(params["pooler"], h), out.hidden_states)
