"""``polymodal train video-gpt --vqvae RUN``: text -> video-code GPT on the moving-shapes captions.

The VQ-VAE of a finished ``polymodal train vqvae`` run tokenises the clips (its codes are the
output modality, its codebook initialises the GPT's video token table, as MUGEN's GPT reads its
frozen VQ-VAE's codebook); captions ("a blue square moves up") are the input modality, tokenised
by :class:`~polymodal.models.mugen.text.CaptionTokenizer` with MUGEN's unique pad ids. The loss is
next-token cross-entropy over the video codes (the logits are masked to the video vocabulary there);
evaluation reports it on held-out clips (``eval/video_nll``, nats per code).

The clips' codes are computed once, on first use (a run rebuilt for ``polymodal generate`` never
tokenises the data set).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core import random as pr
from ...core.pytree import Params
from ...data.motion import MovingShapes
from ...train.task import LossOutput, eval_progress, option
from .builders import BUILDERS
from .text import CaptionTokenizer

__all__ = ["VideoGPTTask", "VideoGPTOptions", "load_vqvae"]


def load_vqvae(run: str) -> tuple[Any, Params, Params, dict]:
    """``(spec, params, state, config)`` of a ``polymodal train vqvae`` run directory (through the
    run's registered family: no import of the vqvae package)."""
    from ...train.runs import load_run

    r = load_run(run)
    if r.config.get("family") != "vqvae":
        raise ValueError(f"--vqvae {run}: expected a run of the 'vqvae' family, got {r.config.get('family')!r}")
    return r.model, r.params, r.state, r.config


@dataclass
class VideoGPTOptions:
    """The task's options (the loop's are :class:`polymodal.train.LoopConfig`)."""

    vqvae: str = option("", "run directory of a trained VQ-VAE (polymodal train vqvae)", metavar="RUN")
    train_size: int = option(4096, "synthetic training clips", positive=True)
    eval_size: int = option(128, "held-out clips", positive=True)
    text_len: int = option(8, "caption tokens (with [SEP] and pads)", positive=True)


class VideoGPTTask:
    """Caption -> video codes with a multimodal GPT over a trained VQ-VAE's codes."""

    Options = VideoGPTOptions
    loop_defaults = {"steps": 1500, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.0, "eval_every": 500,
                     "save_every": 500, "out": "runs/video-gpt"}

    def __init__(self, preset: str, options: VideoGPTOptions, loop: Any) -> None:
        from ...registry import family

        if not options.vqvae:
            raise ValueError("video-gpt: --vqvae RUN is required (a run directory of polymodal train vqvae)")
        self.preset, self.options, self.loop = preset, options, loop
        self.vqvae, self.vq_params, self.vq_state, vq_cfg = load_vqvae(options.vqvae)
        self.frames, self.image_size = int(vq_cfg.get("frames", 8)), int(vq_cfg.get("image_size", 32))
        latent = self.vqvae.latent_shape((self.frames, self.image_size, self.image_size))
        self.tokenizer = CaptionTokenizer.moving_shapes(options.text_len)
        builder = BUILDERS[family("video-gpt").builder_name(preset)]
        self.model = builder(text_vocab=self.tokenizer.vocab_size, text_len=options.text_len, video_latent_shape=latent,
                             num_video_tokens=self.vqvae.num_embeddings, video_embedding_dim=self.vqvae.embedding_dim)
        self.steps, self.name, self.title = loop.steps, f"video-gpt-{preset}", f"text-to-video GPT ({preset})"
        self.root = pr.key(loop.seed)
        self._data: dict[str, tuple[Tensor, Tensor]] = {}

    def init(self, key: Tensor) -> tuple[Params, None]:
        p = self.model.init(key=key)
        p["out_embed"]["weight"] = self.vq_state["codebook"]["embedding"].detach().clone()  # MUGEN: the VQ-VAE's codes
        return p, None

    @torch.no_grad()
    def tokens(self, split: str) -> tuple[Tensor, Tensor]:
        """``(text ids (N, text_len), video codes (N, L))`` of a split, computed once."""
        if split not in self._data:
            n = self.options.train_size if split == "train" else self.options.eval_size
            ds = MovingShapes(split, n, self.frames, self.image_size, seed=self.loop.seed)
            texts, codes = [], []
            for i in eval_progress(range(0, n, 64), f"tokenising {split} clips"):
                items = ds.__getitems__(list(range(i, min(i + 64, n))))
                x = torch.stack([it["video"] for it in items]) - 0.5
                codes.append(self.vqvae.encode(self.vq_params, x, self.vq_state).flatten(1))
                texts.append(self.tokenizer.encode([it["caption"] for it in items]))
            self._data[split] = (torch.cat(texts), torch.cat(codes))
        return self._data[split]

    def train_batches(self, start_step: int, rank: int, world: int):
        text, codes = self.tokens("train")
        b, n = self.loop.batch_size // world, text.shape[0]
        for step in range(start_step, self.steps):
            perm = pr.permutation(pr.fold_in(self.root, 11 + step * b // n), n)
            first = (step * self.loop.batch_size + rank * b) % n
            idx = perm[(torch.arange(b) + first) % n]
            yield {"text": text[idx], "codes": codes[idx]}

    def _nll(self, params: Params, batch: dict, key: Tensor | None) -> Tensor:
        logits = self.model(params, batch["text"], batch["codes"], key=key).logits[:, self.model.in_len:]
        return F.cross_entropy(logits.flatten(0, 1), (batch["codes"] + self.model.num_in_tokens).flatten())

    def loss(self, params: Params, state: None, batch: dict, key: Tensor) -> LossOutput:
        return LossOutput(self._nll(params, batch, key), {}, None)

    @torch.no_grad()
    def evaluate(self, params: Params, state: None, *, device: Any = "cpu") -> dict:
        text, codes = self.tokens("eval")
        total, n = 0.0, text.shape[0]
        for i in range(0, n, 64):
            b = {"text": text[i:i + 64].to(device), "codes": codes[i:i + 64].to(device)}
            total += float(self._nll(params, b, None)) * b["text"].shape[0]
        return {"eval/video_nll": total / n}
