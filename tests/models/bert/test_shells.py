"""polymodal.nn shells of the BERT family, from the registry (no edit in polymodal.nn): state_dict keys
are Hugging Face's where the names agree (embeddings, pooler, classifier); the layers map as
documented in polymodal/models/bert/convert.py."""

import pytest
import torch

import polymodal.nn as pnn
from polymodal.core import random as pr
from polymodal.core.pytree import flatten
from polymodal.models.bert import bert_tiny
from polymodal.models.bert.convert import to_huggingface

t = pytest.importorskip("transformers")


def test_encoder_shell_is_the_spec():
    shell = pnn.BERTTextEncoder("bert_tiny", key=pr.key(0)).eval()
    assert type(shell).__name__ == "BERTTextEncoder"
    ids = torch.tensor([[2, 7, 9, 3, 0], [2, 5, 3, 0, 0]])
    want = shell.spec(shell.params, ids)
    got = shell(ids)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state)
    assert list(shell.state_dict()) == list(flatten(shell.params))


def test_state_dict_keys_agree_with_hugging_face_where_names_agree():
    spec = bert_tiny()
    shell = pnn.build(spec, key=pr.key(0))
    ours = set(shell.state_dict())
    theirs = set(to_huggingface(shell.params, spec))
    same = sorted(ours & theirs)
    assert [k for k in same if k.startswith("embeddings.")] == sorted(k for k in theirs if k.startswith("embeddings."))
    assert {"pooler.dense.weight", "pooler.dense.bias"} <= set(same)
    # only the layers' names differ: encoder.layer.{i}.<HF names> vs encoder.layers.{i}.<torch names>
    assert all(k.startswith("encoder.layer.") for k in theirs - ours)
    assert all(k.startswith("encoder.layers.") for k in ours - theirs)


def test_classifier_shell_and_pretrained_folder(tmp_path):
    clf = pnn.build("bert_tiny_classifier", key=pr.key(0))
    assert type(clf).__name__ == "BERTClassifier" and clf(torch.tensor([[2, 5, 3]])).shape == (1, 3)
    assert {"classifier.weight", "classifier.bias"} <= set(clf.state_dict())
    torch.manual_seed(0)
    ref = t.BertModel(t.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=16)).eval()
    ref.save_pretrained(tmp_path)
    shell = pnn.BERTTextEncoder.from_pretrained_name("bert_tiny", path=tmp_path).eval()
    ids = torch.tensor([[2, 7, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(shell(ids).last_hidden_state, ref(input_ids=ids).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="local Hugging Face model folder"):
        pnn.BERTTextEncoder.from_pretrained_name("bert_tiny", pretrained=True)


def test_sentence_similarity_example_runs_offline(tmp_path):
    import runpy
    from pathlib import Path

    from polymodal.models.bert import embed_texts, load_pretrained
    ns = runpy.run_path(str(Path(__file__).parents[3] / "examples" / "sentence_similarity.py"))
    pre = load_pretrained(ns["random_folder"](tmp_path))
    emb = embed_texts(pre.spec, pre.params, pre.tokenizer, ns["CORPUS"][:3])
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(3))  # normalised: dot products are cosines
