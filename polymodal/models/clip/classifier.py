"""``polymodal train classifier``: fine-tune a CLIP image tower + linear head, optionally with DP-SGD.

A task on the one loop (:mod:`polymodal.train.loop`). Classification is a per-example loss, so
DP-SGD's guarantee holds (unlike CLIP's contrastive loss, see docs/privacy.md). With ``dp=True``
batches are Poisson-sampled, per-example gradients are clipped (norm-only ghost clipping, exact),
Gaussian noise is drawn from the run's key and the RDP accountant's epsilon is logged every step
and plotted; the task takes that gradient step itself (``ClassifierTask.step``) and saves the
accountant in the checkpoint, so a DP run resumes exactly. ``init_from`` starts from a CLIP run's
image tower (the usual recipe: pretrain on public data, fine-tune privately).

>>> from polymodal.train import LoopConfig, make_task
>>> task = make_task("classifier", "tiny-vit", {"train_size": 64, "dp": True, "target_epsilon": 2.0},
...                  LoopConfig(steps=3, batch_size=16))
>>> round(task.noise_multiplier, 2) > 0, task.step is not None
(True, True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core import random as pr
from ...core.layers import Linear
from ...core.pytree import Params
from ...train.dp.task import DPOptions, PerExampleTask
from ...train.task import eval_progress, option
from .task import build_model

__all__ = ["ClassifierTask", "ClassifierOptions"]


@dataclass
class ClassifierOptions(DPOptions):
    """The classifier's options (the loop's are :class:`polymodal.train.LoopConfig`; DP's are
    :class:`polymodal.train.dp.task.DPOptions`)."""

    init_from: str | None = option(None, "start from a 'polymodal train clip' run (its preset wins)", metavar="RUN")
    train_size: int = option(5_000, "synthetic training images", positive=True)
    eval_size: int = option(512, "synthetic evaluation images", positive=True)


class ClassifierTask(PerExampleTask):
    """Colour x shape classification of the synthetic shapes with a CLIP image tower + linear head.

    Model state: a ResNet tower's batch-norm statistics, held fixed (the CLIP run's, or fresh
    ones): batch statistics would mix the examples of a batch, which per-example clipping forbids.
    """

    Options = ClassifierOptions
    loop_defaults = {"steps": 100, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.0, "eval_every": 0,
                     "save_every": 0, "out": "runs/classifier"}

    def __init__(self, preset: str, options: ClassifierOptions, loop: Any) -> None:
        from ...data import SyntheticCaptions
        from ...train.runs import read_config

        if options.init_from:
            preset = read_config(options.init_from)["preset"]
        self.preset, self.options, self.loop = preset, options, loop
        self.model = build_model(preset)
        self.root = pr.key(loop.seed)
        mk = lambda split, n: SyntheticCaptions(split, size=n, image_size=self.model.image_size,  # noqa: E731
                                                seed=loop.seed + 1, heldout=(), normalize=True)
        self.train_set, self.eval_set = mk("train", options.train_size), mk("eval", options.eval_size)
        self.head = Linear(self.model.embed_dim, len(self.train_set.class_names()))
        self.steps, self.num_samples = loop.steps, len(self.train_set)
        self.name = "classifier" + (" (DP)" if options.dp else "")
        self.title = f"classifier ({preset})" + (" with DP-SGD" if options.dp else "")
        self.setup()

    def init(self, key: Tensor) -> tuple[Params, Params | None]:
        if self.options.init_from:
            from ...train.runs import load_run

            _, clip_params, _, bn = load_run(self.options.init_from)
            visual = clip_params["visual"]
        else:
            visual, bn = self.model.init(key=key)["visual"], self.model.init_state()
        params = {"visual": visual, "head": self.head.init(key=pr.fold_in(self.root, 2))}
        return params, None if bn is None else {"visual": bn["visual"]}

    def _logits(self, p: Params, state: Params | None, images: Tensor) -> Tensor:
        if state is not None:
            return self.head(p["head"], self.model.visual(p["visual"], images, state["visual"])[0])
        return self.head(p["head"], self.model.visual(p["visual"], images))

    def per_example(self, p: Params, state: Params | None, batch: dict) -> Tensor:
        return F.cross_entropy(self._logits(p, state, batch["images"]), batch["labels"], reduction="none")

    def batch(self, idx: list[int]) -> dict:
        items = self.train_set.__getitems__(idx) if idx else []
        size = self.model.image_size
        return {"images": torch.stack([it["image"] for it in items]) if items else torch.zeros(0, 3, size, size),
                "labels": torch.tensor([it["label"] for it in items], dtype=torch.long)}

    def evaluate(self, params: Params, state: Params | None, *, device: Any = "cpu") -> dict:
        correct = 0
        for i in eval_progress(range(0, len(self.eval_set), 256), "eval"):
            items = self.eval_set.__getitems__(list(range(i, min(i + 256, len(self.eval_set)))))
            pred = self._logits(params, state, torch.stack([it["image"] for it in items]).to(device)).argmax(-1)
            correct += int((pred.cpu() == torch.tensor([it["label"] for it in items])).sum())
        return {"eval/accuracy": correct / len(self.eval_set)} | self.dp_metrics()
