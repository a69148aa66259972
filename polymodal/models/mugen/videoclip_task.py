"""VideoCLIP's training task for the one loop: synthetic moving-shape clips and their captions,
text <-> video retrieval recall@1/5/10 on a held-out split.

``polymodal train videoclip --preset tiny`` trains :func:`~.videoclip_builders.videoclip_tiny` on
``polymodal.data.motion.MovingShapes`` clips ("a red circle moves left"): 120 distinct captions
(5 shapes x 6 colours x 4 directions), so a retrieval counts as correct when the retrieved item
has the query's caption (several eval clips share one). The chance level of each recall is
reported beside it (``eval/chance_t2v_R@k``: the expected recall of a random ranking).

>>> from polymodal.train import LoopConfig, make_task
>>> task = make_task("videoclip", "tiny", {"train_size": 64, "eval_size": 16}, LoopConfig(steps=2, batch_size=8))
>>> b = next(iter(task.train_batches(0, 0, 1)))
>>> b["video"].shape, b["input_ids"].shape
(torch.Size([8, 3, 8, 32, 32]), torch.Size([8, 8]))
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...core import random as pr
from ...core.pytree import Params
from ...data.motion import COLORS, DIRECTIONS, SHAPES, MovingShapes
from ...train.task import LossOutput, eval_progress, option

__all__ = ["CaptionVocab", "VideoCLIPOptions", "VideoCLIPTask", "caption_recall"]


class CaptionVocab:
    """Word-level BERT-style ids for the moving-shapes captions: ``[CLS] words [SEP]`` padded with 0.

    >>> CaptionVocab().encode(["a red circle moves left"], 8).tolist()
    [[1, 4, 7, 13, 6, 18, 2, 0]]
    """

    SPECIAL = ("[PAD]", "[CLS]", "[SEP]", "[UNK]")

    def __init__(self) -> None:
        words = ["a", "an", "moves", *COLORS, *SHAPES, *DIRECTIONS]
        self.vocab = list(self.SPECIAL) + list(dict.fromkeys(words))
        self.index = {w: i for i, w in enumerate(self.vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, captions: Sequence[str], length: int) -> Tensor:
        """``(B, length)`` int64; a caption longer than ``length`` tokens is an error naming both."""
        unk = self.index["[UNK]"]
        rows = []
        for c in captions:
            ids = [1] + [self.index.get(w, unk) for w in c.lower().split()] + [2]
            if len(ids) > length:
                raise ValueError(f"CaptionVocab: {c!r} is {len(ids)} tokens with [CLS]/[SEP]; expected at most {length}")
            rows.append(ids + [0] * (length - len(ids)))
        return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), length)


def caption_recall(text: Tensor, video: Tensor, captions: Sequence[str], ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@k both ways from unit embeddings ``(N, E)`` of ``N`` (caption, clip) pairs, where an
    item is relevant to a query when their captions are equal; with the chance level of each
    (the expected recall of a uniformly random ranking)."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    cls = torch.tensor([ids[c] for c in captions])
    relevant = cls[:, None] == cls[None, :]  # (N, N), symmetric
    sim = text @ video.T  # (texts, videos)
    n = len(captions)
    out: dict[str, float] = {}
    m = relevant.sum(1).double()  # relevant items per query
    for k in ks:
        k_ = min(k, n)
        for name, s in (("t2v", sim), ("v2t", sim.T)):
            top = s.topk(k_, dim=1).indices
            out[f"eval/{name}_R@{k}"] = float(relevant.gather(1, top).any(1).double().mean())
        # P(no relevant item among k drawn without replacement from n) = C(n - m, k) / C(n, k)
        miss = torch.ones(n, dtype=torch.float64)
        for j in range(k_):
            miss = miss * ((n - m - j) / (n - j)).clamp_min(0)
        out[f"eval/chance_R@{k}"] = float((1 - miss).mean())
    return out


@dataclass
class VideoCLIPOptions:
    """``polymodal train videoclip``'s data options."""

    train_size: int = option(8192, "synthetic training clips", positive=True)
    eval_size: int = option(256, "held-out clips for retrieval (the 'eval' split)", positive=True)
    frames: int = option(8, "frames per clip", positive=True)
    image_size: int = option(32, "side of the frames", positive=True)
    text_length: int = option(8, "token ids per caption ([CLS] + words + [SEP], padded)", positive=True)


class VideoCLIPTask:
    """Contrastive text-video training of a VideoCLIP preset on synthetic moving shapes.

    Batches are a pure function of ``(seed, step)``: epoch ``e`` visits
    ``permutation(fold_in(key, e))``; each rank takes its slice. Model state: the S3D's
    batch-norm statistics, advanced by every training step.
    """

    Options = VideoCLIPOptions
    loop_defaults = {"steps": 600, "batch_size": 32, "lr": 5e-3, "weight_decay": 1e-3, "eval_every": 0,
                     "save_every": 0, "out": "runs/videoclip"}

    def __init__(self, preset: str, options: VideoCLIPOptions, loop: Any) -> None:
        from ...registry import family

        self.preset, self.options, self.loop = preset, options, loop
        self.vocab = CaptionVocab()
        self.model = family("videoclip").build(preset)
        if options.text_length > self.model.context_length:
            raise ValueError(f"--text-length {options.text_length}: longer than the text context "
                             f"({self.model.context_length})")
        if len(self.vocab) > self.model.text.embeddings.vocab_size:
            raise ValueError(f"videoclip: preset {preset!r} has {self.model.text.embeddings.vocab_size} word ids, "
                             f"the captions need {len(self.vocab)}")
        self.model.video.check_video(torch.empty(1, 3, options.frames, options.image_size, options.image_size,
                                                 device="meta"))
        self.train_set = MovingShapes("train", options.train_size, options.frames, options.image_size, loop.seed)
        self.eval_set = MovingShapes("eval", options.eval_size, options.frames, options.image_size, loop.seed)
        if options.train_size < loop.batch_size:
            raise ValueError(f"--train-size {options.train_size}: fewer than one --batch-size {loop.batch_size}")
        self.steps = loop.steps
        self.name, self.title = f"videoclip-{preset}", f"VideoCLIP {preset} on moving shapes"

    def init(self, key: Tensor) -> tuple[Params, Params]:
        return self.model.init(key=key), self.model.init_state()

    def collate(self, items: list[dict]) -> dict:
        return {"video": torch.stack([it["video"] for it in items]),
                "input_ids": self.vocab.encode([it["caption"] for it in items], self.options.text_length)}

    def loss(self, params: Params, state: Params | None, batch: dict, key: Tensor) -> LossOutput:
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        out, new_state = self.model(params, batch["video"], batch["input_ids"], state, training=True, key=key)
        loss = self.model.loss(params, out, backprop_type="global" if world > 1 else "none").loss
        return LossOutput(loss, {"logit_scale": out.logit_scale.detach()}, new_state)

    def train_batches(self, start_step: int, rank: int, world: int) -> Iterator[dict]:
        bs, n = self.loop.batch_size, len(self.train_set)
        if bs % world:
            raise ValueError(f"global batch size {bs} must be divisible by the {world} ranks")
        key, per_epoch, local = pr.fold_in(pr.key(self.loop.seed), 1), n // bs, bs // world
        for step in range(start_step, self.steps):
            epoch, i = divmod(step, per_epoch)
            idx = pr.permutation(pr.fold_in(key, epoch), n)[i * bs:(i + 1) * bs][rank * local:(rank + 1) * local]
            yield self.collate(self.train_set.__getitems__(idx.tolist()))

    @torch.no_grad()
    def evaluate(self, params: Params, state: Params | None, *, device: Any = "cpu") -> dict:
        texts, videos, captions = [], [], []
        for i in eval_progress(range(0, len(self.eval_set), 128), "eval"):
            items = self.eval_set.__getitems__(list(range(i, min(i + 128, len(self.eval_set)))))
            b = {k: v.to(device) for k, v in self.collate(items).items()}
            texts.append(self.model.encode_text(params, b["input_ids"]).cpu())
            videos.append(self.model.encode_video(params, b["video"], state=state).cpu())
            captions += [it["caption"] for it in items]
        return caption_recall(torch.cat(texts), torch.cat(videos), captions)
