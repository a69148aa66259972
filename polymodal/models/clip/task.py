"""CLIP's training task for the one loop (:mod:`polymodal.train.loop`): presets, data, the loss, evaluation.

Everything here is functional: the model is a spec, params a pytree, the loss a pure
function of ``(params, batch, key)``. :class:`CLIPTask` is what ``polymodal train clip`` runs;
its :class:`CLIPOptions` become the command's data flags.

>>> from polymodal.train import LoopConfig, make_task
>>> task = make_task("clip", "tiny", {"train_size": 64}, LoopConfig(steps=3, batch_size=16))
>>> task.name, task.steps, next(iter(task.train_batches(0, 0, 1)))["images"].shape
('clip-tiny', 3, torch.Size([16, 3, 64, 64]))
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ...core import random as pr
from ...core.pytree import Params
from ...train.task import LossOutput, eval_progress, option

__all__ = ["PRESETS", "build_model", "make_datasets", "StepBatches", "clip_loss", "evaluate", "Collate", "CLIPTask",
           "CLIPOptions"]

# CLI preset -> CLIP builder (see polymodal.models.clip.builders). "tiny" has a ResNet image
# tower: on a CPU it learns the synthetic shapes several times faster than the patch-8 ViT.
PRESETS = {"tiny": "clip_tiny_rn", "tiny-vit": "clip_tiny", "small": "clip_small", "vit-b32": "clip_vit_b32",
           "vit-b16": "clip_vit_b16", "rn50": "clip_rn50"}


def build_model(preset: str):
    from . import build

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    return build(PRESETS[preset])


class Collate:
    """Batch dict items ``{"image", "caption", ...}`` into ``{"images", "tokens", "labels"?}`` (picklable).

    ``trim``: tokens run to the batch's longest caption, rounded up to a multiple of 8 (at most
    ``context_length``), instead of always ``context_length``: the text tower gives the same
    embeddings for less work (captions fill 10 to 20 of 77 positions), and ``torch.compile``
    sees at most ``context_length / 8`` shapes.
    """

    def __init__(self, context_length: int, trim: bool = True) -> None:
        self.context_length, self.trim = context_length, trim
        self._tok = None

    def __call__(self, items: list) -> dict:
        if self._tok is None:
            from ...data import CLIPTokenizer

            self._tok = CLIPTokenizer(context_length=self.context_length)
        if items and isinstance(items[0], dict):
            images = torch.stack([it["image"] for it in items])
            captions = [it["caption"] for it in items]
            labels = torch.tensor([it["label"] for it in items]) if "label" in items[0] else None
        else:  # (image, caption) pairs from ImageTextFolder / WebDataset
            images = torch.stack([it[0] for it in items])
            captions = [it[1] for it in items]
            labels = None
        pad = dict(padding="longest", pad_to_multiple_of=8) if self.trim else {}
        out = {"images": images, "tokens": self._tok(captions, **pad)}
        if labels is not None:
            out["labels"] = labels
        return out


class StepBatches(Sampler[list[int]]):
    """Batches of a map-style dataset as a pure function of ``(key, step)``: epoch ``e`` visits
    ``permutation(fold_in(key, e))``; iteration starts at ``start_step`` (resume) and stops after
    ``steps``. Each rank of ``world`` takes its slice of every global batch."""

    def __init__(self, n: int, batch_size: int, steps: int, *, key: Tensor, start_step: int = 0, rank: int = 0,
                 world: int = 1) -> None:
        if batch_size > n:
            raise ValueError(f"batch size {batch_size} is larger than the dataset ({n} samples)")
        if batch_size % world:
            raise ValueError(f"global batch size {batch_size} must be divisible by the {world} ranks")
        self.n, self.bs, self.steps, self.key, self.start = n, batch_size, steps, key, start_step
        self.rank, self.world = rank, world
        self.per_epoch = n // batch_size

    def batch(self, step: int) -> list[int]:
        epoch, i = divmod(step, self.per_epoch)
        perm = pr.permutation(pr.fold_in(self.key, epoch), self.n)
        glob = perm[i * self.bs:(i + 1) * self.bs]
        local = self.bs // self.world
        return glob[self.rank * local:(self.rank + 1) * local].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.steps):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.steps - self.start)


@dataclass
class Datasets:
    train: Dataset
    eval: Dataset | None
    heldout: Dataset | None
    class_prompts: list[str] | None  # zero-shot prompts, one per class (synthetic data)


def make_datasets(data: str, image_size: int, *, seed: int, train_size: int, eval_size: int, image_root: str | None,
                  skip_bad: bool) -> Datasets:
    """``data="synthetic"`` or a path to a JSONL/CSV of (image, caption) or WebDataset shards (``*.tar``)."""
    from ...data import ImageTextFolder, SyntheticCaptions
    from ...data.stream import is_shard_pattern
    from ...data.transforms import CLIPImageTransform

    if data == "synthetic":
        mk = lambda split, n: SyntheticCaptions(split, size=n, image_size=image_size, seed=seed, normalize=True)  # noqa: E731
        train = mk("train", train_size)
        return Datasets(train, mk("eval", eval_size), mk("heldout", eval_size), train.prompts())
    if is_shard_pattern(data):
        raise ValueError("make_datasets: WebDataset shards are not a map-style dataset: stream them with "
                         "polymodal.data.ShardStream (as CLIPTask does for --data 'shards/{000000..000099}.tar')")
    transform = CLIPImageTransform(image_size, is_train=True)
    ds = ImageTextFolder(image_root or str(__import__("pathlib").Path(data).parent), data, transform=transform,
                         skip_bad=skip_bad)
    return Datasets(ds, None, None, None)


def clip_loss(model, params: Params, batch: dict, key: Tensor | None, *, state: Params | None = None,
              backprop_type: str = "none") -> tuple[Tensor, Params | None]:
    """Symmetric InfoNCE over the (possibly cross-rank) batch with CLIP's clamped temperature.

    Returns ``(loss, new_state)``: with a ResNet image tower, ``state`` holds its batch-norm
    statistics (``model.init_state()``), the batch's statistics normalise and the running ones
    advance in ``new_state``; ViT towers have no state (``None`` in, ``None`` out)."""
    from ...core.losses.contrastive import contrastive_loss_with_temperature

    if not model.is_resnet:  # a ViT tower has no state (init_state() is None): CLIPOutput alone
        out, new_state = model(params, batch["images"], batch["tokens"], key=key), None
    else:
        out, new_state = model(params, batch["images"], batch["tokens"], state, key=key, training=True)
    scale = out.logit_scale.clamp(0.0, math.log(100.0))
    loss = contrastive_loss_with_temperature(out.image_embeddings, out.text_embeddings, scale,
                                             backprop_type=backprop_type).loss
    return loss, new_state


@torch.no_grad()
def evaluate(model, params: Params, datasets: Datasets, *, batch_size: int = 128, context_length: int,
             state: Params | None = None, device: str | torch.device = "cpu") -> dict:
    """Zero-shot accuracy over every class prompt on the eval split (seen attribute combinations)
    and on the held-out split, and image<->text recall@1/5 on the eval split. ``state``: the
    batch-norm statistics of a ResNet image tower (from training). Batches go to ``device``
    (where the params are)."""
    from ...data import CLIPTokenizer
    from ...eval.retrieval import recall_at_k

    metrics: dict[str, float] = {}
    if datasets.eval is None:
        return metrics
    collate = Collate(context_length)
    prompts = CLIPTokenizer(context_length=context_length)(datasets.class_prompts).to(device)
    class_emb = model.encode_text(params, prompts)
    for name, ds in (("seen", datasets.eval), ("heldout", datasets.heldout)):
        if ds is None:
            continue
        correct = total = 0
        img_all, txt_all = [], []
        loader = DataLoader(ds, batch_size=batch_size, collate_fn=collate)
        for batch in eval_progress(loader, f"eval {name}"):
            batch = {k: v.to(device) for k, v in batch.items()}
            img = model.encode_image(params, batch["images"], state=state)
            correct += int(((img @ class_emb.T).argmax(-1) == batch["labels"]).sum())
            total += len(img)
            if name == "seen":
                img_all.append(img)
                txt_all.append(model.encode_text(params, batch["tokens"]))
        metrics[f"eval/zero_shot_{name}"] = correct / max(total, 1)
        if name == "seen":
            img, txt = torch.cat(img_all).cpu(), torch.cat(txt_all).cpu()
            r = recall_at_k(img, txt, torch.arange(len(img)), ks=(1, 5))
            metrics |= {f"eval/{k}": v for k, v in r.items() if "_R@" in k}
    return metrics


@dataclass
class CLIPOptions:
    """``polymodal train clip``'s data options (the loop's are :class:`polymodal.train.LoopConfig`)."""

    data: str = option("synthetic", "'synthetic' (built-in shapes captions, the default), a JSONL/CSV of "
                       "image,caption rows, or WebDataset shards ('shards/{000000..000099}.tar': streamed, resumable; "
                       "with --train-num-samples)")
    train_num_samples: int | None = option(None, "samples in an epoch of WebDataset shards, as open_clip's (needed "
                                           "unless a sizes.json lies beside the shards)", positive=True)
    image_root: str | None = option(None, "folder that image paths in --data are relative to")
    epochs: float | None = option(None, "passes over the data (overrides --steps)")
    train_size: int = option(20_000, "synthetic training pairs", positive=True)
    eval_size: int = option(512, "synthetic eval pairs per split", positive=True)
    workers: int = option(0, "DataLoader worker processes")
    skip_bad: bool = option(False, "skip and count unreadable samples instead of failing")
    dp: bool = option(False, "not for CLIP: its contrastive loss couples the examples of a batch (docs/privacy.md); "
                      "use 'polymodal train classifier --dp'", group="differential privacy")

    def __post_init__(self) -> None:
        if self.dp:
            raise ValueError("--dp: CLIP's contrastive loss couples the examples of a batch, so per-example clipping "
                             "does not bound one example's influence (docs/privacy.md). DP-SGD applies to per-example "
                             "losses: 'polymodal train classifier --dp --init-from RUN' fine-tunes a CLIP image tower "
                             "privately.")


class CLIPTask:
    """Contrastive image-text pretraining of a CLIP preset on synthetic captions, a JSONL/CSV file or
    WebDataset shards (streamed by :class:`polymodal.data.ShardStream`, also a pure function of the step).

    Batches are a pure function of ``(seed, step)`` (:class:`StepBatches`), so a resumed run
    sees the data the uninterrupted one saw; each rank takes its slice of the global batch and
    the loss gathers embeddings across ranks. Model state: a ResNet image tower's batch-norm
    statistics (``None`` for a ViT).
    """

    Options = CLIPOptions
    loop_defaults = {"out": "runs/clip"}

    def __init__(self, preset: str, options: CLIPOptions, loop: Any) -> None:
        self.preset, self.options, self.loop = preset, options, loop
        self.model = build_model(preset)
        from ...data.stream import is_shard_pattern

        self.shards = None
        if is_shard_pattern(options.data):  # streamed (polymodal.data.ShardStream); the pattern and epoch checked here
            self.shards = self._stream(0, 0, 1)
            self.data, n = Datasets(None, None, None, None), self.shards.num_samples
        elif options.train_num_samples is not None:
            raise ValueError(f"--train-num-samples: for WebDataset shards ('shards/{{000000..000099}}.tar'), got "
                             f"--data {options.data!r} (whose size is known)")
        else:
            self.data = make_datasets(options.data, self.model.image_size, seed=loop.seed,
                                      train_size=options.train_size, eval_size=options.eval_size,
                                      image_root=options.image_root, skip_bad=options.skip_bad)
            n = len(self.data.train)
            if n < loop.batch_size:  # before any rank starts, naming the data
                what = "--train-size" if options.data == "synthetic" else f"--data {options.data!r}"
                raise ValueError(f"{what}: {n} training samples{' (the file holds none)' if n == 0 else ''}, fewer "
                                 f"than one --batch-size {loop.batch_size}")
        self.steps = loop.steps if options.epochs is None else max(1, math.ceil(options.epochs * n / loop.batch_size))
        self.name, self.title = f"clip-{preset}", f"CLIP {preset} on {options.data}"

    def init(self, key: Tensor) -> tuple[Params, Params | None]:
        return self.model.init(key=key), self.model.init_state()

    def loss(self, params: Params, state: Params | None, batch: dict, key: Tensor) -> LossOutput:
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        loss, new_state = clip_loss(self.model, params, batch, key, state=state,
                                    backprop_type="global" if world > 1 else "none")
        return LossOutput(loss, {}, new_state)

    def _stream(self, start_step: int, rank: int, world: int):
        from ...data import CLIPImageTransform, ShardStream

        opts = self.options
        return ShardStream(opts.data, batch_size=self.loop.batch_size, num_samples=opts.train_num_samples,
                           key=pr.fold_in(pr.key(self.loop.seed), 1), start_step=start_step,
                           stop_step=getattr(self, "steps", None), rank=rank, world=world,
                           transform=CLIPImageTransform(self.model.image_size, is_train=True),
                           skip_bad=opts.skip_bad)

    def train_batches(self, start_step: int, rank: int, world: int) -> DataLoader:
        if self.shards is not None:  # each rank's batch of each step; the workers take turns by step
            workers = self.options.workers
            return DataLoader(self._stream(start_step, rank, world), batch_size=None,
                              collate_fn=Collate(self.model.context_length), num_workers=workers,
                              persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())
        sampler = StepBatches(len(self.data.train), self.loop.batch_size, self.steps,
                              key=pr.fold_in(pr.key(self.loop.seed), 1), start_step=start_step, rank=rank, world=world)
        workers = self.options.workers
        return DataLoader(self.data.train, batch_sampler=sampler, collate_fn=Collate(self.model.context_length),
                          num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available())

    def evaluate(self, params: Params, state: Params | None, *, device: Any = "cpu") -> dict:
        return evaluate(self.model, params, self.data, context_length=self.model.context_length, state=state,
                        device=device)
