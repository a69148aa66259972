"""CLIP's byte-level BPE tokenizer, with the BPE in the Rust ``tokenizers`` library.

Ids equal OpenAI CLIP's / open_clip's ``SimpleTokenizer``: the same text cleaning, the same
pre-tokenization regex (run by the ``regex`` package that open_clip uses, when installed), the
same vocabulary and truncation. Without ``regex``, Oniguruma (inside ``tokenizers``) splits
instead; it agrees except on characters newer than its unicode tables. The BPE of the words of a
batch runs in one ``tokenizers`` batch call, and words are cached (as open_clip caches them), so
the Python side of a batch is text cleaning, regex splitting and dictionary look-ups.

The merges file ``bpe_simple_vocab_16e6.txt.gz`` is taken from, in order: the
``merges_path`` argument; an installed ``open_clip`` package (it ships the file; the package
is located, not imported); the hub's cache (:func:`polymodal.hub.cache_dir`, default
``~/.cache/polymodal``), downloading it there through :func:`polymodal.hub.fetch` from OpenAI's
CLIP repository (sha256 checked; ``$POLYMODAL_HUB_MIRROR`` first) when it is missing.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import numbers
import operator
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from .. import hub

try:  # open_clip cleans with ftfy; without it, broken unicode (mojibake) is left as is
    import ftfy
except ImportError:  # pragma: no cover - ftfy comes with open_clip
    ftfy = None
try:  # open_clip splits with `regex`; Oniguruma (in tokenizers) has older unicode tables
    import regex
except ImportError:  # pragma: no cover - regex comes with open_clip
    regex = None

MERGES_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
MERGES_URL = "https://github.com/openai/CLIP/raw/main/clip/simple_tokenizer/" + MERGES_FILENAME
MERGES_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
# open_clip's SimpleTokenizer pattern, compiled there with IGNORECASE (which matters for the
# few characters that case-fold into ASCII after lower-casing, e.g. "'\u017f" matches "'s").
PATTERN = r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
_NUM_MERGES = 49152 - 256 - 2  # OpenAI CLIP keeps the first 48894 merges of the file
_CACHE_SIZE = 1 << 18  # words; the word -> ids cache is cleared when it would grow past this


@functools.lru_cache
def _splitter():
    if regex is not None:
        return regex.compile(PATTERN, regex.IGNORECASE).findall
    # Fallback: the same pattern in Oniguruma; "removed" + invert keeps only the matches, like
    # findall. Characters newer than its unicode tables may be split differently from open_clip.
    split = pre_tokenizers.Split(Regex("(?i)" + PATTERN), behavior="removed", invert=True)
    return lambda text: [w for w, _ in split.pre_tokenize_str(text)]


def pre_tokenize(text: str) -> list[str]:
    """Split cleaned text into the words BPE sees, as open_clip does.

    >>> pre_tokenize("it's 2 cats!!")
    ['it', "'s", '2', 'cats', '!!']
    """
    return _splitter()(text)


@functools.lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clean_text(text: str) -> str:
    """open_clip's ``clean="lower"``: ftfy fix, html unescape twice, fold whitespace, lower-case.

    >>> clean_text("  A &amp;amp; B\\n\\tC ")
    'a & b c'
    """
    # ftfy leaves printable ASCII without "&" unchanged (no mojibake, entities, controls,
    # ligatures or curly quotes to fix), so most captions skip its cost.
    if ftfy is not None and not (text.isascii() and text.isprintable() and "&" not in text):
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


def _open_clip_merges() -> Path | None:
    """The copy shipped inside an installed open_clip (found without importing open_clip)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / MERGES_FILENAME
        if path.is_file():
            return path
    return None


def find_merges_file(merges_path: str | os.PathLike | None = None) -> Path:
    """Locate (and if needed download) CLIP's BPE merges file; see the module docstring.

    Raises:
        FileNotFoundError: ``merges_path`` does not exist, or no copy was found and the download
            failed; the message names the file, the URL and where to put it.
    """
    if merges_path is not None:
        path = Path(merges_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"CLIPTokenizer: merges_path: no such file: '{path}'")
        return path
    path = _open_clip_merges()
    if path is not None:
        return path
    try:
        return hub.fetch(MERGES_FILENAME, MERGES_URL, MERGES_SHA256, progress=False,
                         hint="or pass merges_path=..., or install open_clip (it ships the file)")
    except (RuntimeError, ValueError) as e:  # offline, or only wrong bytes came back
        raise FileNotFoundError(f"CLIPTokenizer: could not find the BPE merges file '{MERGES_FILENAME}' and could "
                                f"not download it: {e}") from e


def _build(merges_path: Path) -> tuple[Tokenizer, list[str]]:
    """A word -> ids BPE ``Tokenizer`` with CLIP's vocabulary, and CLIP's id -> string table."""
    try:
        with gzip.open(merges_path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1 : _NUM_MERGES + 1]
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise ValueError(f"CLIPTokenizer: '{merges_path}' is not CLIP's {MERGES_FILENAME} ({e})") from e
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(
            f"CLIPTokenizer: '{merges_path}' is not CLIP's {MERGES_FILENAME}: expected {_NUM_MERGES} "
            f"merges after the header line, got {len(merges)}"
        )
    chars = list(bytes_to_unicode().values())
    strings = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    strings += [SOT_TOKEN, EOT_TOKEN]
    vocab = {s: i for i, s in enumerate(strings)}
    if len(vocab) != len(strings):
        raise ValueError(f"CLIPTokenizer: '{merges_path}' has duplicate merges")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>"))
    # Input words come pre-split; map their utf-8 bytes to CLIP's byte characters.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return tok, strings


class CLIPTokenizer:
    """CLIP's tokenizer: text -> ``<start_of_text> ids <end_of_text> 0 0 ...``.

    Args:
        merges_path: path to ``bpe_simple_vocab_16e6.txt.gz``; ``None`` finds it (open_clip's
            copy, else the cache, else a download; see :func:`find_merges_file`).
        context_length: length of the rows returned by ``__call__``; longer texts are truncated
            keeping ``<end_of_text>`` as the last token, shorter ones padded with 0.

    Text is cleaned as open_clip does (ftfy when installed, html unescape twice, whitespace
    folding, lower-casing), so ids equal ``open_clip.tokenize``. A word that is exactly
    ``<start_of_text>`` / ``<end_of_text>`` in the text becomes the special id, as in open_clip.
    Picklable (for DataLoader workers); the word cache is not pickled.

    >>> tok = CLIPTokenizer(context_length=8)
    >>> tok(["a photo of a cat"])
    tensor([[49406,   320,  1125,   539,   320,  2368, 49407,     0]])
    >>> tok.encode("a photo of a cat"), tok.decode(tok.encode("a cat"))
    ([320, 1125, 539, 320, 2368], 'a cat ')
    """

    def __init__(self, merges_path: str | os.PathLike | None = None, context_length: int = 77):
        if not isinstance(context_length, int) or isinstance(context_length, bool) or context_length < 2:
            raise ValueError(
                f"CLIPTokenizer: context_length: expected an int >= 2 (room for the start and end "
                f"tokens), got {context_length!r}"
            )
        self.merges_path = find_merges_file(merges_path)
        self.context_length = context_length
        self._bpe, self._strings = _build(self.merges_path)
        self.vocab_size = len(self._strings)
        self.sot_token_id = self.vocab_size - 2
        self.eot_token_id = self.vocab_size - 1
        self._byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        self._cache = self._fresh_cache()

    def _fresh_cache(self) -> dict[str, list[int]]:
        return {SOT_TOKEN: [self.sot_token_id], EOT_TOKEN: [self.eot_token_id]}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": self._fresh_cache()}

    def __repr__(self) -> str:
        return f"CLIPTokenizer(merges_path='{self.merges_path}', context_length={self.context_length})"

    def _encode_words(self, words: list[list[str]]) -> list[list[int]]:
        """Ids of each pre-tokenized text; unseen words go through BPE in one batch call."""
        cache = self._cache
        new = {w for ws in words for w in ws if w not in cache}
        if len(cache) + len(new) > _CACHE_SIZE:
            cache = self._cache = self._fresh_cache()
            new = {w for ws in words for w in ws if w not in cache}
        if new:
            new = sorted(new)
            encodings = self._bpe.encode_batch_fast([[w] for w in new], is_pretokenized=True)
            cache.update(zip(new, (e.ids for e in encodings)))
        return [[i for w in ws for i in cache[w]] for ws in words]

    def encode(self, text: str) -> list[int]:
        """Ids of one text, without start/end tokens and without truncation.

        >>> CLIPTokenizer().encode("Hello  World!")
        [3306, 1002, 256]
        """
        if not isinstance(text, str):
            raise TypeError(f"CLIPTokenizer.encode: text: expected str, got {type(text).__name__}")
        return self._encode_words([pre_tokenize(clean_text(text))])[0]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of a sequence of ids, as open_clip decodes it (``</w>`` becomes a space).

        Special and padding ids are decoded too (``0`` is ``"!"``): strip them first.

        >>> CLIPTokenizer().decode([3306, 1002, 256])
        'hello world ! '
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"CLIPTokenizer.decode: ids: expected shape (T,), got {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = [operator.index(i) if isinstance(i, numbers.Integral) else i for i in ids]
        bad = [i for i in ids if type(i) is not int or not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"CLIPTokenizer.decode: ids: expected ints in [0, {self.vocab_size}), got {bad[:5]!r}")
        text = "".join(self._strings[i] for i in ids)
        data = bytearray(self._byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts: str | Sequence[str], *, padding: str = "max_length",
                 pad_to_multiple_of: int | None = None) -> torch.Tensor:
        """Tokenize, add start/end tokens, truncate and pad.

        Args:
            texts: one string or a sequence of N strings.
            padding: ``"max_length"`` pads every row to ``context_length`` (CLIP's and open_clip's
                layout); ``"longest"`` to the longest row of this call, which polymodal's text tower
                takes as it is (same embeddings, less work; see ``models.clip.trim_padding``).
            pad_to_multiple_of: with ``"longest"``, round the length up to a multiple of this
                (at most ``context_length``): fewer distinct shapes for ``torch.compile``.

        Returns:
            ``LongTensor`` of shape ``(N, context_length)``, or ``(N, T)`` with ``T <= context_length``
            for ``"longest"`` (``N = 1`` for a single string).
        """
        if padding not in ("max_length", "longest"):
            raise ValueError(f"CLIPTokenizer: padding: expected 'max_length' or 'longest', got {padding!r}")
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"CLIPTokenizer: pad_to_multiple_of: expected a positive int or None, "
                             f"got {pad_to_multiple_of!r}")
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
            got = type(texts).__name__ if not isinstance(texts, Sequence) else (
                "a sequence holding " + ", ".join(sorted({type(t).__name__ for t in texts}))
            )
            raise TypeError(f"CLIPTokenizer: texts: expected str or a list of str, got {got}")
        n = self.context_length
        words = [pre_tokenize(clean_text(t)) for t in texts]
        # open_clip: [sot] + ids + [eot], cut to context_length, last id set to eot.
        rows = [[self.sot_token_id, *ids[: n - 2], self.eot_token_id] for ids in self._encode_words(words)]
        width = n
        if padding == "longest":
            width = max((len(r) for r in rows), default=2)
            if pad_to_multiple_of is not None:
                width = min(n, -(-width // pad_to_multiple_of) * pad_to_multiple_of)
        out = np.zeros((len(texts), width), dtype=np.int64)
        for row, ids in zip(out, rows):
            row[: len(ids)] = ids
        return torch.from_numpy(out)
