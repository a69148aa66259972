"""Caption tokenizer for text-to-video GPT, with MUGEN's padding scheme.

MUGEN's ``TextTokenizer`` (``examples/mugen/generation/text_video_gpt.py``) lower-cases a caption,
appends ``[SEP]``, truncates / pads it to ``context_len`` and replaces each pad at position ``i`` with
the unique id ``vocab_size + i``, so the GPT's input vocabulary is ``vocab_size + context_len``.
MUGEN's vocabulary is a character-BPE tokenizer trained on CoinRun descriptions; the built-in
one here is word-level over the synthetic moving-shapes captions (``polymodal.data.motion``).

>>> tok = CaptionTokenizer.moving_shapes(context_len=8)
>>> ids = tok.encode(["a blue square moves up"])
>>> ids.shape, tok.decode(ids)
(torch.Size([1, 8]), ['a blue square moves up'])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ...data.motion import COLORS, DIRECTIONS, SHAPES

__all__ = ["CaptionTokenizer"]

_SPECIAL = ("[PAD]", "[SEP]", "[UNK]")


class CaptionTokenizer:
    """Word-level ids ``(B, context_len)`` with MUGEN's unique pad ids; ``num_tokens = vocab + context_len``."""

    def __init__(self, words: Sequence[str], context_len: int) -> None:
        if context_len < 2:
            raise ValueError(f"CaptionTokenizer: expected context_len >= 2, got {context_len}")
        self.vocab = list(_SPECIAL) + [w for w in dict.fromkeys(words) if w not in _SPECIAL]
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.context_len = context_len

    @classmethod
    def moving_shapes(cls, context_len: int = 8) -> CaptionTokenizer:
        """The vocabulary of ``MovingShapes`` captions ("a red circle moves left", "an orange ring ...")."""
        return cls(["a", "an", "moves", *COLORS, *SHAPES, *DIRECTIONS], context_len)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def num_tokens(self) -> int:
        """The GPT's input vocabulary: words plus one pad id per position."""
        return self.vocab_size + self.context_len

    def words(self, caption: str) -> list[int]:
        return [self.index.get(w, self.index["[UNK]"]) for w in caption.strip().lower().split()] + [self.index["[SEP]"]]

    def encode(self, captions: Sequence[str], *, strict: bool = False) -> Tensor:
        """``(B, context_len)`` int64; ``strict``: a caption longer than the context is an error
        (else truncated, as MUGEN)."""
        rows = []
        for c in captions:
            ids = self.words(c)
            if strict and len(ids) > self.context_len:
                raise ValueError(f"CaptionTokenizer: the prompt {c!r} is {len(ids)} tokens with [SEP]; the text "
                                 f"context holds at most {self.context_len}")
            ids = ids[: self.context_len]
            rows.append(ids + [self.vocab_size + i for i in range(len(ids), self.context_len)])
        return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), self.context_len)

    def decode(self, ids: Tensor) -> list[str]:
        """Captions back from ids (pads and ``[SEP]`` dropped)."""
        out = []
        for row in ids.tolist():
            out.append(" ".join(self.vocab[i] for i in row if i < self.vocab_size and self.vocab[i] not in _SPECIAL))
        return out
