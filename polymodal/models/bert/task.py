"""``polymodal train bert-classifier``: fine-tune a small BERT on a built-in synthetic text task,
optionally with DP-SGD, through the one training loop.

The task: sentences of 3-12 filler words with one cue word somewhere ("... the movie was *great*
...", label "positive"; *awful*: "negative"; *fine*: "neutral"); the label is the cue's class.
Sentences are tokenised by :class:`~polymodal.data.BertTokenizer` (WordPiece over the task's word
list, so padding is ragged as in real text) and read by a :class:`~polymodal.models.bert.BERTClassifier`.
With ``dp=True`` batches are Poisson-sampled, per-example gradients are clipped by the norm-only
(ghost) method, which follows the word, position and token-type embeddings, noise is added and the
RDP accountant's epsilon is logged and saved with the run.

>>> from polymodal.train import LoopConfig, make_task
>>> task = make_task("bert-classifier", "tiny", {"train_size": 64, "dp": True, "noise_multiplier": 1.0},
...                  LoopConfig(steps=2, batch_size=16))
>>> batch = next(iter(task.train_batches(0, 0, 1)))
>>> sorted(batch), batch["input_ids"].dtype
(['attention_mask', 'input_ids', 'labels', 'token_type_ids'], torch.int64)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core import random as pr
from ...core.pytree import Params
from ...data.bert_tokenizer import BertTokenizer
from ...train.dp.task import DPOptions, PerExampleTask
from ...train.task import eval_progress, option
from .builders import BUILDERS

__all__ = ["BERTClassifierTask", "BERTClassifierOptions", "SyntheticSentences", "CUES", "FILLERS"]

CUES = {"positive": ("great", "wonderful", "superb", "lovely"), "negative": ("awful", "terrible", "dreadful", "bad"),
        "neutral": ("fine", "okay", "average", "ordinary")}
FILLERS = ("the", "a", "movie", "film", "plot", "actor", "was", "and", "it", "i", "thought", "really", "quite",
           "story", "music", "ending", "very", "this", "of", "with", "scene", "seemed", "overall", "honestly")
_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class SyntheticSentences:
    """``n`` sentences and labels drawn from ``key`` (item ``i`` from ``fold_in(key, i)``: any subset is cheap)."""

    labels = tuple(CUES)

    def __init__(self, n: int, key: Tensor) -> None:
        self.n, self.key = n, key

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[str, int]:
        if not 0 <= i < self.n:
            raise IndexError(f"SyntheticSentences: index {i} outside [0, {self.n})")
        k = pr.fold_in(self.key, i)
        draws = pr.randint(k, (16,), 0, 10_000).tolist()
        label = draws[0] % len(self.labels)
        length = 3 + draws[1] % 10
        words = [FILLERS[d % len(FILLERS)] for d in draws[2:2 + length]]
        cues = CUES[self.labels[label]]
        words.insert(draws[14] % (length + 1), cues[draws[15] % len(cues)])
        return " ".join(words), label

    @staticmethod
    def vocab() -> dict[str, int]:
        words = list(_SPECIALS) + sorted(set(FILLERS) | {w for ws in CUES.values() for w in ws})
        return {w: i for i, w in enumerate(words)}


@dataclass
class BERTClassifierOptions(DPOptions):
    """The task's options (the loop's are :class:`polymodal.train.LoopConfig`; DP's are
    :class:`polymodal.train.dp.task.DPOptions`)."""

    train_size: int = option(2_000, "synthetic training sentences", positive=True)
    eval_size: int = option(300, "synthetic evaluation sentences", positive=True)
    max_length: int = option(32, "tokens per sentence (truncation)", positive=True)


class BERTClassifierTask(PerExampleTask):
    """Cue-word sentence classification with a BERT classifier (3 classes)."""

    Options = BERTClassifierOptions
    loop_defaults = {"steps": 150, "batch_size": 32, "lr": 2e-3, "weight_decay": 0.0, "eval_every": 0,
                     "save_every": 0, "out": "runs/bert-classifier"}
    trainable_presets = ("tiny", "minilm", "bert_tiny_classifier", "minilm_l6_h384_classifier")

    def __init__(self, preset: str, options: BERTClassifierOptions, loop: Any) -> None:
        from ...registry import family

        self.preset, self.options, self.loop = preset, options, loop
        vocab = SyntheticSentences.vocab()
        self.tokenizer = BertTokenizer(vocab, max_length=options.max_length)
        builder = BUILDERS[family("bert-classifier").builder_name(preset)]
        self.model = builder(num_labels=len(CUES), vocab_size=len(vocab),
                             max_position_embeddings=max(options.max_length, 8))
        self.root = pr.key(loop.seed)
        self.train_set = SyntheticSentences(options.train_size, pr.fold_in(self.root, 1))
        self.eval_set = SyntheticSentences(options.eval_size, pr.fold_in(self.root, 2))
        self.steps, self.num_samples = loop.steps, len(self.train_set)
        self.name = "bert-classifier" + (" (DP)" if options.dp else "")
        self.title = f"BERT classifier ({preset})" + (" with DP-SGD" if options.dp else "")
        self.setup()

    def init(self, key: Tensor) -> tuple[Params, None]:
        return self.model.init(key=key), None

    def per_example(self, p: Params, state: None, b: dict) -> Tensor:
        logits = self.model(p, b["input_ids"], b["attention_mask"], b["token_type_ids"])
        return F.cross_entropy(logits, b["labels"], reduction="none")

    def collate(self, items: list[tuple[str, int]]) -> dict:
        """Sentences -> ``input_ids``, ``token_type_ids``, ``attention_mask`` ``(B, T)`` and ``labels (B,)``."""
        if not items:  # an empty Poisson batch
            z = torch.zeros(0, 1, dtype=torch.long)
            return {"input_ids": z, "token_type_ids": z, "attention_mask": z, "labels": torch.zeros(0, dtype=torch.long)}
        enc = self.tokenizer([s for s, _ in items])
        return dict(enc) | {"labels": torch.tensor([y for _, y in items], dtype=torch.long)}

    def batch(self, indices: list[int]) -> dict:
        return self.collate([self.train_set[i] for i in indices])

    @torch.no_grad()
    def evaluate(self, params: Params, state: None, *, device: Any = "cpu") -> dict:
        correct = 0
        for i in eval_progress(range(0, len(self.eval_set), 128), "eval"):
            b = self.collate([self.eval_set[j] for j in range(i, min(i + 128, len(self.eval_set)))])
            b = {k: v.to(device) for k, v in b.items()}
            pred = self.model(params, b["input_ids"], b["attention_mask"], b["token_type_ids"]).argmax(-1)
            correct += int((pred == b["labels"]).sum())
        return {"eval/accuracy": correct / len(self.eval_set)} | self.dp_metrics()
