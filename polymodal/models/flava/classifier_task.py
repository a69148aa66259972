"""``polymodal train flava-classifier``: fine-tune :class:`~.pretraining.FLAVAForClassification` on the
built-in synthetic shapes (30 (shape, colour) classes from the image encoder's class token), optionally
with DP-SGD (Poisson batches, per-example clipping, noise, the RDP accountant), through the one loop.

>>> from polymodal.train import LoopConfig, make_task
>>> task = make_task("flava-classifier", "tiny", {"train_size": 64}, LoopConfig(steps=2, batch_size=8))
>>> sorted(task.batch([0, 1, 2]))
['image', 'labels']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core import random as pr
from ...core.pytree import Params
from ...data.synthetic import SyntheticCaptions
from ...train.dp.task import DPOptions, PerExampleTask
from ...train.task import eval_progress, option
from .transforms import IMAGE_MEAN, IMAGE_STD

__all__ = ["FLAVAClassifierTask", "FLAVAClassifierOptions"]


@dataclass
class FLAVAClassifierOptions(DPOptions):
    """The task's options (the loop's are :class:`polymodal.train.LoopConfig`, DP's :class:`DPOptions`)."""

    train_size: int = option(4_000, "synthetic training images", positive=True)
    eval_size: int = option(500, "synthetic evaluation images", positive=True)


class FLAVAClassifierTask(PerExampleTask):
    """(shape, colour) classification of synthetic images with a tiny FLAVA classifier (image embedding)."""

    Options = FLAVAClassifierOptions
    loop_defaults = {"steps": 200, "batch_size": 64, "lr": 2e-3, "weight_decay": 0.0, "eval_every": 0,
                     "save_every": 0, "out": "runs/flava-classifier"}
    trainable_presets = ("tiny", "flava_tiny_for_classification")

    def __init__(self, preset: str, options: FLAVAClassifierOptions, loop: Any) -> None:
        from .builders import flava_tiny_for_classification

        self.preset, self.options, self.loop = preset, options, loop
        size = 32
        self.train_set = SyntheticCaptions("train", size=options.train_size, image_size=size, seed=loop.seed,
                                           heldout=())
        self.eval_set = SyntheticCaptions("eval", size=options.eval_size, image_size=size, seed=loop.seed, heldout=())
        self.model = flava_tiny_for_classification(num_classes=len(self.train_set.class_names()))
        self.steps, self.num_samples = loop.steps, len(self.train_set)
        self.root = pr.key(loop.seed)
        self.name = "flava-classifier" + (" (DP)" if options.dp else "")
        self.title = f"FLAVA classifier ({preset})" + (" with DP-SGD" if options.dp else "")
        self.setup()

    def init(self, key: Tensor) -> tuple[Params, None]:
        return self.model.init(key=key), None

    def per_example(self, p: Params, state: None, b: dict) -> Tensor:
        return F.cross_entropy(self.model(p, b["image"], required_embedding="image"), b["labels"], reduction="none")

    def _collate(self, items: list[dict]) -> dict:
        if not items:  # an empty Poisson batch
            return {"image": torch.zeros(0, 3, 32, 32), "labels": torch.zeros(0, dtype=torch.long)}
        mean, std = torch.tensor(IMAGE_MEAN)[:, None, None], torch.tensor(IMAGE_STD)[:, None, None]
        return {"image": (torch.stack([it["image"] for it in items]) - mean) / std,
                "labels": torch.tensor([it["label"] for it in items])}

    def batch(self, indices: list[int]) -> dict:
        return self._collate(self.train_set.__getitems__(list(indices)) if indices else [])

    @torch.no_grad()
    def evaluate(self, params: Params, state: None, *, device: Any = "cpu") -> dict:
        correct = 0
        for lo in eval_progress(range(0, len(self.eval_set), 256), "eval"):
            b = self._collate(self.eval_set.__getitems__(list(range(lo, min(lo + 256, len(self.eval_set))))))
            pred = self.model(params, b["image"].to(device), required_embedding="image").argmax(-1).cpu()
            correct += int((pred == b["labels"]).sum())
        return {"eval/accuracy": correct / len(self.eval_set)} | self.dp_metrics()
