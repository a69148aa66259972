"""CLIP's text tower: a causal pre-norm transformer pooled at the end-of-text token.

Token + learned position embeddings, causal QuickGELU blocks (through the block seam),
``ln_final``, the hidden state at the end-of-text token (CLIP's highest id, found by argmax),
and a linear projection (Radford et al. 2021, section 2.4). Params::

    token_embedding: {weight (V, D)}, positional_embedding (T, D),
    transformer: {layers: [torch.nn.TransformerEncoderLayer names] * L},
    ln_final: {weight, bias}, text_projection (D, E)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ...core import random as pr
from ...core.layers.embedding import Embedding
from ...core.layers.norm import LayerNorm
from ...core.layers.transformer import TransformerEncoder
from ...core.pytree import Params
from ...core.spec import Spec, check_dtype
from .config import TextConfig
from .vision import clip_blocks

__all__ = ["TextTransformer", "openai_block_init", "trim_padding"]

_INT = (torch.int64, torch.int32)


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


@dataclass(frozen=True)
class TextTransformer(Spec):
    """CLIP text encoder: ``tokens (B, T) int -> (B, embed_dim)`` (unnormalised features).

    ``T`` must equal ``context_length`` (pad with :class:`~polymodal.data.CLIPTokenizer`).

    >>> import torch
    >>> from polymodal.core import random as pr
    >>> enc = TextTransformer(TextConfig(context_length=8, vocab_size=100, width=32, heads=2, layers=2), 16)
    >>> tokens = torch.tensor([[98, 5, 7, 99, 0, 0, 0, 0]])
    >>> enc(enc.init(key=pr.key(0)), tokens).shape
    torch.Size([1, 16])
    """

    config: TextConfig = field(default_factory=TextConfig)  # the architecture
    embed_dim: int = 512  # output size (the joint embedding)

    def token_embedding(self) -> Embedding:
        return Embedding(self.config.vocab_size, self.config.width)

    def norm(self) -> LayerNorm:
        return LayerNorm(self.config.width, eps=self.config.layer_norm_eps)

    def transformer(self) -> TransformerEncoder:
        return clip_blocks(self.config, is_causal=True)

    def block_stacks(self) -> list[str]:
        return [f"transformer.{s}" for s in self.transformer().block_stacks()]

    def init(self, *, key: Tensor) -> Params:
        c = self.config
        k_tok, k_pos, k_tr, k_blocks, k_proj = pr.split(key, 5)
        tr = self.transformer().init(key=k_tr)
        tr["layers"] = openai_block_init(tr["layers"], c.width, key=k_blocks)
        return {
            "token_embedding": {"weight": pr.normal(k_tok, (c.vocab_size, c.width)) * 0.02},
            "positional_embedding": pr.normal(k_pos, (c.context_length, c.width)) * 0.01,
            "transformer": tr,
            "ln_final": self.norm().init(key=key),
            "text_projection": pr.normal(k_proj, (c.width, self.embed_dim)) * c.width**-0.5,
        }

    def check_tokens(self, tokens: Tensor) -> None:
        name = type(self).__name__
        check_dtype(tokens, f"{name}: tokens", _INT)
        t = self.config.context_length
        if tokens.dim() != 2 or not 1 <= tokens.shape[1] <= t:
            raise ValueError(f"{name}: tokens: expected shape (B, T) with 1 <= T <= {t} (context_length {t}), "
                             f"got {tuple(tokens.shape)}")

    def hidden_states(self, params: Params, tokens: Tensor, *, select: Tensor | None = None) -> Tensor:
        """Per-token states after ``ln_final``: ``(B, T, D)``; with ``select`` (``(B,)`` positions)
        the last block computes those positions only: ``(B, 1, D)``.

        ``T`` may be below ``context_length`` (positions ``0..T-1``): attention is causal, so a row's
        states up to its end-of-text token are the same whatever padding follows; see
        :func:`trim_padding`."""
        self.check_tokens(tokens)
        positions = params["positional_embedding"][: tokens.shape[1]]
        x = self.token_embedding()(params["token_embedding"], tokens) + positions
        x = self.transformer()(params["transformer"], x, select=select).last_hidden_state
        return self.norm()(params["ln_final"], x)

    def __call__(self, params: Params, tokens: Tensor) -> Tensor:
        """``tokens (B, T)`` -> ``(B, embed_dim)``: the end-of-text state, projected."""
        eot = tokens.argmax(-1)  # the end-of-text token has the largest id (CLIP's convention)
        return self.hidden_states(params, tokens, select=eot)[..., 0, :] @ params["text_projection"]
