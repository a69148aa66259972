"""The ALBEF tasks through the one loop: exact resume with the momentum state and queues, the VQA task,
re-ranking and recall from score matrices, MLM masking."""

from __future__ import annotations

import pytest
import torch

from polymodal.core import pytree
from polymodal.core import random as pr
from polymodal.models.albef.rerank import recall_from_scores
from polymodal.models.albef.text import mask_tokens, synthetic_tokenizer
from polymodal.train.loop import LoopConfig, train
from polymodal.train.metrics import read_metrics
from polymodal.train.runs import load_run
from polymodal.train.task import make_task


def _run(family, options, out, steps=3, stop_after=None):
    cfg = LoopConfig(steps=steps, batch_size=8, out=str(out), eval_every=0, save_every=1, progress=False,
                     stop_after=stop_after)
    return train(make_task(family, "tiny", options, cfg), cfg)


def losses(run):
    return [r["loss"] for r in read_metrics(run) if "loss" in r]


def test_stopped_and_resumed_equals_uninterrupted(tmp_path):
    opts = {"train_size": 32, "eval_size": 8}
    a, b = tmp_path / "a", tmp_path / "b"
    metrics = _run("albef", opts, a)
    _run("albef", opts, b, stop_after=2)
    _run("albef", opts, b)
    assert losses(a) == losses(b) and len(losses(a)) == 3
    ra, rb = load_run(a), load_run(b)
    for tree_a, tree_b in ((ra.params, rb.params), (ra.state, rb.state)):
        fa, fb = pytree.flatten(tree_a), pytree.flatten(tree_b)
        assert sorted(fa) == sorted(fb) and all(torch.equal(fa[k], fb[k]) for k in fa)
    state = ra.state
    assert state["queue_ptr"].tolist() == [24]  # 3 steps of 8 into a queue of 256
    assert (state["idx_queue"][0, :24] >= 0).all() and (state["idx_queue"][0, 24:] == -100).all()
    assert not torch.equal(state["momentum"]["text_proj"]["weight"], ra.params["text_proj"]["weight"])
    for split in ("eval", "heldout"):
        for tag in ("itc", "itm"):
            assert 0.0 <= metrics[f"eval/{split}_{tag}_image_to_text_R@10"] <= 1.0


def test_vqa_task_trains_and_reports_accuracy_per_kind(tmp_path):
    metrics = _run("albef-vqa", {"train_size": 16, "eval_size": 8}, tmp_path / "v", steps=2)
    kinds = ("color", "shape", "size", "count")
    assert set(metrics) == {"eval/vqa_accuracy", *(f"eval/vqa_accuracy_{k}" for k in kinds)}
    assert len(losses(tmp_path / "v")) == 2


def test_recall_from_scores_by_hand():
    # 3 images; texts 0, 1 belong to image 0, text 2 to image 1, text 3 to image 2
    i2t = torch.tensor([[0.1, 0.9, 0.5, 0.0], [0.8, 0.2, 0.7, 0.0], [0.0, 0.0, 0.0, 0.0]])
    t2i = torch.tensor([[0.2, 0.9, 0.0], [0.9, 0.1, 0.0], [0.1, 0.9, 0.0], [0.5, 0.5, 0.4]])
    r = recall_from_scores(i2t, t2i, torch.tensor([0, 0, 1, 2]), ks=(1, 2))
    # images: 0 ranks text 1 first (hit); 1 ranks text 0 above its text 2 (rank 1); 2: ties count in favour
    assert r["image_to_text_R@1"] == pytest.approx(2 / 3) and r["image_to_text_R@2"] == 1.0
    # texts: 0 -> image 1 first (rank 1); 1 hit; 2 hit; 3 -> rank 2
    assert r["text_to_image_R@1"] == 0.5 and r["text_to_image_R@2"] == 0.75


def test_mask_tokens_rates_and_specials():
    tok = synthetic_tokenizer(16)
    ids = tok(["a small red circle on the left"] * 400)["input_ids"]
    masked, labels = mask_tokens(pr.key(0), ids, tok)
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[ids == tok.pad_id].any()
    rate = float(chosen[:, 1:].float().mean())
    assert abs(rate - 0.15) < 0.02
    to_mask = float((masked[chosen] == tok.mask_id).float().mean())
    assert abs(to_mask - 0.8) < 0.05
    assert torch.equal(masked[~chosen], ids[~chosen])
