"""load_pretrained on local Hugging Face folders written by `save_pretrained` (no downloads), sentence
embeddings (mean pooling + normalisation) against transformers' hidden states, the embed-text CLI."""

import json

import pytest
import torch

from polymodal.models.bert.pretrained import load_pretrained
from polymodal.models.bert.sentence import embed_texts, mean_pool_normalize

t = pytest.importorskip("transformers")
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "##s",
         "fast", "slow", "red", "car", "."]
SMALL = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=32)
TEXTS = ["the cat sat on the mat.", "a dog ran fast", "a red car", "the cats"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("minibert")
    torch.manual_seed(0)
    model = t.BertModel(t.BertConfig(**SMALL)).eval()
    model.save_pretrained(d)  # config.json + model.safetensors
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return d, model


def _ref_embed(model, texts):
    tok = t.BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)})
    b = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**b).last_hidden_state
    m = b["attention_mask"][..., None].float()
    e = (h * m).sum(1) / m.sum(1)  # sentence-transformers' mean pooling, by hand
    return e / e.norm(dim=-1, keepdim=True)


def test_load_safetensors_folder(folder):
    d, model = folder
    assert (d / "model.safetensors").is_file()
    pre = load_pretrained(d)
    assert pre.spec.encoder.num_layers == 2 and pre.config["model_type"] == "bert"
    torch.testing.assert_close(embed_texts(pre.spec, pre.params, pre.tokenizer, TEXTS), _ref_embed(model, TEXTS),
                               atol=1e-5, rtol=1e-5)


def test_load_pytorch_bin_folder(folder, tmp_path):
    d, model = folder
    for f in ("config.json", "vocab.txt"):
        (tmp_path / f).write_text((d / f).read_text())
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    pre = load_pretrained(tmp_path)
    ids = pre.tokenizer(TEXTS)
    with torch.no_grad():
        want = model(**ids)
    got = pre.spec(pre.params, ids["input_ids"], ids["attention_mask"], ids["token_type_ids"])
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.pooled, want.pooler_output, atol=1e-5, rtol=1e-5)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(tmp_path)


def test_mean_pool_normalize_by_hand():
    h = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [9.0, 9.0]]])
    e = mean_pool_normalize(h, torch.tensor([[1, 1, 0]]))  # mean (2, 2) -> unit (1, 1) / sqrt(2)
    torch.testing.assert_close(e, torch.full((1, 2), 2 ** -0.5))
    with pytest.raises(ValueError, match=r"expected shape \(1, 3\), got \(1, 2\)"):
        mean_pool_normalize(h, torch.ones(1, 2))


def test_embed_text_cli(folder, tmp_path, capsys):
    from polymodal.cli import main
    d, model = folder
    out = tmp_path / "emb.pt"
    assert main(["embed-text", "--model", str(d), *TEXTS[:2], "--output", str(out)]) == 0
    torch.testing.assert_close(torch.load(out), _ref_embed(model, TEXTS[:2]), atol=1e-5, rtol=1e-5)
    assert main(["embed-text", "--model", str(d), "a red car"]) == 0
    printed = capsys.readouterr().out
    assert "a red car" in printed and "32" in printed
    assert main(["embed-text", "--model", str(tmp_path / "nope"), "x"]) == 2


def test_loads_without_transformers(folder):
    """The folder loads and embeds with `transformers` made unimportable."""
    import subprocess
    import sys
    d, _ = folder
    code = ("import sys; sys.modules['transformers'] = None\n"
            "from polymodal.models.bert import load_pretrained, embed_texts\n"
            f"pre = load_pretrained({str(d)!r})\n"
            "print(tuple(embed_texts(pre.spec, pre.params, pre.tokenizer, ['a red car']).shape))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "(1, 32)", r.stderr[-2000:]


def test_from_huggingface_reads_a_config_path(folder):
    from polymodal.models.bert import from_huggingface
    from polymodal.models.bert.pretrained import read_weights
    d, model = folder
    spec, _ = from_huggingface(read_weights(d), d / "config.json")
    assert spec.encoder.layer.num_heads == model.config.num_attention_heads == 4
