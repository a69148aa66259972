"""Zero-shot classification and retrieval recall@k: hand-made embeddings with answers worked out
by hand, streaming from a DataLoader (several captions per image), and a real CLIP end to end."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from checks import assert_close
from polymodal import nn as pnn
from polymodal.core import random as pr
from polymodal.data import CLIPTokenizer
from polymodal.eval import (
    OPENAI_IMAGENET_TEMPLATES_SUBSET, RetrievalAccumulator, recall_at_k, retrieval_metrics, zero_shot_accuracy,
    zero_shot_classifier, zero_shot_predict,
)
from polymodal.models.clip import build


class Identity:
    """A 'model' whose embeddings are its inputs (normalised): images and tokens are vectors."""

    def encode_image(self, params, x, normalize=True):
        return F.normalize(x.float(), dim=-1)

    def encode_text(self, params, t, normalize=True):
        return F.normalize(t.float(), dim=-1)


PROMPTS = {"a cat": [1.0, 0, 0], "the cat": [0, 1.0, 0], "a dog": [0, 0, 1.0], "the dog": [0, 0, 2.0]}


def vector_tokenizer(texts):
    return torch.tensor([PROMPTS[t] for t in texts])


def test_zero_shot_classifier_averages_normalised_prompts():
    params = {"logit_scale": torch.tensor(math.log(10.0))}
    for templates in (["a {}", "the {}"], [lambda c: f"a {c}", lambda c: f"the {c}"]):
        for per_batch in (1, 32):
            w = zero_shot_classifier(Identity(), params, vector_tokenizer, ["cat", "dog"], templates,
                                     classes_per_batch=per_batch)
            # cat: mean(e0, e1) normalised; dog: mean(e2, e2) = e2 (each prompt normalised first)
            r = 1 / math.sqrt(2)
            assert_close(w, torch.tensor([[r, 0.0], [r, 0.0], [0.0, 1.0]]))
    images = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.1, 1.0], [1.0, 0.0, 0.1]])
    pred = zero_shot_predict(Identity(), params, images, w)
    assert pred.predictions.tolist() == [0, 1, 0]
    assert_close(pred.logits[0], torch.tensor([10.0, 0.0]))  # exp(logit_scale) * cosine
    with pytest.raises(ValueError, match=r"classifier: expected shape \(3, C\), got \(4, 2\)"):
        zero_shot_predict(Identity(), params, images, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="templates"):
        zero_shot_classifier(Identity(), params, vector_tokenizer, ["cat"], "a {}")


def test_zero_shot_accuracy_streams_batches():
    classifier = torch.eye(3)  # class c is the direction e_c
    images = torch.tensor([[1.0, 0.2, 0.1], [0.2, 1.0, 0.5], [0.9, 0.0, 1.0], [0.0, 0.3, 0.2], [0.1, 0.0, 0.2]])
    labels = torch.tensor([0, 1, 0, 2, 1])  # top-1: 0 ok, 1 ok, 2 (wrong, 0 2nd), 1 (wrong, 2 2nd), 2 (wrong, 1 3rd)
    loader = DataLoader(TensorDataset(images, labels), batch_size=2)
    acc = zero_shot_accuracy(Identity(), {}, loader, classifier, topk=(1, 2))
    assert acc == {"top1": 2 / 5, "top2": 4 / 5, "n": 5}


# Images I0..I2 = e0, e1, e2 and six captions (owner image in brackets), with the similarities
#   c0 [0] (1, 0, 0)       c1 [1] (.8, .6, 0)    c2 [1] (0, .6, .8)
#   c3 [2] (0, 0, 1)       c4 [2] (.6, 0, .8)    c5 [0] (0, .8, .6)
# caption -> image ranks (images strictly more similar than the owner): 0, 1, 1, 0, 0, 2
# image -> caption ranks (captions more similar than the best own caption): I0 0, I1 1 (c5), I2 0
CAPTIONS = torch.tensor([[1, 0, 0], [.8, .6, 0], [0, .6, .8], [0, 0, 1], [.6, 0, .8], [0, .8, .6]])
OWNER = torch.tensor([0, 1, 1, 2, 2, 0])
EXPECTED = {"image_to_text_R@1": 2 / 3, "image_to_text_R@2": 1.0, "image_to_text_R@3": 1.0,
            "text_to_image_R@1": 3 / 6, "text_to_image_R@2": 5 / 6, "text_to_image_R@3": 1.0,
            "n_images": 3, "n_texts": 6}


@pytest.mark.parametrize("chunk", [1, 2, 1024])
def test_recall_at_k_known_answers(chunk):
    got = recall_at_k(torch.eye(3), CAPTIONS, OWNER, ks=(1, 2, 3), chunk=chunk)
    assert got == pytest.approx(EXPECTED)


def test_retrieval_streams_from_a_dataloader_with_varying_caption_counts():
    items = [(torch.eye(3)[i], CAPTIONS[OWNER == i]) for i in range(3)]
    loader = DataLoader(items, batch_size=2, collate_fn=lambda b: (torch.stack([x for x, _ in b]), [t for _, t in b]))
    got = retrieval_metrics(Identity(), {}, loader, ks=(1, 2, 3))
    # the streamed order differs (captions grouped by image) but the metrics do not
    assert got == pytest.approx(EXPECTED)
    acc = RetrievalAccumulator()
    fixed = torch.stack([CAPTIONS[OWNER == i] for i in range(3)])  # (3, 2, 3): K = 2 captions each
    acc.add(torch.eye(3)[:2], fixed[:2])
    acc.add(torch.eye(3)[2:], fixed[2:])
    assert acc.compute(ks=(1, 2, 3)) == pytest.approx(EXPECTED)
    with pytest.raises(ValueError, match="expected captions for 2 images, got 3"):
        acc.add(torch.eye(3)[:2], fixed)
    with pytest.raises(ValueError, match=r"images without a caption: \[1, 2\]"):
        recall_at_k(torch.eye(3), CAPTIONS[:1], torch.tensor([0]))


def test_real_clip_end_to_end_spec_and_shell():
    spec = build("clip_tiny")
    params = spec.init(key=pr.key(0))
    tok = CLIPTokenizer(context_length=32)
    w = zero_shot_classifier(spec, params, tok, ["circle", "square", "ring"], OPENAI_IMAGENET_TEMPLATES_SUBSET)
    manual = torch.stack([F.normalize(spec.encode_text(params, tok([t.format(c) for t in OPENAI_IMAGENET_TEMPLATES_SUBSET]))
                                      .mean(0), dim=0) for c in ("circle", "square", "ring")], 1)
    assert w.shape == (128, 3)
    assert_close(w, manual, atol=1e-6)
    images = pr.normal(pr.key(1), (6, 3, 64, 64))
    tokens = tok([f"a photo number {i}" for i in range(6)] + [f"another caption {i}" for i in range(6)])
    tokens = tokens.reshape(2, 6, 32).transpose(0, 1)  # (6, K=2, 32): two captions per image
    loader = DataLoader(TensorDataset(images, tokens), batch_size=4)
    got = retrieval_metrics(spec, params, loader)
    img = spec.encode_image(params, images)
    txt = spec.encode_text(params, tokens.reshape(12, 32))
    assert got == pytest.approx(recall_at_k(img, txt, torch.arange(6).repeat_interleave(2)))
    shell = pnn.CLIP.from_params(spec, params).eval()
    assert retrieval_metrics(shell, None, loader) == pytest.approx(got)
    widths, encode = [], shell.encode_text
    shell.encode_text = lambda t: widths.append(t.shape[1]) or encode(t)  # what the classifier feeds the tower
    assert_close(zero_shot_classifier(shell, None, tok, ["circle", "square", "ring"], OPENAI_IMAGENET_TEMPLATES_SUBSET),
                 manual, atol=1e-6)
    prompts = tok([t.format(c) for c in ("circle", "square", "ring") for t in OPENAI_IMAGENET_TEMPLATES_SUBSET])
    assert widths == [int(prompts.argmax(-1).max()) + 1] and widths[0] < 32  # trimmed to the longest prompt
    assert_close(zero_shot_predict(shell, None, images, w).logits, zero_shot_predict(spec, params, images, w).logits)
