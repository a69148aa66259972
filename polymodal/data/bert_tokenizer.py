"""BERT's WordPiece and RoBERTa's byte-level BPE tokenizers, on the Rust ``tokenizers`` library.

Built exactly as Hugging Face's fast tokenizers are (``BertTokenizerFast``: ``BertNormalizer`` with
the lower-casing / accent / CJK options, ``BertPreTokenizer``, ``WordPiece``, ``[CLS] A [SEP] B [SEP]``
with token types 0 / 1; ``RobertaTokenizerFast``: ``ByteLevel`` + ``BPE`` + ``<s> A </s></s> B </s>``),
so ids, token types and attention masks are theirs; nothing is hand-written and nothing is downloaded.
Files come from a local Hugging Face model folder (``vocab.txt`` or ``tokenizer.json``;
``vocab.json`` + ``merges.txt``); a missing one is an error naming it and where to put it.

>>> tok = BertTokenizer({"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4, "hello": 5, "world": 6})
>>> out = tok(["Hello world", "hello"])
>>> out["input_ids"].tolist(), out["attention_mask"].tolist()
([[2, 5, 6, 3], [2, 5, 3, 0]], [[1, 1, 1, 1], [1, 1, 1, 0]])
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

__all__ = ["BertTokenizer", "RobertaTokenizer", "load_tokenizer"]

_WHERE = ("it ships with the Hugging Face model (e.g. `huggingface-cli download bert-base-uncased {f} "
          "--local-dir DIR`); put it in the model folder and pass that folder")


def _need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no vocabulary file at '{path}'; "
                                + _WHERE.format(f=path.name).replace("bert-base-uncased",
                                                                       "roberta-base" if "Roberta" in what
                                                                       else "bert-base-uncased"))
    return path


def read_vocab_txt(path: str | os.PathLike) -> dict[str, int]:
    """``vocab.txt``: one token a line, its id the line number (as Hugging Face's ``load_vocab``)."""
    vocab: dict[str, int] = {}
    with open(_need(Path(path), "BertTokenizer"), encoding="utf-8") as f:
        for i, line in enumerate(f):
            vocab[line.rstrip("\n")] = i
    return vocab


class _Base:
    """Encoding shared by both: truncation, padding, masks, tensors."""

    tokenizer: Tokenizer
    pad_token: str
    max_length: int
    type_ids: bool = True

    def _id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"{type(self).__name__}: the special token {token!r} is not in the vocabulary "
                             f"({self.vocab_size} tokens)")
        return i

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return self._id(self.pad_token)

    def __call__(self, texts: str | Sequence[str], pairs: str | Sequence[str] | None = None, *,
                 max_length: int | None = None, truncation: bool = True, padding: bool | str = "longest",
                 return_tensors: bool = True) -> dict:
        """``texts`` (and ``pairs``: second segments) -> ``{"input_ids", ["token_type_ids"], "attention_mask"}``.

        ``max_length`` (default the tokenizer's) truncates (longest segment first, as Hugging Face);
        ``padding``: ``"longest"`` (the batch's longest row), ``"max_length"``, or False (lists of rows).
        Tensors are ``(B, T)`` int64 with ``return_tensors`` and padding; lists otherwise.
        """
        single = isinstance(texts, str)
        texts = [texts] if single else list(texts)
        if pairs is not None:
            pairs = [pairs] if isinstance(pairs, str) else list(pairs)
            if len(pairs) != len(texts):
                raise ValueError(f"{type(self).__name__}: expected as many pairs as texts ({len(texts)}), "
                                 f"got {len(pairs)}")
        for what, seq in (("texts", texts), ("pairs", pairs or [])):
            bad = next((i for i, x in enumerate(seq) if not isinstance(x, str)), None)
            if bad is not None:
                raise TypeError(f"{type(self).__name__}: {what}: expected strings, got {type(seq[bad]).__name__} "
                                f"at index {bad}")
        if padding not in ("longest", "max_length", False, True):
            raise ValueError(f"{type(self).__name__}: padding: expected 'longest', 'max_length' or False, "
                             f"got {padding!r}")
        n = self.max_length if max_length is None else max_length
        tok = self.tokenizer
        if truncation:
            tok.enable_truncation(n, strategy="longest_first")
        else:
            tok.no_truncation()
        if padding:
            tok.enable_padding(pad_id=self.pad_id, pad_token=self.pad_token,
                               length=n if padding == "max_length" else None)
        else:
            tok.no_padding()
        batch = tok.encode_batch(list(zip(texts, pairs)) if pairs is not None else texts)
        out = {"input_ids": [e.ids for e in batch]}
        if self.type_ids:
            out["token_type_ids"] = [e.type_ids for e in batch]
        out["attention_mask"] = [e.attention_mask for e in batch]
        if return_tensors and padding:
            out = {k: torch.tensor(v, dtype=torch.long).reshape(len(batch), -1) for k, v in out.items()}
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


class BertTokenizer(_Base):
    """WordPiece with BERT's normaliser: ``vocab`` is a ``{token: id}`` dict or a ``vocab.txt`` path.

    ``lowercase`` (uncased models), ``strip_accents`` (None: follows ``lowercase``, as BERT),
    ``tokenize_chinese_chars`` (CJK characters become words), ``max_length`` (the model's positions).
    """

    def __init__(self, vocab: Mapping[str, int] | str | os.PathLike, *, lowercase: bool = True,
                 strip_accents: bool | None = None, tokenize_chinese_chars: bool = True, max_length: int = 512,
                 unk_token: str = "[UNK]", cls_token: str = "[CLS]", sep_token: str = "[SEP]",
                 pad_token: str = "[PAD]", mask_token: str = "[MASK]") -> None:
        vocab = dict(vocab) if isinstance(vocab, Mapping) else read_vocab_txt(vocab)
        tok = Tokenizer(models.WordPiece(vocab, unk_token=unk_token))
        tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=tokenize_chinese_chars,
                                                    strip_accents=strip_accents, lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        specials = [t for t in (pad_token, unk_token, cls_token, sep_token, mask_token) if t in vocab]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
        self.tokenizer, self.pad_token, self.max_length = tok, pad_token, max_length
        self.cls_id, self.sep_id = self._id(cls_token), self._id(sep_token)
        self.mask_id = vocab.get(mask_token)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls_token}:0 $A:0 {sep_token}:0", pair=f"{cls_token}:0 $A:0 {sep_token}:0 $B:1 {sep_token}:1",
            special_tokens=[(cls_token, self.cls_id), (sep_token, self.sep_id)])

    @classmethod
    def from_directory(cls, directory: str | os.PathLike, **kw) -> BertTokenizer | _FromJSON:
        """A Hugging Face folder: ``tokenizer.json`` when present, else ``vocab.txt`` with the
        ``do_lower_case`` / ``strip_accents`` of ``tokenizer_config.json``."""
        d = Path(directory)
        if (d / "tokenizer.json").is_file():
            return _FromJSON(d / "tokenizer.json", **kw)
        cfg = _config(d)
        kw = {"lowercase": cfg.get("do_lower_case", True), "strip_accents": cfg.get("strip_accents")} | kw
        if isinstance(cfg.get("model_max_length"), int) and cfg["model_max_length"] < 10**6:
            kw.setdefault("max_length", cfg["model_max_length"])
        if not (d / "vocab.txt").is_file():
            raise FileNotFoundError(f"BertTokenizer: no vocabulary in '{d}': expected vocab.txt or tokenizer.json; "
                                    + _WHERE.format(f="vocab.txt"))
        return cls(d / "vocab.txt", **kw)


class _FromJSON(_Base):
    """A serialised ``tokenizer.json`` (its normaliser, model and post-processor as saved)."""

    def __init__(self, path: str | os.PathLike, *, max_length: int = 512, pad_token: str | None = None) -> None:
        self.tokenizer = Tokenizer.from_file(str(_need(Path(path), "tokenizer.json")))
        vocab = self.tokenizer.get_vocab()
        self.pad_token = pad_token or next((t for t in ("[PAD]", "<pad>") if t in vocab), "[PAD]")
        self.max_length = max_length
        self.type_ids = "[CLS]" in vocab  # BERT layouts use token types; RoBERTa's do not


class RobertaTokenizer(_Base):
    """Byte-level BPE (GPT-2's bytes, RoBERTa's ``<s> A </s></s> B </s>``) from ``vocab.json`` + ``merges.txt``.
    No token types (RoBERTa has one), as Hugging Face's ``model_input_names``."""

    type_ids = False

    def __init__(self, vocab: str | os.PathLike | Mapping[str, int], merges: str | os.PathLike | list, *,
                 add_prefix_space: bool = False, trim_offsets: bool = True, max_length: int = 512,
                 bos_token: str = "<s>", eos_token: str = "</s>", unk_token: str = "<unk>",
                 pad_token: str = "<pad>", mask_token: str = "<mask>") -> None:
        if not isinstance(vocab, Mapping):
            with open(_need(Path(vocab), "RobertaTokenizer"), encoding="utf-8") as f:
                vocab = json.load(f)
        if not isinstance(merges, list):
            with open(_need(Path(merges), "RobertaTokenizer"), encoding="utf-8") as f:
                lines = [ln.rstrip("\n") for ln in f]
            merges = [tuple(ln.split(" ")) for ln in lines if ln and not ln.startswith("#version")]
        tok = Tokenizer(models.BPE(dict(vocab), merges, dropout=None, continuing_subword_prefix="",
                                   end_of_word_suffix="", fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
        tok.decoder = decoders.ByteLevel()
        specials = [t for t in (bos_token, pad_token, eos_token, unk_token, mask_token) if t in vocab]
        tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
        self.tokenizer, self.pad_token, self.max_length = tok, pad_token, max_length
        tok.post_processor = processors.RobertaProcessing((eos_token, self._id(eos_token)),
                                                          (bos_token, self._id(bos_token)), trim_offsets,
                                                          add_prefix_space)

    @classmethod
    def from_directory(cls, directory: str | os.PathLike, **kw) -> RobertaTokenizer:
        d = Path(directory)
        cfg = _config(d)
        kw = {"add_prefix_space": cfg.get("add_prefix_space", False)} | kw
        return cls(d / "vocab.json", d / "merges.txt", **kw)


def _config(d: Path) -> dict:
    p = d / "tokenizer_config.json"
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else {}


def load_tokenizer(directory: str | os.PathLike, model_type: str | None = None, **kw) -> _Base:
    """The tokenizer of a local Hugging Face model folder: ``tokenizer.json``, else ``vocab.json`` +
    ``merges.txt`` (RoBERTa) or ``vocab.txt`` (BERT, DistilBERT, MiniLM)."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"load_tokenizer: no model folder at '{d}'")
    if (d / "tokenizer.json").is_file():
        return _FromJSON(d / "tokenizer.json", **kw)
    if model_type in ("roberta", "xlm-roberta") or (d / "merges.txt").is_file() or (d / "vocab.json").is_file():
        return RobertaTokenizer.from_directory(d, **kw)
    return BertTokenizer.from_directory(d, **kw)
