"""CLIP's text tower: a thin wrapper over the shared causal text transformer.

The shared :class:`~polymodal.core.encoders.text.TextTransformer` gives token + learned position
embeddings, causal QuickGELU blocks (through the block seam), ``ln_final`` and the hidden state
at the end-of-text token (CLIP's highest id, found by argmax); CLIP adds a linear projection,
OpenAI's initialisation and :func:`trim_padding` (Radford et al. 2021, section 2.4). Params (the
shared encoder's, plus ``text_projection``)::

    token_embedding: {weight (V, D)}, positional_embedding (T, D),
    transformer: {layers: [torch.nn.TransformerEncoderLayer names] * L},
    ln_final: {weight, bias}, text_projection (D, E)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ...core import random as pr
from ...core.encoders.text import TextTransformer, text_transformer
from ...core.pytree import Params
from ...core.spec import Spec
from .vision import ACTIVATIONS, check_positive

__all__ = ["CLIPTextTransformer", "clip_text_transformer", "openai_block_init", "trim_padding"]


def trim_padding(tokens: Tensor, multiple_of: int | None = None) -> Tensor:
    """``tokens (B, T)`` without the columns after the last position the text tower pools from.

    CLIP pools each row at its end-of-text token, the first position of its largest id
    (``argmax``), and attention is causal: the trimmed batch gives the same embeddings at a cost
    that falls with the length (captions and prompts use 10 to 20 of the 77 positions). The
    length is read on the host, so trim before moving tokens to a GPU (in a ``DataLoader``'s
    ``collate_fn``, say); ``multiple_of`` rounds it up, which bounds the shapes that
    ``torch.compile`` sees.

    >>> trim_padding(torch.tensor([[49406, 320, 49407, 0, 0, 0], [49406, 49407, 0, 0, 0, 0]]))
    tensor([[49406,   320, 49407],
            [49406, 49407,     0]])
    """
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        got = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"trim_padding: tokens: expected shape (B, T), got {got}")
    if multiple_of is not None and (not isinstance(multiple_of, int) or multiple_of < 1):
        raise ValueError(f"trim_padding: multiple_of: expected a positive int or None, got {multiple_of!r}")
    t = tokens.shape[1]
    if tokens.shape[0] == 0 or t == 0:
        return tokens
    n = int(tokens.argmax(-1).max()) + 1
    if multiple_of is not None:
        n = min(t, -(-n // multiple_of) * multiple_of)
    return tokens[:, :n]


def openai_block_init(layers: list[Params], width: int, *, key: Tensor) -> list[Params]:
    """OpenAI's ``initialize_parameters`` for a stack of blocks: ``N(0, std)`` weights with
    ``attn_std = D**-0.5`` (qkv), ``proj_std = D**-0.5 * (2L)**-0.5`` (attention output and second
    feed-forward), ``fc_std = (2D)**-0.5`` (first feed-forward); biases unchanged."""
    n = len(layers)
    attn_std, proj_std, fc_std = width**-0.5, width**-0.5 * (2 * n) ** -0.5, (2 * width) ** -0.5
    out = []
    for p, k in zip(layers, pr.split(key, n) if n else []):
        kq, ko, k1, k2 = pr.split(k, 4)
        p = dict(p)
        sa = dict(p["self_attn"])
        sa["in_proj_weight"] = pr.normal(kq, sa["in_proj_weight"].shape) * attn_std
        sa["out_proj"] = {**sa["out_proj"], "weight": pr.normal(ko, sa["out_proj"]["weight"].shape) * proj_std}
        p["self_attn"] = sa
        p["linear1"] = {**p["linear1"], "weight": pr.normal(k1, p["linear1"]["weight"].shape) * fc_std}
        p["linear2"] = {**p["linear2"], "weight": pr.normal(k2, p["linear2"]["weight"].shape) * proj_std}
        out.append(p)
    return out


def clip_text_transformer(*, context_length: int = 77, vocab_size: int = 49408, width: int = 512, heads: int = 8,
                          layers: int = 12, mlp_ratio: float = 4.0, activation: str = "quick_gelu",
                          layer_norm_eps: float = 1e-5, embed_dim: int = 512) -> CLIPTextTransformer:
    """CLIP's text tower (the defaults are ViT-B/32's): the shared causal text transformer pooled at
    the row's largest id (CLIP's end-of-text), with ``ln_final``. Heads are width / 64 in OpenAI's
    models; ``activation``: ``"quick_gelu"`` (OpenAI's weights) or ``"gelu"``."""
    name = "clip_text_transformer"
    check_positive(name, context_length=context_length, vocab_size=vocab_size, width=width, heads=heads,
                   layers=layers, mlp_ratio=mlp_ratio, embed_dim=embed_dim)
    if width % heads:
        raise ValueError(f"{name}: width ({width}) must be divisible by heads ({heads})")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name}: activation: expected one of {ACTIVATIONS}, got {activation!r}")
    encoder = text_transformer(vocab_size=vocab_size, context_length=context_length, width=width, layers=layers,
                               heads=heads, mlp_dim=int(width * mlp_ratio), activation=activation,
                               layer_norm_eps=layer_norm_eps)
    return CLIPTextTransformer(encoder, embed_dim)


@dataclass(frozen=True)
class CLIPTextTransformer(Spec):
    """CLIP text encoder: ``tokens (B, T) int -> (B, embed_dim)`` (unnormalised features).

    ``1 <= T <= context_length``: attention is causal, so rows cut after their end-of-text token
    (:func:`trim_padding`) give the same embeddings as padded ones.

    >>> import torch
    >>> from polymodal.core import random as pr
    >>> enc = clip_text_transformer(context_length=8, vocab_size=100, width=32, heads=2, layers=2, embed_dim=16)
    >>> tokens = torch.tensor([[98, 5, 7, 99, 0, 0, 0, 0]])
    >>> enc(enc.init(key=pr.key(0)), tokens).shape
    torch.Size([1, 16])
    """

    encoder: TextTransformer  # causal blocks, end-of-text pooling (largest id), ln_final
    embed_dim: int  # output size (the joint embedding)

    def __post_init__(self) -> None:
        name, e = type(self).__name__, self.encoder
        if not e.transformer.layer.is_causal or e.pool != "eot" or e.eot_id is not None or not e.final_norm:
            raise ValueError(f"{name}: encoder: expected causal blocks, pool='eot' at the largest id and ln_final, "
                             f"got is_causal={e.transformer.layer.is_causal}, pool={e.pool!r}, eot_id={e.eot_id}, "
                             f"final_norm={e.final_norm}")
        check_positive(name, embed_dim=self.embed_dim)

    @property
    def context_length(self) -> int:
        return self.encoder.context_length

    @property
    def width(self) -> int:
        return self.encoder.width

    def block_stacks(self) -> list[str]:
        return self.encoder.block_stacks()  # the encoder's subtrees sit at this tower's top level

    def init(self, *, key: Tensor) -> Params:
        e, d = self.encoder, self.width
        k_tok, k_pos, k_tr, k_blocks, k_proj = pr.split(key, 5)
        tr = e.transformer.init(key=k_tr)
        tr["layers"] = openai_block_init(tr["layers"], d, key=k_blocks)
        return {
            "token_embedding": {"weight": pr.normal(k_tok, (e.token_embedding.num_embeddings, d)) * 0.02},
            "positional_embedding": pr.normal(k_pos, (e.context_length, d)) * 0.01,
            "transformer": tr,
            "ln_final": e.norm().init(key=key),
            "text_projection": pr.normal(k_proj, (d, self.embed_dim)) * d**-0.5,
        }

    def hidden_states(self, params: Params, tokens: Tensor) -> Tensor:
        """Per-token states after ``ln_final``: ``(B, T, D)``, ``T <= context_length``."""
        return self.encoder(params, tokens).last_hidden_state

    def __call__(self, params: Params, tokens: Tensor) -> Tensor:
        """``tokens (B, T)`` -> ``(B, embed_dim)``: the end-of-text state, projected; the last block
        computes that position only."""
        return self.encoder(params, tokens, pooled_only=True).pooled @ params["text_projection"]
