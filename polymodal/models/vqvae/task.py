"""``polymodal train vqvae``: a video VQ-VAE on the built-in moving-shapes clips, through the one loop.

Clips (``polymodal.data.motion.MovingShapes``, 8 frames of 32x32 by default) are shifted to
``[-0.5, 0.5]`` (VideoGPT's input range). The loss is reconstruction MSE + commitment; the codebook
moves by EMA in the returned state. Metrics: per step the reconstruction, commitment and the share
of the codebook the batch used; at evaluation, on held-out clips, the reconstruction PSNR (dB, per clip,
averaged; pixels in [0, 1]) and the codebook usage (codes used at least once / K) and perplexity.

>>> from polymodal.train import LoopConfig, make_task
>>> task = make_task("vqvae", "tiny", {"train_size": 8, "eval_size": 4}, LoopConfig(steps=1, batch_size=4))
>>> next(iter(task.train_batches(0, 0, 1))).shape
torch.Size([4, 3, 8, 32, 32])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...core import random as pr
from ...core.pytree import Params
from ...data.motion import MovingShapes
from ...train.task import LossOutput, eval_progress, option
from .builders import BUILDERS

__all__ = ["VQVAETask", "VQVAEOptions", "psnr"]


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-clip PSNR in dB of ``x``, ``y (B, ...)`` with values in [0, 1]: ``10 log10(1 / mse)``."""
    mse = (x - y).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


@dataclass
class VQVAEOptions:
    """The task's options (the loop's are :class:`polymodal.train.LoopConfig`)."""

    train_size: int = option(4096, "synthetic training clips", positive=True)
    eval_size: int = option(128, "held-out clips for PSNR and codebook usage", positive=True)
    frames: int = option(8, "frames per clip", positive=True)
    image_size: int = option(32, "frame side in pixels", positive=True)


class VQVAETask:
    """Reconstruct moving-shape clips with a video VQ-VAE."""

    Options = VQVAEOptions
    loop_defaults = {"steps": 600, "batch_size": 16, "lr": 3e-3, "weight_decay": 0.0, "eval_every": 200,
                     "save_every": 200, "out": "runs/vqvae"}

    def __init__(self, preset: str, options: VQVAEOptions, loop: Any) -> None:
        from ...registry import family

        self.preset, self.options, self.loop = preset, options, loop
        self.model = BUILDERS[family("vqvae").builder_name(preset)]()
        self.model.latent_shape((options.frames, options.image_size, options.image_size))  # a clear error early
        self.train_set = MovingShapes("train", options.train_size, options.frames, options.image_size, seed=loop.seed)
        self.eval_set = MovingShapes("eval", options.eval_size, options.frames, options.image_size, seed=loop.seed)
        self.steps, self.name, self.title = loop.steps, f"vqvae-{preset}", f"video VQ-VAE ({preset})"
        self.root = pr.key(loop.seed)

    def init(self, key: Tensor) -> tuple[Params, Params]:
        return self.model.init(key=key), self.model.init_state()

    def _clips(self, dataset: MovingShapes, indices: list[int]) -> Tensor:
        return torch.stack([item["video"] for item in dataset.__getitems__(indices)])

    def train_batches(self, start_step: int, rank: int, world: int):
        b, n = self.loop.batch_size // world, len(self.train_set)
        for step in range(start_step, self.steps):
            perm = pr.permutation(pr.fold_in(self.root, 7 + step * b // n), n).tolist()
            first = (step * self.loop.batch_size + rank * b) % n
            yield self._clips(self.train_set, [perm[(first + i) % n] for i in range(b)])

    def loss(self, params: Params, state: Params, batch: Tensor, key: Tensor) -> LossOutput:
        x = batch - 0.5
        out, new_state = self.model(params, x, state, training=True, key=key)
        ls = self.model.losses(out, x)
        used = torch.bincount(out.codebook_output.codebook_indices.flatten(), minlength=self.model.num_embeddings)
        metrics = {"reconstruction": ls["reconstruction"].detach(), "commitment": ls["commitment"].detach(),
                   "batch_code_share": (used > 0).float().mean()}
        return LossOutput(ls["loss"], metrics, new_state)

    @torch.no_grad()
    def evaluate(self, params: Params, state: Params, *, device: Any = "cpu") -> dict:
        counts = torch.zeros(self.model.num_embeddings, device=device)
        scores = []
        n = len(self.eval_set)
        for i in eval_progress(range(0, n, 32), "eval"):
            x = self._clips(self.eval_set, list(range(i, min(i + 32, n)))).to(device)
            codes = self.model.encode(params, x - 0.5, state)
            rec = (self.model.decode(params, codes, state) + 0.5).clamp(0, 1)
            scores.append(psnr(rec, x))
            counts += torch.bincount(codes.flatten(), minlength=self.model.num_embeddings)
        p = counts / counts.sum()
        perplexity = math.exp(float(-(p * p.clamp_min(1e-12).log()).sum()))
        return {"eval/psnr": float(torch.cat(scores).mean()), "eval/codebook_usage": float((counts > 0).float().mean()),
                "eval/perplexity": perplexity}
