"""``polymodal train flava --preset tiny`` through the one loop: every loss term in metrics.jsonl, the
zero-shot classification and retrieval evaluation,
deterministic batches; the caption vocabulary covers the synthetic captions."""

import torch

from polymodal.cli import main
from polymodal.train import LoopConfig, make_task
from polymodal.train.metrics import read_metrics

TERMS = ("mlm_loss", "mim_loss", "mmm_text_loss", "mmm_image_loss", "itm_loss", "global_contrastive_loss")


def test_train_logs_every_loss_term(tmp_path):
    out = tmp_path / "flava"
    assert main(["train", "flava", "--preset", "tiny", "--steps", "3", "--batch-size", "8", "--train-size", "64",
                 "--eval-size", "20", "--no-progress", "--out", str(out)]) == 0
    recs = read_metrics(out)
    steps = [r for r in recs if "loss" in r]
    assert len(steps) == 3
    for r in steps:
        assert all(t in r for t in TERMS), r
        assert abs(sum(r[t] for t in TERMS) - r["loss"]) < 1e-4 * max(1.0, r["loss"])
    assert "eval/zero_shot_seen" in recs[-1] and 0 <= recs[-1]["eval/zero_shot_seen"] <= 1
    recalls = [recs[-1][f"eval/{d}_R@{k}"] for k in (1, 5, 10) for d in ("image_to_text", "text_to_image")]
    assert all(0 <= r <= 1 for r in recalls) and recalls[0] <= recalls[2] <= recalls[4]  # R@1 <= R@5 <= R@10


def test_batches_are_a_function_of_the_step():
    task = make_task("flava", "tiny", {"train_size": 64}, LoopConfig(steps=2, batch_size=8))
    a, b = task.batch(1), task.batch(1)
    assert torch.equal(a["paired"]["text_masked"], b["paired"]["text_masked"])
    assert torch.equal(a["image"]["image_patches_mask"], b["image"]["image_patches_mask"])
    halves = [task.batch(1, r, 2) for r in range(2)]
    assert torch.equal(torch.cat([h["paired"]["image"] for h in halves]), a["paired"]["image"])
    unk = task.vocab["[UNK]"]
    ids = task.tokenizer(task.prompts + [task.train_set[i]["caption"] for i in range(30)])["input_ids"]
    assert not (ids == unk).any()  # every word of the captions and prompts is in the vocabulary


def test_dp_classifier_trains_and_logs_epsilon(tmp_path):
    out = tmp_path / "clf"
    assert main(["train", "flava-classifier", "--preset", "tiny", "--steps", "2", "--batch-size", "8",
                 "--train-size", "64", "--eval-size", "20", "--dp", "--noise-multiplier", "1.0", "--no-progress",
                 "--out", str(out)]) == 0
    recs = read_metrics(out)
    eps = [r["epsilon"] for r in recs if "loss" in r]
    assert len(eps) == 2 and 0 < eps[0] <= eps[1]
    assert 0 <= recs[-1]["eval/accuracy"] <= 1


def test_batched_block_masks_equal_block_mask():
    from polymodal.core import random as pr
    from polymodal.models.flava.transforms import block_mask, block_masks

    keys = torch.stack([pr.fold_in(pr.key(5), i) for i in range(40)])
    for grid, n, lo in (((8, 8), 24, 4), ((14, 14), 75, 16), ((4, 6), 20, 2), ((14, 14), 190, 16)):
        got = block_masks(keys, grid, n, min_num_patches=lo)
        assert got.shape == (40, *grid)
        assert all(torch.equal(got[i], block_mask(keys[i], grid, n, min_num_patches=lo)) for i in range(40))


def test_cached_dvae_codes_are_the_tokenizers_and_give_the_same_losses():
    """``--cache-codes`` (the default): a sample's codes are computed once, then read back; every step's MIM
    and MMM-image losses equal the uncached task's (which tokenises every image), and the cache holds
    exactly the dVAE's codes of the samples seen so far."""
    from polymodal.core import random as pr

    tasks = [make_task("flava", "tiny", {"train_size": 40, "cache_codes": c}, LoopConfig(steps=4, batch_size=16))
             for c in (True, False)]
    params, _ = tasks[0].init(pr.key(0))
    seen = set()
    for step in range(4):  # 4 x (16 + 4) draws from 40 samples: later steps reuse cached codes
        batch = tasks[0].batch(step)
        if step == 3:
            assert seen & set(batch["paired"]["index"].tolist())  # reuse does happen
        outs = [t.loss(params, None, batch, pr.key(step)).metrics for t in tasks]
        for term in ("mim_loss", "mmm_image_loss"):
            torch.testing.assert_close(outs[0][term], outs[1][term], rtol=0, atol=0)
        seen |= set(batch["paired"]["index"].tolist()) | set(batch["image"]["index"].tolist())
    cache, idx = tasks[0]._codes, sorted(seen)
    assert (cache[idx] >= 0).all() and (cache[[i for i in range(40) if i not in seen]] < 0).all()
    images = tasks[0]._images(tasks[0].train_set.__getitems__(idx), pr.key(0), idx)
    want = tasks[0].model.image_codes(params, images["image_for_codebook"])
    assert torch.equal(cache[idx].long(), want)
