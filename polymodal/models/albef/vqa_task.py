"""``polymodal train albef-vqa``: ALBEF VQA on built-in questions about rendered shapes (colour, shape, size,
count; :mod:`.scenes`) through the one loop. The answer decoder is trained with the causal LM loss and
momentum distillation (momentum copies as the loop's state); evaluation ranks the whole candidate
answer list (:meth:`ALBEFForVQA.rank_answers`) and reports accuracy overall and per question kind.

>>> from polymodal.train import LoopConfig, make_task
>>> task = make_task("albef-vqa", "tiny", {"train_size": 32}, LoopConfig(steps=2, batch_size=8))
>>> b = next(iter(task.train_batches(0, 0, 1)))
>>> b["images"].shape, b["answer_ids"].shape
(torch.Size([8, 3, 32, 32]), torch.Size([8, 3]))
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...core import random as pr
from ...core.pytree import Params
from ...train.task import LossOutput, eval_progress, option
from .builders import BUILDERS
from .momentum import with_momentum_form
from .scenes import ANSWERS, KINDS, SyntheticVQA
from .task import step_indices
from .text import synthetic_tokenizer, synthetic_vocab

__all__ = ["ALBEFVQATask", "ALBEFVQAOptions"]


@dataclass
class ALBEFVQAOptions:
    """``polymodal train albef-vqa``'s options."""

    train_size: int = option(4096, "synthetic training questions", positive=True)
    eval_size: int = option(256, "synthetic evaluation questions", positive=True)
    alpha: float = option(0.4, "momentum distillation weight of the answer loss")


class ALBEFVQATask:
    """See the module docstring."""

    Options = ALBEFVQAOptions
    loop_defaults = {"steps": 600, "batch_size": 32, "lr": 2e-3, "weight_decay": 0.02, "eval_every": 0,
                     "save_every": 0, "out": "runs/albef-vqa"}

    def __init__(self, preset: str, options: ALBEFVQAOptions, loop: Any) -> None:
        from ...registry import family

        self.preset, self.options, self.loop = preset, options, loop
        self.tokenizer = synthetic_tokenizer(16)
        self.model = BUILDERS[family("albef-vqa").builder_name(preset)](vocab_size=len(synthetic_vocab()),
                                                                        max_position_embeddings=16)
        size = self.model.model.vision.embeddings.image_size[0]
        self.train_set = SyntheticVQA("train", options.train_size, size, loop.seed)
        self.eval_set = SyntheticVQA("eval", options.eval_size, size, loop.seed)
        if options.train_size < loop.batch_size:
            raise ValueError(f"--train-size {options.train_size} is smaller than one --batch-size {loop.batch_size}")
        enc = self.tokenizer(list(ANSWERS))
        self.answer_ids, self.answer_mask = enc["input_ids"], enc["attention_mask"]
        self.steps, self.name, self.title = loop.steps, f"albef-vqa-{preset}", f"ALBEF VQA {preset} on synthetic shapes"
        self.key = pr.fold_in(pr.key(loop.seed), 1)

    def init(self, key: Tensor) -> tuple[Params, Params]:
        params = self.model.init(key=key)
        return params, self.model.initial_state(params)

    def collate(self, items: list[dict]) -> dict:
        q = self.tokenizer([it["question"] for it in items])
        a = [ANSWERS.index(it["answer"]) for it in items]
        return {"images": torch.stack([it["image"] for it in items]), "question_ids": q["input_ids"],
                "question_mask": q["attention_mask"], "answer_ids": self.answer_ids[a],
                "answer_mask": self.answer_mask[a], "answer": torch.tensor(a)}

    def train_batches(self, start_step: int, rank: int, world: int) -> Iterator[dict]:
        bs = self.loop.batch_size
        local = bs // world
        for step in range(start_step, self.steps):
            mine = step_indices(len(self.train_set), bs, step, self.key)[rank * local:(rank + 1) * local]
            yield self.collate([self.train_set[i] for i in mine])

    def loss(self, params: Params, state: Params, batch: dict, key: Tensor) -> LossOutput:
        b = batch["images"].shape[0]
        ones = torch.ones(b, device=batch["images"].device)
        loss, new_state = with_momentum_form(  # --shard: as ALBEFRetrievalTask.loss
            lambda s: self.model(params, batch["images"], batch["question_ids"], batch["question_mask"],
                                 batch["answer_ids"], batch["answer_mask"], ones, ones.long(), s,
                                 alpha=self.options.alpha, key=key),
            state, params, params)
        return LossOutput(loss, {}, new_state)

    @torch.no_grad()
    def evaluate(self, params: Params, state: Params | None, *, device: Any = "cpu") -> dict:
        right = {k: 0 for k in KINDS}
        total = {k: 0 for k in KINDS}
        for i in eval_progress(range(0, len(self.eval_set), 64), "eval vqa"):
            items = [self.eval_set[j] for j in range(i, min(i + 64, len(self.eval_set)))]
            b = self.collate(items)
            ids, _ = self.model.rank_answers(params, b["images"].to(device), b["question_ids"].to(device),
                                             b["question_mask"].to(device), self.answer_ids.to(device),
                                             self.answer_mask.to(device), k=len(ANSWERS))
            for it, pred, gold in zip(items, ids[:, 0].tolist(), b["answer"].tolist()):
                right[it["kind"]] += int(pred == gold)
                total[it["kind"]] += 1
        out = {"eval/vqa_accuracy": sum(right.values()) / max(sum(total.values()), 1)}
        return out | {f"eval/vqa_accuracy_{k}": right[k] / max(total[k], 1) for k in KINDS}
