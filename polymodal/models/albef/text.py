"""Text for ALBEF's synthetic tasks: the WordPiece vocabulary of the rendered-shape captions, questions and
answers (every word a whole token), and BERT's masked-LM corruption with an explicit key.

>>> tok = synthetic_tokenizer(max_length=16)
>>> enc = tok(["a red circle on the left"])
>>> tok.tokenizer.decode(enc["input_ids"][0].tolist())
'a red circle on the left'
>>> import torch
>>> from polymodal.core import random as pr
>>> ids, labels = mask_tokens(pr.key(0), enc["input_ids"], tok, prob=1.0)
>>> bool((labels[0, 1:-1] == enc["input_ids"][0, 1:-1]).all()), int(labels[0, 0])
(True, -100)
"""

from __future__ import annotations

import functools
import re

import torch
from torch import Tensor

from ...core import random as pr
from ...data.bert_tokenizer import BertTokenizer
from ...data.synthetic import COLORS, POSITIONS, SHAPES, SIZES, TEMPLATES

__all__ = ["SPECIALS", "COUNTS", "QUESTION_WORDS", "synthetic_vocab", "synthetic_tokenizer", "mask_tokens"]

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
COUNTS = ("one", "two", "three")
QUESTION_WORDS = ("what", "color", "shape", "size", "how", "many", "shapes", "are", "is", "the", "there", "picture",
                  "in", "it", "which", "kind", "of")
_PLACES = ("on the left", "on the right", "at the top", "at the bottom", "in the center")


@functools.lru_cache(maxsize=1)
def synthetic_vocab() -> dict[str, int]:
    """Specials, then every word of the caption templates, attributes, questions and answers (sorted)."""
    words = {"an"} | set(SHAPES) | set(COLORS) | set(SIZES) | set(POSITIONS) | set(COUNTS) | set(QUESTION_WORDS)
    for t in TEMPLATES:
        words |= set(re.sub(r"\{\w+\}", " ", t).split())
    for p in _PLACES:
        words |= set(p.split())
    return {w: i for i, w in enumerate((*SPECIALS, *sorted(words)))}


def synthetic_tokenizer(max_length: int = 32) -> BertTokenizer:
    """A :class:`~polymodal.data.BertTokenizer` over :func:`synthetic_vocab` (lower case)."""
    return BertTokenizer(synthetic_vocab(), max_length=max_length)


def mask_tokens(key: Tensor, input_ids: Tensor, tokenizer: BertTokenizer, prob: float = 0.15) -> tuple[Tensor, Tensor]:
    """BERT's corruption (Devlin et al. 2019, Section 3.1; ALBEF's ``mask``): each real token other than
    [CLS] is chosen with ``prob``; of those 80% become [MASK], 10% a random token, 10% stay.

    Returns:
        ``(masked_ids, labels)`` ``(B, T)``: labels hold the original ids where chosen, -100 elsewhere.
    """
    k1, k2, k3 = pr.split(key, 3)
    shape = input_ids.shape
    chosen = (pr.uniform(k1, shape) < prob) & (input_ids != tokenizer.pad_id) & (input_ids != tokenizer.cls_id)
    labels = input_ids.masked_fill(~chosen, -100)
    r = pr.uniform(k2, shape)
    ids = torch.where(chosen & (r < 0.8), torch.full_like(input_ids, tokenizer.mask_id), input_ids)
    rand = pr.randint(k3, shape, len(SPECIALS), tokenizer.vocab_size)
    ids = torch.where(chosen & (r >= 0.8) & (r < 0.9), rand, ids)
    return ids, labels
