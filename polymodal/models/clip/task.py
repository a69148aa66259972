"""What a CLIP training run needs besides the loop: presets, data, the loss, evaluation.

Everything here is functional: the model is a spec, params a pytree, the loss a pure
function of ``(params, batch, key)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from ...core import random as pr
from ...core.pytree import Params

__all__ = ["PRESETS", "build_model", "make_datasets", "StepBatches", "clip_loss", "evaluate", "Collate"]

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
    from ...data.transforms import CLIPImageTransform

    if data == "synthetic":
        mk = lambda split, n: SyntheticCaptions(split, size=n, image_size=image_size, seed=seed, normalize=True)  # noqa: E731
        train = mk("train", train_size)
        return Datasets(train, mk("eval", eval_size), mk("heldout", eval_size), train.prompts())
    if data.endswith(".tar") or "{" in data:
        raise ValueError("WebDataset shards stream without an index: use polymodal.data.webdataset_pipeline in Python "
                         "(the CLI trains on map-style data: 'synthetic' or a JSONL/CSV file)")
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

    if state is None:
        out, new_state = model(params, batch["images"], batch["tokens"], key=key), None
    else:
        out, new_state = model(params, batch["images"], batch["tokens"], state, key=key, training=True)
    scale = out.logit_scale.clamp(0.0, math.log(100.0))
    loss = contrastive_loss_with_temperature(out.image_embeddings, out.text_embeddings, scale,
                                             backprop_type=backprop_type).loss
    return loss, new_state


@torch.no_grad()
def evaluate(model, params: Params, datasets: Datasets, *, batch_size: int = 128, context_length: int,
             state: Params | None = None) -> dict:
    """Zero-shot accuracy over every class prompt on the eval split (seen attribute combinations)
    and on the held-out split, and image<->text recall@1/5 on the eval split. ``state``: the
    batch-norm statistics of a ResNet image tower (from training)."""
    from ...data import CLIPTokenizer
    from ...eval.retrieval import recall_at_k

    metrics: dict[str, float] = {}
    if datasets.eval is None:
        return metrics
    collate = Collate(context_length)
    class_emb = model.encode_text(params, CLIPTokenizer(context_length=context_length)(datasets.class_prompts))
    for name, ds in (("seen", datasets.eval), ("heldout", datasets.heldout)):
        if ds is None:
            continue
        correct = total = 0
        img_all, txt_all = [], []
        for batch in DataLoader(ds, batch_size=batch_size, collate_fn=collate):
            img = model.encode_image(params, batch["images"], state=state)
            correct += int(((img @ class_emb.T).argmax(-1) == batch["labels"]).sum())
            total += len(img)
            if name == "seen":
                img_all.append(img)
                txt_all.append(model.encode_text(params, batch["tokens"]))
        metrics[f"eval/zero_shot_{name}"] = correct / max(total, 1)
        if name == "seen":
            img, txt = torch.cat(img_all), torch.cat(txt_all)
            r = recall_at_k(img, txt, torch.arange(len(img)), ks=(1, 5))
            metrics |= {f"eval/{k}": v for k, v in r.items() if "_R@" in k}
    return metrics
