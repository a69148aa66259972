"""End to end: DP fine-tuning of a small ViT image classifier on a synthetic task.

Poisson batches padded to buckets, the norm-only DP step (ghost norms + book-keeping), SGD over
the parameter leaves, epsilon from the RDP accountant after every step. The ViT is built from
PatchEmbedding + TransformerEncoder + a linear head (CLIP's image tower takes its place once
``polymodal.models.clip`` exists).
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, TensorDataset

from polymodal.core import pytree
from polymodal.core import random as pr
from polymodal.train.dp import DPSGD
from polymodal.train.dp import epsilon
from polymodal.train.dp.sampling import BucketCollate, PoissonBatchSampler
from test_dp_models import vit_init, vit_loss, vit_parts


def quadrant_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n, 3, 16, 16)`` noise images with a bright 8x8 quadrant; the label is the quadrant."""
    labels = pr.randint(pr.key(seed), (n,), 0, 4)
    images = 0.3 * pr.normal(pr.fold_in(pr.key(seed), 1), (n, 3, 16, 16))
    rows, cols = (labels // 2) * 8, (labels % 2) * 8
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    inside = ((yy >= rows[:, None, None]) & (yy < rows[:, None, None] + 8)
              & (xx >= cols[:, None, None]) & (xx < cols[:, None, None] + 8))
    return images + inside[:, None].float(), labels


def test_dp_finetune_vit_loss_decreases_and_epsilon_is_reported():
    n, q, steps = 2048, 0.125, 40  # expected batch 256: noise std / batch = 1.0 * C / 256
    images, labels = quadrant_images(n, 0)
    data = TensorDataset(images, labels)
    sampler = PoissonBatchSampler(n, q, steps, key=pr.key(1))
    collate = BucketCollate((192, 256, 320), fill=data[0])
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=collate)

    parts = vit_parts(image=16, patch=4, width=16, depth=2, heads=2, classes=4, dropout=0.1)
    params = vit_init(parts, pr.key(2))
    model_loss = vit_loss(parts)
    opt = torch.optim.SGD(pytree.leaves(params), lr=0.5, momentum=0.9)
    dp = DPSGD(lambda p, b, key=None: model_loss(p, {"image": b[0], "label": b[1]}, key=key), params, opt,
               max_grad_norm=1.0, noise_multiplier=1.0, sample_rate=q, num_samples=n, delta=1e-5, key=pr.key(3),
               loss_key=pr.key(4))

    eval_images, eval_labels = quadrant_images(256, 10)

    def eval_loss() -> float:
        with torch.no_grad():
            return float(model_loss(params, {"image": eval_images, "label": eval_labels}).mean())

    before = eval_loss()
    logs = [dp.step(batch, mask) for batch, mask in loader]
    after = eval_loss()
    assert len(logs) == steps and all(o.fallback == () for o in logs)  # every layer on the norm-only path
    assert before > 1.2 and after < 0.8 * before, (before, after)
    assert math.isclose(logs[-1].epsilon, epsilon(1.0, q, steps, 1e-5), rel_tol=1e-9)
    assert 0 < logs[0].epsilon < logs[-1].epsilon < 10
