"""VideoCLIP's task: a few steps through the one loop, recall by hand, family registration and shells."""

from __future__ import annotations

import pytest
import torch

import polymodal.nn as pnn
from polymodal.core import random as pr
from polymodal.models.mugen.videoclip_task import CaptionVocab, caption_recall
from polymodal.registry import family
from polymodal.train import LoopConfig, make_task, train


def test_caption_recall_by_hand():
    # 3 pairs; texts 0 and 2 share a caption. Video 1 is closest to text 0 (wrong), video 2 second (right:
    # same caption), so t2v R@1 misses for text 0 and R@2 hits.
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    video = torch.tensor([[-1.0, 0.0], [0.9, 0.1], [0.8, -0.2]])
    r = caption_recall(text, video, ["a", "b", "a"], ks=(1, 2))
    # t2v@1: text0 -> video1 (b: miss), text1 -> video1 (b: hit), text2 -> video1 (miss)
    assert r["eval/t2v_R@1"] == pytest.approx(1 / 3)
    # t2v@2: text0 -> {1, 2}: 2 is 'a' (hit); text1 -> {1, 2}: hit; text2: hit
    assert r["eval/t2v_R@2"] == pytest.approx(1.0)
    # v2t@1: video0 sims (-1, 0, -1) -> text1 (b vs a: miss); video1 -> text0 or 2 (a vs b: miss); video2 -> text0 (hit)
    assert r["eval/v2t_R@1"] == pytest.approx(1 / 3)
    # chance@1: queries with caption 'a' have 2 of 3 relevant, 'b' 1 of 3: (2/3 + 1/3 + 2/3) / 3
    assert r["eval/chance_R@1"] == pytest.approx(5 / 9)


def test_vocab_errors():
    with pytest.raises(ValueError, match="is 7 tokens with \\[CLS\\]/\\[SEP\\]; expected at most 5"):
        CaptionVocab().encode(["a red circle moves left"], 5)


def test_family_shell_and_training_steps(tmp_path):
    fam = family("videoclip")
    assert fam.presets == {"tiny": "videoclip_tiny", "mugen": "videoclip"}
    shell = pnn.build("videoclip_tiny", key=pr.key(0))
    assert "video.encoder.features.0.0.1.running_mean" in shell.state_dict()
    emb = shell.encode_video(torch.rand(2, 3, 8, 32, 32))
    assert emb.shape == (2, 32)
    cfg = LoopConfig(steps=2, batch_size=8, out=str(tmp_path / "run"), eval_every=0, save_every=0, progress=False)
    task = make_task("videoclip", "tiny", {"train_size": 16, "eval_size": 12}, cfg)
    metrics = train(task, cfg)
    assert set(metrics) >= {"eval/t2v_R@1", "eval/v2t_R@10", "eval/chance_R@5"}
    assert all(0.0 <= metrics[k] <= 1.0 for k in metrics if "R@" in k)
    from polymodal.train.runs import load_run  # the run's batch-norm statistics were saved and advanced

    _, _, _, state = load_run(str(tmp_path / "run"))
    assert int(state["video"]["encoder"]["features"]["0"][0]["1"]["num_batches_tracked"]) == 2
