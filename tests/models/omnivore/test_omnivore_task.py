"""``polymodal train omnivore``: mixed batches by the sampling ratios, the loss, per-modality evaluation."""

import pytest
import torch
import torch.nn.functional as F

from polymodal.core import random as pr
from polymodal.train import LoopConfig, make_task
from polymodal.train.loop import train
from polymodal.models.omnivore.task import split_batch


def _task(batch_size=12, steps=2, **opts):
    return make_task("omnivore", "tiny", {"train_size": 48, "eval_size": 6} | opts,
                     LoopConfig(steps=steps, batch_size=batch_size, eval_every=0, save_every=0, progress=False))


def test_split_batch_follows_the_ratios():
    assert split_batch(12, {"image": 1, "video": 1, "rgbd": 1}) == {"image": 4, "video": 4, "rgbd": 4}
    assert split_batch(10, {"image": 2, "video": 1, "rgbd": 1}) == {"image": 5, "video": 3, "rgbd": 2}
    assert split_batch(8, {"image": 0, "video": 1, "rgbd": 3}) == {"image": 0, "video": 2, "rgbd": 6}
    with pytest.raises(ValueError, match="expected non-negative numbers, not all zero"):
        split_batch(8, {"image": 0, "video": 0, "rgbd": 0})


def test_batches_hold_each_modality_in_its_share_and_are_deterministic():
    task = _task(batch_size=12, video_ratio=2.0, rgbd_ratio=0.0)
    batch = next(iter(task.train_batches(0, 0, 1)))
    assert sorted(batch) == ["image", "video"]
    assert batch["image"]["x"].shape == (4, 3, 1, 32, 32) and batch["video"]["x"].shape == (8, 3, 4, 32, 32)
    assert batch["video"]["labels"].max() < 4 and batch["image"]["labels"].max() < 30
    again = next(iter(_task(batch_size=12, video_ratio=2.0, rgbd_ratio=0.0).train_batches(0, 0, 1)))
    assert torch.equal(again["video"]["x"], batch["video"]["x"])
    halves = [next(iter(task.train_batches(0, r, 2))) for r in (0, 1)]  # each rank its slice of every share
    assert torch.equal(torch.cat([h["video"]["x"] for h in halves]), batch["video"]["x"])


def test_loss_is_the_cross_entropy_over_all_modalities():
    task = _task()
    params, _ = task.init(pr.key(0))
    batch = next(iter(task.train_batches(0, 0, 1)))
    out = task.loss(params, None, batch, pr.key(1))
    ce = [F.cross_entropy(task.model(params, batch[m]["x"], m).logits, batch[m]["labels"], reduction="sum")
          for m in ("image", "video", "rgbd")]  # the tiny preset has no dropout: the key changes nothing
    torch.testing.assert_close(out.loss, sum(ce) / 12)
    assert set(out.metrics) == {"loss_image", "loss_video", "loss_rgbd"}


def test_two_steps_through_the_loop_and_per_modality_accuracy(tmp_path):
    task = _task()
    cfg = LoopConfig(steps=2, batch_size=12, eval_every=0, save_every=0, out=str(tmp_path / "run"), progress=False)
    metrics = train(task, cfg)
    for m, chance in (("image", 1 / 30), ("video", 1 / 4), ("rgbd", 1 / 6)):
        assert 0.0 <= metrics[f"eval/{m}_accuracy"] <= 1.0
        assert metrics[f"eval/{m}_chance"] == pytest.approx(chance)


def test_a_batch_share_that_does_not_split_over_the_ranks_is_an_error():
    task = _task(batch_size=9, video_ratio=1.0)
    with pytest.raises(ValueError, match="image takes 3 of each batch of 9: expected a multiple of the 2 ranks"):
        next(iter(task.train_batches(0, 0, 2)))
