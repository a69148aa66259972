"""``polymodal train albef``: ALBEF retrieval pretraining (ITC + ITM + MLM with momentum distillation) on the
built-in synthetic shapes and captions, through the one training loop.

The model state (momentum copies, queues and pointer) is the loop's ``state``: returned by every
step, saved in checkpoints and restored on ``--resume``, so a resumed run equals an uninterrupted one.
Under ``--shard`` the momentum copies are stored sharded as the loop shards the params (DTensors,
``Shard(0)``); within a step they take the form of the params the model sees (block stacks sharded,
gathered block by block at the seam; the rest gathered once), and the queues, identical on every
rank, receive the momentum features of all ranks (:func:`~.momentum.gather_features`).
Batches are a pure function of ``(seed, step)``; the step key draws dropout, hard negatives and the
MLM corruption. Evaluation: image<->text recall@1/5/10 on the eval split (attribute pairs seen in
training) and the held-out split (unseen shape-colour pairs), one image per distinct caption, from
contrastive scores alone and after ITM re-ranking of the top-k (:mod:`.rerank`). Captions name every
attribute ("a small red circle on the left") and the sample id is the attribute combination
(:func:`scene_id`), so images a caption describes equally are ITC positives and never ITM negatives.

>>> from polymodal.train import LoopConfig, make_task
>>> task = make_task("albef", "tiny", {"train_size": 64}, LoopConfig(steps=2, batch_size=16))
>>> b = next(iter(task.train_batches(0, 0, 1)))
>>> b["images"].shape, sorted(b)
(torch.Size([16, 3, 32, 32]), ['attention_mask', 'idx', 'images', 'input_ids'])
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...core import random as pr
from ...core.pytree import Params
from ...data.synthetic import COLORS, POSITIONS, SHAPES, SIZES, TEMPLATES, SyntheticCaptions
from ...train.task import LossOutput, eval_progress, option
from .builders import BUILDERS
from .momentum import check_queue, with_momentum_form
from .rerank import recall_from_scores, retrieval_scores
from .text import mask_tokens, synthetic_tokenizer, synthetic_vocab

__all__ = ["ALBEFRetrievalTask", "ALBEFOptions", "step_indices"]

EVAL_TEMPLATE = TEMPLATES[2]  # "a {size} {color} {shape} {where}": every attribute named


def scene_id(attributes: dict) -> int:
    """The id of an attribute combination (shape, colour, size, position): the sample id ALBEF's ITC
    targets and hard negatives use, so two images a caption describes equally are positives of each other."""
    s, c = SHAPES.index(attributes["shape"]), tuple(COLORS).index(attributes["color"])
    z, p = tuple(SIZES).index(attributes["size"]), tuple(POSITIONS).index(attributes["position"])
    return ((s * len(COLORS) + c) * len(SIZES) + z) * len(POSITIONS) + p


def step_indices(n: int, batch_size: int, step: int, key: Tensor) -> list[int]:
    """The global batch of ``step``: slice ``step mod epoch`` of epoch ``step // epoch``'s permutation."""
    per_epoch = n // batch_size
    epoch, i = divmod(step, per_epoch)
    return pr.permutation(pr.fold_in(key, epoch), n)[i * batch_size:(i + 1) * batch_size].tolist()


@dataclass
class ALBEFOptions:
    """``polymodal train albef``'s options (the loop's are :class:`polymodal.train.LoopConfig`)."""

    train_size: int = option(4096, "synthetic training pairs", positive=True)
    eval_size: int = option(256, "synthetic image-caption pairs per evaluation split", positive=True)
    alpha: float = option(0.4, "momentum distillation weight of ITC and MLM")
    mlm: bool = option(True, "masked language modelling (the third pretraining objective)")
    rerank_k: int = option(16, "candidates re-ranked by ITM in evaluation", positive=True)
    all_templates: bool = option(False, "train on all caption templates (some omit size and position, so a caption "
                                 "can fit images labelled as its negatives); default: the template naming every "
                                 "attribute")
    max_length: int = option(16, "tokens per caption", positive=True)


class ALBEFRetrievalTask:
    """See the module docstring."""

    Options = ALBEFOptions
    loop_defaults = {"steps": 600, "batch_size": 32, "lr": 2e-3, "weight_decay": 0.02, "eval_every": 0,
                     "save_every": 0, "out": "runs/albef"}

    def __init__(self, preset: str, options: ALBEFOptions, loop: Any) -> None:
        from ...registry import family

        self.preset, self.options, self.loop = preset, options, loop
        vocab = synthetic_vocab()
        self.tokenizer = synthetic_tokenizer(options.max_length)
        kw = {"vocab_size": len(vocab), "max_position_embeddings": max(options.max_length, 8)}
        self.model = BUILDERS[family("albef").builder_name(preset)](**kw)
        check_queue(self.model.queue_size, loop.batch_size // max(loop.grad_accum, 1), "polymodal train albef")
        size = self.model.model.vision.embeddings.image_size[0]
        mk = lambda split, n, **k: SyntheticCaptions(split, size=n, image_size=size, seed=loop.seed,  # noqa: E731
                                                     normalize=True, **k)
        self.train_set = mk("train", options.train_size,
                            **({} if options.all_templates else {"templates": (EVAL_TEMPLATE,)}))
        self.eval_sets = {"eval": mk("eval", options.eval_size, templates=(EVAL_TEMPLATE,)),
                          "heldout": mk("heldout", options.eval_size, templates=(EVAL_TEMPLATE,))}
        if options.train_size < loop.batch_size:
            raise ValueError(f"--train-size {options.train_size} is smaller than one --batch-size {loop.batch_size}")
        self.steps = loop.steps
        self.name, self.title = f"albef-{preset}", f"ALBEF {preset} on synthetic shapes"
        self.key = pr.fold_in(pr.key(loop.seed), 1)

    def init(self, key: Tensor) -> tuple[Params, Params]:
        kp, ks = pr.split(key, 2)
        params = self.model.init(key=kp)
        return params, self.model.initial_state(params, key=ks)

    def collate(self, items: list[dict], indices: list[int] | None = None) -> dict:
        """``indices`` None: each item's :func:`scene_id` (captions naming every attribute); else the indices."""
        enc = self.tokenizer([it["caption"] for it in items])
        ids = [scene_id(it["attributes"]) for it in items] if indices is None else indices
        return {"images": torch.stack([it["image"] for it in items]), "input_ids": enc["input_ids"],
                "attention_mask": enc["attention_mask"], "idx": torch.tensor(ids, dtype=torch.long)}

    def train_batches(self, start_step: int, rank: int, world: int) -> Iterator[dict]:
        bs = self.loop.batch_size
        if bs % world:
            raise ValueError(f"global batch size {bs} must be divisible by the {world} ranks")
        local = bs // world
        for step in range(start_step, self.steps):
            glob = step_indices(len(self.train_set), bs, step, self.key)
            mine = glob[rank * local:(rank + 1) * local]
            yield self.collate(self.train_set.__getitems__(mine), mine if self.options.all_templates else None)

    def loss(self, params: Params, state: Params, batch: dict, key: Tensor) -> LossOutput:
        k_model, k_mask = pr.split(key, 2)
        mlm = {}
        if self.options.mlm and self.model.mlm_head is not None:
            ids, labels = mask_tokens(k_mask, batch["input_ids"].cpu(), self.tokenizer)
            dev = batch["input_ids"].device
            mlm = {"mlm_input_ids": ids.to(dev), "mlm_labels": labels.to(dev)}
        out, new_state = with_momentum_form(  # --shard: copies in the params' form, stored sharded
            lambda s: self.model(params, batch["images"], batch["input_ids"], batch["attention_mask"], batch["idx"],
                                 s, key=k_model.to(batch["images"].device), alpha=self.options.alpha, **mlm),
            state, params, self.model.momentum_params(params))
        metrics = {"itc": out.itc_loss.detach(), "itm": out.itm_loss.detach()}
        if out.mlm_loss is not None:
            metrics["mlm"] = out.mlm_loss.detach()
        return LossOutput(out.loss, metrics, new_state)

    @torch.no_grad()
    def evaluate(self, params: Params, state: Params | None, *, device: Any = "cpu") -> dict:
        metrics: dict[str, float] = {}
        for name, ds in self.eval_sets.items():
            items, seen = [], set()
            for i in eval_progress(range(0, len(ds), 128), f"eval {name}"):
                for it in ds.__getitems__(list(range(i, min(i + 128, len(ds))))):
                    if it["caption"] not in seen:  # one image per caption: the pair is the only right answer
                        seen.add(it["caption"])
                        items.append(it)
            b = self.collate(items)
            sim, i2t, t2i = retrieval_scores(self.model, params, b["images"].to(device), b["input_ids"].to(device),
                                             b["attention_mask"].to(device), k=self.options.rerank_k)
            truth = torch.arange(len(items))
            metrics[f"eval/{name}_pairs"] = float(len(items))
            for tag, (a, c) in (("itc", (sim.cpu(), sim.T.cpu())), ("itm", (i2t.cpu(), t2i.cpu()))):
                for k, v in recall_from_scores(a, c, truth).items():
                    metrics[f"eval/{name}_{tag}_{k}"] = v
        return metrics
