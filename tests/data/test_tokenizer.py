import functools
import gzip
import io
import pickle
import urllib.error

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from polymodal import hub
from polymodal.data import tokenizer as tk
from polymodal.data.tokenizer import CLIPTokenizer

open_clip = pytest.importorskip("open_clip")
from open_clip.tokenizer import SimpleTokenizer  # noqa: E402

REF = SimpleTokenizer()
TOK = CLIPTokenizer()

fragments = st.sampled_from([
    "a", "photo", "of", "the", "Dog", "CAFÉ", "naïve", "résumé", "Straße", "İstanbul", "ǅ", "ﬁne",
    "🐶", "👍🏽", "👨‍👩‍👧", "🇫🇷", "日本語", "한국어", "Привет", "مرحبا", "हिन्दी", "123", "4.5", "٣",
    "&amp;", "&amp;amp;", "&lt;b&gt;", "&#39;", "&nbsp;", "&bogus;", "&", "<b>", "'s", "'LL", "'re",
    "don't", "'ſ", "’", "\"quoted\"", "—", "...", "!!", "?!", "#hash", "@user", "http://x.y/z?q=1",
    " ", "   ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u200b", "\x00", "\x1b[31m", "\ufffd",
    "<start_of_text>", "<end_of_text>", "<START_OF_TEXT>", "!<end_of_text>", "Ã©", "â€™",
])
texts = st.one_of(
    st.text(max_size=200),
    st.lists(fragments, max_size=40).map("".join),
    st.lists(st.one_of(fragments, st.text(max_size=5)), max_size=120).map(" ".join),  # often > 77 tokens
)


@settings(max_examples=300)
@given(st.lists(texts, min_size=1, max_size=4))
def test_ids_equal_open_clip(batch):
    assert torch.equal(TOK(batch), open_clip.tokenize(batch))
    for text in batch:
        ids = TOK.encode(text)
        assert ids == REF.encode(text)
        assert TOK.decode(ids) == REF.decode(ids)


@functools.lru_cache
def tokenizer_with(context_length):
    return CLIPTokenizer(context_length=context_length)


@settings(max_examples=50)
@given(st.lists(texts, min_size=1, max_size=3), st.integers(2, 20))
def test_truncation_and_padding_equal_open_clip(batch, n):
    got = tokenizer_with(n)(batch)
    assert got.shape == (len(batch), n) and got.dtype == torch.long
    assert torch.equal(got, REF(batch, context_length=n))


def test_hand_examples():
    assert TOK("a photo of a cat")[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 0]
    assert TOK.encode("Hello  World!") == [3306, 1002, 256]
    assert TOK.encode("  A &amp;amp; B ") == TOK.encode("a & b")
    assert TOK.encode("<start_of_text>") == [49406]  # a special word in the text, as open_clip
    assert TOK.encode("") == [] and TOK("")[0, :3].tolist() == [49406, 49407, 0]
    long = TOK(" ".join(["dog"] * 200))[0]
    assert long[0] == 49406 and long[-1] == 49407 and (long[1:-1] == TOK.encode("dog")[0]).all()
    assert (TOK.vocab_size, TOK.sot_token_id, TOK.eot_token_id) == (49408, 49406, 49407)
    assert TOK([]).shape == (0, 77)
    assert TOK.decode(torch.tensor([3306, 1002])) == "hello world "


def test_word_cache_clearing_keeps_ids(monkeypatch):
    monkeypatch.setattr(tk, "_CACHE_SIZE", 4)
    tok = CLIPTokenizer()
    batch = ["one two three four five", "six seven <end_of_text>", "one six"]
    assert torch.equal(tok(batch), open_clip.tokenize(batch))
    assert torch.equal(tok(batch[::-1]), open_clip.tokenize(batch[::-1]))


@settings(max_examples=50)
@given(st.text(alphabet=st.sampled_from(
    "abcXYZ019 \t'&;!?.,<>_éüßÆøĳŉſ日本語한국🐶😀" + "".join(map(chr, range(0x100, 0x180)))
), max_size=80))
def test_oniguruma_fallback_without_regex_package(text):
    # Characters from old unicode blocks, where Oniguruma's tables agree with `regex`'s.
    tk._splitter.cache_clear()
    try:
        tk.regex, saved = None, tk.regex
        assert TOK.encode(text) == REF.encode(text)
    finally:
        tk.regex = saved
        tk._splitter.cache_clear()


def test_pickle_round_trip():
    tok = CLIPTokenizer(context_length=16)
    tok(["warm the cache"])
    back = pickle.loads(pickle.dumps(tok))
    assert back.context_length == 16 and len(back._cache) == 2
    assert torch.equal(back(["a cat", "warm"]), tok(["a cat", "warm"]))


def test_bad_inputs():
    with pytest.raises(TypeError, match="expected str or a list of str, got int"):
        TOK(3)
    with pytest.raises(TypeError, match="expected str or a list of str, got a sequence holding NoneType, str"):
        TOK(["a", None])
    with pytest.raises(TypeError, match="encode: text: expected str, got bytes"):
        TOK.encode(b"a")
    with pytest.raises(ValueError, match=r"expected ints in \[0, 49408\), got \[49408, -1\]"):
        TOK.decode([1, 49408, -1])
    with pytest.raises(ValueError, match=r"expected shape \(T,\), got \(1, 2\)"):
        TOK.decode(torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="context_length: expected an int >= 2"):
        CLIPTokenizer(context_length=1)


def test_missing_merges_path_names_it(tmp_path):
    bogus = tmp_path / "nope" / "bpe.txt.gz"
    with pytest.raises(FileNotFoundError, match="merges_path: no such file: .*nope/bpe.txt.gz"):
        CLIPTokenizer(merges_path=bogus)


class FakeNet:
    """Stands in for urllib.request.urlopen: serves `payload`, or is offline when it is None."""

    def __init__(self):
        self.payload, self.calls = None, []

    def __call__(self, url, timeout):
        self.calls.append(url)
        if self.payload is None:
            raise urllib.error.URLError("offline")
        return io.BytesIO(self.payload)


def test_wrong_merges_file_says_so(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("not gzip")
    with pytest.raises(ValueError, match="plain.txt' is not CLIP's bpe_simple_vocab_16e6.txt.gz"):
        CLIPTokenizer(merges_path=plain)
    short = tmp_path / "short.txt.gz"
    with gzip.open(short, "wt") as f:
        f.write("#version\na b\nc d\n")
    with pytest.raises(ValueError, match="expected 48894 merges after the header line, got 3"):
        CLIPTokenizer(merges_path=short)


@pytest.fixture
def no_open_clip(monkeypatch, tmp_path):
    """No installed copy, an empty cache under tmp_path, and a fake network."""
    net = FakeNet()
    monkeypatch.setattr(tk, "_open_clip_merges", lambda: None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("POLYMODAL_CACHE", raising=False)  # the hub's cache is then $XDG_CACHE_HOME/polymodal
    monkeypatch.delenv("POLYMODAL_HUB_MIRROR", raising=False)
    monkeypatch.setattr(hub.urllib.request, "urlopen", net)
    return net, tmp_path / "polymodal" / tk.MERGES_FILENAME


def test_offline_error_says_which_file_to_put_where(no_open_clip):
    net, cached = no_open_clip
    with pytest.raises(FileNotFoundError) as e:
        CLIPTokenizer()
    msg = str(e.value)
    assert tk.MERGES_FILENAME in msg and str(cached) in msg and tk.MERGES_URL in msg and "offline" in msg
    assert net.calls == [tk.MERGES_URL] and not cached.exists()


def test_download_verifies_sha256_then_caches(no_open_clip):
    net, cached = no_open_clip
    net.payload = b"not the merges file"
    with pytest.raises(FileNotFoundError, match="sha256 mismatch"):
        CLIPTokenizer()
    assert list(cached.parent.iterdir()) == []  # no partial or bad file left behind
    with open(open_clip.tokenizer.default_bpe(), "rb") as f:
        net.payload = f.read()
    tok = CLIPTokenizer()
    assert tok.merges_path == cached and cached.is_file()
    assert torch.equal(tok("a photo of a cat"), open_clip.tokenize("a photo of a cat"))
    net.payload = None  # offline again: the cached copy is used without a download
    calls = len(net.calls)
    assert CLIPTokenizer().merges_path == cached and len(net.calls) == calls


def test_open_clip_copy_is_found_without_a_path():
    assert TOK.merges_path.samefile(open_clip.tokenizer.default_bpe())


@settings(max_examples=100)
@given(st.lists(texts, min_size=1, max_size=4), st.integers(2, 20), st.sampled_from([None, 1, 4, 8, 64]))
@example(["<END_OF_TEXT>"], 3, None)  # an end-of-text id inside the text: the row still keeps all its ids
def test_padding_longest_is_the_padded_batch_cut_after_its_longest_row(batch, n, multiple):
    tok = tokenizer_with(n)
    full = tok(batch)
    got = tok(batch, padding="longest", pad_to_multiple_of=multiple)
    longest = max(min(n, len(tok.encode(t)) + 2) for t in batch)  # start + ids + end, cut to n ("!" is id 0)
    want = longest if multiple is None else min(n, -(-longest // multiple) * multiple)
    assert got.shape == (len(batch), want) and got.dtype == torch.long
    assert torch.equal(got, full[:, :want]) and not full[:, want:].any()


def test_padding_arguments_are_checked():
    with pytest.raises(ValueError, match="padding: expected 'max_length' or 'longest', got 'max'"):
        TOK(["a"], padding="max")
    with pytest.raises(ValueError, match="pad_to_multiple_of: expected a positive int or None, got 0"):
        TOK(["a"], padding="longest", pad_to_multiple_of=0)
    assert TOK(["a cat"], padding="longest").tolist() == [[49406, 320, 2368, 49407]]
