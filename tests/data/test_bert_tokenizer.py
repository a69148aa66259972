"""BERT WordPiece / RoBERTa byte-level BPE tokenizers equal Hugging Face's fast tokenizers on
hypothesis text (unicode, CJK, accents, control characters, empty strings, long inputs, pairs),
from small vocabulary files written here (no downloads)."""

import json
import string

import pytest
from hypothesis import given, settings, strategies as st

from polymodal.data.bert_tokenizer import BertTokenizer, RobertaTokenizer, load_tokenizer
from polymodal.data.tokenizer import bytes_to_unicode

t = pytest.importorskip("transformers")

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["the", "cat", "sat", "on", "mat", "un", "##able", "##s", "café", "naïve", "résumé", "中", "文", "日", "本",
         "hello", "world", ",", ".", "!", "?", "'", "-"]
LETTERS = list(string.ascii_lowercase) + list(string.ascii_uppercase) + list(string.digits) + ["é", "ï", "É"]
VOCAB = SPECIALS + WORDS + LETTERS + ["##" + c for c in LETTERS]

TEXT = st.text(alphabet=st.one_of(st.sampled_from(list("the cat sat on the mat, unable! Hello World. ")),
                                  st.sampled_from(list("éïÉàñ中文日本\t\n\x00\x07\u200b\u0301 ")),
                                  st.characters(codec="utf-8")), max_size=40)


@pytest.fixture(scope="module")
def vocab_txt(tmp_path_factory):
    d = tmp_path_factory.mktemp("bert")
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return d


def _ref_bert(lowercase, strip_accents):
    return t.BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=lowercase,
                               strip_accents=strip_accents)


@settings(max_examples=25, deadline=None)
@given(texts=st.lists(TEXT, min_size=1, max_size=4), pairs=st.booleans(), max_length=st.integers(4, 24),
       options=st.sampled_from([(True, None), (False, None), (False, True), (True, False)]),
       padding=st.sampled_from(["longest", "max_length"]))
def test_wordpiece_equals_hf(vocab_txt, texts, pairs, max_length, options, padding):
    lowercase, strip = options
    ours = BertTokenizer(vocab_txt / "vocab.txt", lowercase=lowercase, strip_accents=strip)
    ref = _ref_bert(lowercase, strip)
    second = [s[::-1] + " cat" for s in texts] if pairs else None
    got = ours(texts, second, max_length=max_length, padding=padding)
    want = ref(texts, second, truncation=True, max_length=max_length, padding=padding)
    for k in ("input_ids", "token_type_ids", "attention_mask"):
        assert got[k].tolist() == want[k], k


def test_wordpiece_long_input_truncates_to_limit(vocab_txt):
    tok = BertTokenizer(vocab_txt / "vocab.txt", max_length=8)
    out = tok(["the cat " * 50, ""])
    assert out["input_ids"].shape == (2, 8) and out["input_ids"][0, -1] == tok.sep_id
    assert out["input_ids"][1].tolist()[:3] == [tok.cls_id, tok.sep_id, tok.pad_id]
    assert tok(["a", "the cat"], padding=False)["input_ids"] == [[2, VOCAB.index("a"), 3], [2, VOCAB.index("the"), VOCAB.index("cat"), 3]]


def test_tokenizer_json_and_directory(vocab_txt, tmp_path):
    ref = _ref_bert(True, None)
    ref.save_pretrained(tmp_path)  # tokenizer.json + tokenizer_config.json
    ours = load_tokenizer(tmp_path)
    texts = ["Hello, World!", "naïve café 中文"]
    assert ours(texts, ["the mat", "cat"])["input_ids"].tolist() == ref(texts, ["the mat", "cat"], padding=True)["input_ids"]
    assert load_tokenizer(vocab_txt)(texts)["input_ids"].tolist() == ref(texts, padding=True)["input_ids"]


def test_bad_input_is_named(vocab_txt):
    tok = BertTokenizer(vocab_txt / "vocab.txt")
    with pytest.raises(TypeError, match=r"texts: expected strings, got int at index 1"):
        tok(["a", 3])
    with pytest.raises(ValueError, match=r"expected as many pairs as texts \(2\), got 1"):
        tok(["a", "b"], ["c"])
    with pytest.raises(ValueError, match=r"padding: expected"):
        tok(["a"], padding="left")


def test_missing_vocabulary_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vocab.txt.*put it in the model folder"):
        BertTokenizer(tmp_path / "vocab.txt")
    with pytest.raises(FileNotFoundError, match=r"expected vocab.txt or tokenizer.json"):
        BertTokenizer.from_directory(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"merges.txt|vocab.json"):
        RobertaTokenizer.from_directory(tmp_path)


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("roberta")
    byte = list(bytes_to_unicode().values())
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "c"), ("a", "t"), ("Ġc", "at"), ("Ġ", "s"), ("Ġs", "at"),
              ("o", "n"), ("Ġ", "on"), ("Ã", "©")]
    vocab = ["<s>", "<pad>", "</s>", "<unk>"] + byte + ["".join(m) for m in merges] + ["<mask>"]
    (d / "vocab.json").write_text(json.dumps({w: i for i, w in enumerate(dict.fromkeys(vocab))}), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return d


@settings(max_examples=25, deadline=None)
@given(texts=st.lists(TEXT, min_size=1, max_size=4), pairs=st.booleans(), max_length=st.integers(5, 30),
       prefix=st.booleans())
def test_byte_level_bpe_equals_hf(bpe_files, texts, pairs, max_length, prefix):
    ours = RobertaTokenizer(bpe_files / "vocab.json", bpe_files / "merges.txt", add_prefix_space=prefix)
    ref = t.RobertaTokenizerFast(vocab=json.loads((bpe_files / "vocab.json").read_text(encoding="utf-8")),
                                 merges=[tuple(ln.split()) for ln in (bpe_files / "merges.txt").read_text(
                                     encoding="utf-8").splitlines()[1:]], add_prefix_space=prefix)
    second = [s + " the cat" for s in texts] if pairs else None
    got = ours(texts, second, max_length=max_length)
    want = ref(texts, second, truncation=True, max_length=max_length, padding="longest")
    assert "token_type_ids" not in got
    for k in ("input_ids", "attention_mask"):
        assert got[k].tolist() == want[k], k
