"""``polymodal train omnivore``: one Omnivore model on mixed batches of images, videos and RGB-D.

The built-in synthetic data (``--data synthetic``, the only source so far):

* ``image``: still shapes (``polymodal.data.synthetic.SyntheticCaptions``), label = shape x colour (30);
* ``video``: moving shapes (``polymodal.data.motion.MovingShapes``), label = direction (4); each
  rendered video has ``2 x frames`` frames and a clip of ``frames`` frames, every second one, is
  sampled from it (:func:`~.transforms.sample_clip`: random start in training, centre in evaluation);
* ``rgbd``: two shapes at two depths (``polymodal.data.depth.DepthShapes``), label = the nearer
  shape's colour (6; the colours alone allow at most 50 %); depth through :class:`~.transforms.DepthNorm`.

Every step's batch holds all three modalities, ``batch_size`` examples split by the per-modality
sampling ratios (``--image-ratio``, ``--video-ratio``, ``--rgbd-ratio``; the reference's
multi-dataset example interleaves whole batches by such ratios); the loss is the cross-entropy over
all of them. Evaluation reports each modality's accuracy (``eval/<modality>_accuracy``).

>>> from polymodal.train import LoopConfig, make_task
>>> task = make_task("omnivore", "tiny", {"train_size": 64, "eval_size": 8}, LoopConfig(steps=2, batch_size=12))
>>> batch = next(iter(task.train_batches(0, 0, 1)))
>>> {m: tuple(b["x"].shape) for m, b in batch.items()}
{'image': (3, 3, 1, 32, 32), 'video': (6, 3, 4, 32, 32), 'rgbd': (3, 4, 1, 32, 32)}
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core import random as pr
from ...core.pytree import Params
from ...data.depth import MAX_DEPTH, DepthShapes
from ...data.motion import MovingShapes
from ...data.synthetic import SyntheticCaptions
from ...train.task import LossOutput, eval_progress, option
from .builders import BUILDERS
from .transforms import DepthNorm, sample_clip

__all__ = ["OmnivoreTask", "OmnivoreOptions", "split_batch", "MODALITY_ORDER"]

MODALITY_ORDER = ("image", "video", "rgbd")
# Normalisation of the synthetic data (its pixels and normalised depths spread over [0, 1]).
_MEAN, _STD = 0.5, 0.25


def split_batch(batch_size: int, ratios: dict[str, float]) -> dict[str, int]:
    """``batch_size`` split in proportion to ``ratios`` (largest remainders; a ratio of 0 gets none).

    >>> split_batch(10, {"image": 1, "video": 1, "rgbd": 1})
    {'image': 4, 'video': 3, 'rgbd': 3}
    """
    if any(r < 0 for r in ratios.values()) or not sum(ratios.values()) > 0:
        raise ValueError(f"sampling ratios: expected non-negative numbers, not all zero, got {ratios}")
    total = sum(ratios.values())
    exact = {m: batch_size * r / total for m, r in ratios.items()}
    counts = {m: int(e) for m, e in exact.items()}
    for m in sorted(exact, key=lambda m: counts[m] - exact[m])[: batch_size - sum(counts.values())]:
        counts[m] += 1
    return counts


@dataclass
class OmnivoreOptions:
    """``polymodal train omnivore``'s data options (the loop's are :class:`polymodal.train.LoopConfig`)."""

    data: str = option("synthetic", "'synthetic': built-in still shapes, moving shapes and RGB-D shapes",
                       choices=("synthetic",))
    train_size: int = option(20_000, "synthetic training examples per modality", positive=True)
    eval_size: int = option(300, "synthetic evaluation examples per modality", positive=True)
    image_size: int = option(32, "side of the images and frames", positive=True)
    frames: int = option(4, "frames per video clip (sampled every second frame of a 2x longer video)", positive=True)
    image_ratio: float = option(1.0, "share of each batch that is images")
    video_ratio: float = option(2.0, "share of each batch that is videos (the slowest to learn)")
    rgbd_ratio: float = option(1.0, "share of each batch that is RGB-D images")


class OmnivoreTask:
    """Images, videos and RGB-D through one Omnivore model, with per-modality accuracy."""

    Options = OmnivoreOptions
    loop_defaults = {"steps": 800, "batch_size": 48, "lr": 2e-3, "weight_decay": 0.05, "eval_every": 200,
                     "save_every": 0, "out": "runs/omnivore"}

    def __init__(self, preset: str, options: OmnivoreOptions, loop: Any) -> None:
        from ...registry import family

        self.preset, self.options, self.loop = preset, options, loop
        self.model = BUILDERS[family("omnivore").builder_name(preset)]()
        self.ratios = {"image": options.image_ratio, "video": options.video_ratio, "rgbd": options.rgbd_ratio}
        self.counts = split_batch(loop.batch_size, self.ratios)
        o, s = options, options.seed if hasattr(options, "seed") else loop.seed
        self.train_sets = self._datasets("train", o.train_size, s)
        self.eval_sets = self._datasets("eval", o.eval_size, s)
        self.key = pr.fold_in(pr.key(s), 0x0A1)
        self.steps, self.name, self.title = loop.steps, f"omnivore-{preset}", f"Omnivore ({preset}): image, video, RGB-D"

    def _datasets(self, split: str, n: int, seed: int) -> dict:
        o = self.options
        return {"image": SyntheticCaptions(split, size=n, image_size=o.image_size, seed=seed, heldout=()),
                "video": MovingShapes(split, n, frames=2 * o.frames, image_size=o.image_size, seed=seed, background="dark"),
                "rgbd": DepthShapes(split, n, image_size=o.image_size, seed=seed)}

    def class_names(self, modality: str) -> list[str]:
        """What each class of ``modality``'s head means on the synthetic data."""
        if modality == "image":
            return self.train_sets["image"].class_names()
        if modality == "video":
            return [f"moves {d}" for d in self.train_sets["video"].class_names()]
        return [f"the {c} shape is nearer" for c in self.train_sets["rgbd"].class_names()]

    def init(self, key: Tensor) -> tuple[Params, None]:
        return self.model.init(key=key), None

    def collate(self, modality: str, items: list[dict], keys: Tensor | None) -> dict:
        """Items of one modality -> ``{"x": (B, C, T, H, W) normalised, "labels": (B,)}``; ``keys (B, 2)``
        draw the video clips (``None``: the centre clips)."""
        labels = torch.tensor([it["label"] for it in items], dtype=torch.long)
        if modality == "image":
            x = torch.stack([it["image"] for it in items]).unsqueeze(2)
        elif modality == "video":
            keys = keys if keys is not None else [None] * len(items)
            x = torch.stack([it["video"][:, sample_clip(it["video"].shape[1], self.options.frames, 2, key=k)]
                             for it, k in zip(items, keys)])
        else:
            norm = DepthNorm(MAX_DEPTH, clamp_max_before_scale=True)
            x = torch.stack([norm(it["rgbd"]) for it in items]).unsqueeze(2)
        return {"x": (x - _MEAN) / _STD, "labels": labels}

    def _indices(self, modality: str, step: int, count: int) -> list[int]:
        n = len(self.train_sets[modality])
        per_epoch = max(n // count, 1)
        epoch, i = divmod(step, per_epoch)
        perm = pr.permutation(pr.fold_in(pr.fold_in(self.key, MODALITY_ORDER.index(modality)), epoch), n)
        return perm[i * count:(i + 1) * count].tolist()

    def train_batches(self, start_step: int, rank: int, world: int) -> Iterator[dict]:
        for m, c in self.counts.items():
            if c % world:
                raise ValueError(f"omnivore: {m} takes {c} of each batch of {self.loop.batch_size}: expected a "
                                 f"multiple of the {world} ranks (change --batch-size or the ratios)")
            if c > len(self.train_sets[m]):
                raise ValueError(f"omnivore: {m} takes {c} examples per batch but has only {len(self.train_sets[m])}")
        for step in range(start_step, self.steps):
            batch = {}
            for m in MODALITY_ORDER:
                c = self.counts[m]
                if c == 0:
                    continue
                local = self._indices(m, step, c)[rank * (c // world):(rank + 1) * (c // world)]
                clip_keys = torch.func.vmap(pr.fold_in, in_dims=(None, 0))(  # one per example, whatever its rank
                    pr.fold_in(pr.fold_in(self.key, 7), step), torch.tensor(local, dtype=torch.int64))
                batch[m] = self.collate(m, self.train_sets[m].__getitems__(local), clip_keys)
            yield batch

    def loss(self, params: Params, state: None, batch: dict, key: Tensor) -> LossOutput:
        total, n, metrics = 0.0, 0, {}
        for m, k in zip(MODALITY_ORDER, pr.split(key, len(MODALITY_ORDER))):
            if m not in batch:
                continue
            logits = self.model(params, batch[m]["x"], m, key=k).logits
            ce = F.cross_entropy(logits, batch[m]["labels"], reduction="sum")
            total, n = total + ce, n + logits.shape[0]
            metrics[f"loss_{m}"] = ce.detach() / logits.shape[0]
        return LossOutput(total / n, metrics, None)

    @torch.no_grad()
    def evaluate(self, params: Params, state: None, *, device: Any = "cpu") -> dict:
        metrics = {}
        for m in MODALITY_ORDER:
            ds, correct = self.eval_sets[m], 0
            for i in eval_progress(range(0, len(ds), 100), f"eval {m}"):
                b = self.collate(m, ds.__getitems__(range(i, min(i + 100, len(ds)))), None)
                pred = self.model(params, b["x"].to(device), m).logits.argmax(-1)
                correct += int((pred.cpu() == b["labels"]).sum())
            metrics[f"eval/{m}_accuracy"] = correct / max(len(ds), 1)
            metrics[f"eval/{m}_chance"] = 1 / self.model.num_classes(m)
        return metrics
