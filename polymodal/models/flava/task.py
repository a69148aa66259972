"""``polymodal train flava``: FLAVA's multi-source pretraining on the built-in synthetic shapes through the
one training loop, evaluated by zero-shot classification and image <-> text retrieval with the contrastive
projections.

Every step sees three sources, as FLAVA's pretraining mixes datasets: paired images and captions (ITM with
in-batch negatives of another class, MMM-text, MMM-image, the global contrastive loss), unpaired images
(MIM against the dVAE's codes at BEiT-masked patches) and unpaired captions (MLM). Batches are a pure
function of ``(seed, step)`` (resume replays them; each rank takes its slice); all masks come from keys.
The metrics hold the total and every loss term. Captions are tokenised by a WordPiece
:class:`~polymodal.data.BertTokenizer` over the synthetic captions' words.

>>> from polymodal.train import LoopConfig, make_task
>>> task = make_task("flava", "tiny", {"train_size": 64}, LoopConfig(steps=2, batch_size=8))
>>> batch = next(iter(task.train_batches(0, 0, 1)))
>>> sorted(batch), sorted(batch["paired"])[:4]
(['image', 'paired', 'text'], ['image', 'image_for_codebook', 'image_patches_mask', 'index'])
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...core import random as pr
from ...core.pytree import Params
from ...data.bert_tokenizer import BertTokenizer
from ...data.synthetic import COLORS, POSITIONS, SHAPES, SIZES, TEMPLATES, SyntheticCaptions
from ...train.task import LossOutput, eval_progress, option
from .retrieval import retrieval_pairs, retrieval_recall
from .transforms import IMAGE_MEAN, IMAGE_STD, block_masks, itm_negatives, map_pixels, mlm_mask

__all__ = ["FLAVATask", "FLAVAOptions", "caption_vocab"]

_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_WHERE_WORDS = "on the left right at top bottom in center noisy background"


def caption_vocab() -> dict[str, int]:
    """``{token: id}``: BERT's special tokens, then every word of the synthetic captions and prompts."""
    words = set(" ".join(TEMPLATES).replace("{", " ").replace("}", " ").split())
    words |= set(SHAPES) | set(COLORS) | set(SIZES) | set(POSITIONS) | set(_WHERE_WORDS.split()) | {"an", "photo"}
    words = {w for w in words if re.fullmatch(r"[a-z]+", w) and w not in ("size", "color", "shape", "where")}
    return {w: i for i, w in enumerate(list(_SPECIALS) + sorted(words))}


@dataclass
class FLAVAOptions:
    """``polymodal train flava``'s data options (the loop's are :class:`polymodal.train.LoopConfig`)."""

    train_size: int = option(20_000, "synthetic samples the three sources draw from", positive=True)
    eval_size: int = option(500, "synthetic eval images per split (seen and held-out pairs)", positive=True)
    unpaired: float = option(0.25, "unpaired images and unpaired captions per step, each as a fraction of the batch")
    mask_patches: int = option(24, "patches masked per image (BEiT block masking; tiny: 64 patches)", positive=True)
    mlm_prob: float = option(0.15, "fraction of caption tokens masked (80/10/10)")
    itm_negatives: float = option(0.25, "fraction of pairs whose caption is swapped for another class's")
    max_length: int = option(16, "caption tokens (truncation)", positive=True)
    image_size: int = option(64, "image side in pixels (the dVAE sees the same image at 8 px per patch)",
                             positive=True)
    patch_size: int = option(8, "ViT patch side in pixels", positive=True)
    contrastive_weight: float = option(2.0, "weight of the global contrastive loss (the other five weigh 1)")
    codebook_blocks: int = option(1, "the dVAE tokenizer's residual blocks per group (DALL-E: 2)", positive=True)
    cache_codes: bool = option(True, "reuse each training image's dVAE codes once computed (the tokenizer is "
                               "frozen, so the MIM targets are the same; about a quarter of the tiny step is the dVAE)")
    conv_stem: str = option("8,16", "comma-separated widths of a conv stem (3x3 stride-2 convs + ReLU) under the "
                            "patch projection; '' for FLAVA's plain patch embedding", metavar="W1,W2")


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(w) for w in text.replace(" ", "").split(",") if w)
    except ValueError:
        raise ValueError(f"--conv-stem: expected comma-separated integer widths such as '16,32', got {text!r}") from None


class FLAVATask:
    """FLAVA tiny pretraining on synthetic shapes (see the module docstring)."""

    Options = FLAVAOptions
    loop_defaults = {"steps": 1600, "batch_size": 64, "lr": 2e-3, "warmup": 50, "weight_decay": 0.05,
                     "eval_every": 800, "save_every": 0, "out": "runs/flava"}
    trainable_presets = ("tiny", "flava_tiny_for_pretraining")

    def __init__(self, preset: str, options: FLAVAOptions, loop: Any) -> None:
        from .builders import flava_tiny_for_pretraining

        self.preset, self.options, self.loop = preset, options, loop
        self.vocab = caption_vocab()
        self.tokenizer = BertTokenizer(self.vocab, max_length=options.max_length)
        size, patch = options.image_size, options.patch_size
        if size % patch:
            raise ValueError(f"FLAVATask: image_size {size} must be a multiple of patch_size {patch}")
        self.model = flava_tiny_for_pretraining(vocab_size=len(self.vocab),
                                                max_position_embeddings=max(options.max_length, 8),
                                                image_size=size, patch_size=patch,
                                                codebook_image_size=8 * (size // patch),
                                                codebook_n_blk_per_group=options.codebook_blocks,
                                                contrastive_loss_weight=options.contrastive_weight,
                                                image_conv_stem=_widths(options.conv_stem))
        self.image_size = self.model.model.image_encoder.vit.embeddings.image_size[0]
        self.grid = self.model.model.image_encoder.vit.embeddings.grid
        mk = lambda split, n: SyntheticCaptions(split, size=n, image_size=self.image_size, seed=loop.seed)  # noqa: E731
        self.train_set = mk("train", options.train_size)
        self.eval_sets = {"seen": mk("eval", options.eval_size), "heldout": mk("heldout", options.eval_size)}
        self.prompts = self.train_set.prompts()
        self.retrieval = retrieval_pairs(self.eval_sets["seen"].pairs, self.image_size, seed=loop.seed)
        self.steps = loop.steps
        self.root = pr.fold_in(pr.key(loop.seed), 7)
        self.name, self.title = f"flava-{preset}", f"FLAVA {preset} on synthetic shapes"
        self.special_ids = [self.vocab[t] for t in _SPECIALS]
        n = self.model.model.image_encoder.num_patches  # the dVAE's codes by sample index (-1: not yet computed)
        self._codes = torch.full((len(self.train_set), n), -1, dtype=torch.int32) if options.cache_codes else None

    def init(self, key: Tensor) -> tuple[Params, None]:
        return self.model.init(key=key), None

    # --- data --------------------------------------------------------------------------------------------

    def _images(self, items: list[dict], key: Tensor, index: list[int]) -> dict[str, Tensor]:
        raw = torch.stack([it["image"] for it in items])  # (B, 3, S, S) in [0, 1]
        mean, std = torch.tensor(IMAGE_MEAN)[:, None, None], torch.tensor(IMAGE_STD)[:, None, None]
        keys = torch.func.vmap(pr.fold_in, in_dims=(None, 0))(key, torch.arange(len(items)))  # fold_in(key, i)
        masks = block_masks(keys, self.grid, self.options.mask_patches, min_num_patches=4)
        cb = self.model.image_codebook.image_size
        if cb != raw.shape[-1]:  # the dVAE's input size (8 px per code): the same image, resampled
            raw_cb = torch.nn.functional.interpolate(raw, size=(cb, cb), mode="bilinear", align_corners=False)
        else:
            raw_cb = raw
        return {"image": (raw - mean) / std, "image_for_codebook": map_pixels(raw_cb.clamp(0, 1)),
                "image_patches_mask": masks.flatten(1), "index": torch.tensor(index)}

    def _texts(self, captions: list[str], key: Tensor) -> dict[str, Tensor]:
        ids = self.tokenizer(captions)["input_ids"]
        masked, labels = mlm_mask(key, ids, mask_id=self.vocab["[MASK]"], vocab_size=len(self.vocab),
                                  special_ids=self.special_ids, prob=self.options.mlm_prob)
        return {"text": ids, "text_masked": masked, "mlm_labels": labels}

    def batch(self, step: int, rank: int = 0, world: int = 1) -> dict:
        """This rank's slice of step ``step``'s batch: ``{"paired", "image", "text"}`` dicts of tensors."""
        b = self.loop.batch_size
        if b % world:
            raise ValueError(f"global batch size {b} must be divisible by the {world} ranks")
        u = max(1, int(round(b * self.options.unpaired)))
        k = pr.fold_in(self.root, step)
        idx = pr.randint(pr.fold_in(k, 0), (b + 2 * u,), 0, len(self.train_set)).tolist()
        lo, hi = rank * b // world, (rank + 1) * b // world
        ulo, uhi = rank * u // world, (rank + 1) * u // world
        paired = self.train_set.__getitems__(idx[lo:hi])
        keys = pr.split(pr.fold_in(k, rank + 1), 5)
        text_index, itm = itm_negatives(keys[0], len(paired), self.options.itm_negatives,
                                        groups=[it["label"] for it in paired])
        captions = [paired[j]["caption"] for j in text_index.tolist()]
        out = {"paired": self._images(paired, keys[1], idx[lo:hi]) | self._texts(captions, keys[2])
               | {"itm_labels": itm}}
        images = self.train_set.__getitems__(idx[b + ulo:b + uhi]) if uhi > ulo else []
        texts = self.train_set.__getitems__(idx[b + u + ulo:b + u + uhi]) if uhi > ulo else []
        if images:
            out["image"] = self._images(images, keys[3], idx[b + ulo:b + uhi])
        if texts:
            out["text"] = self._texts([it["caption"] for it in texts], keys[4])
        return out

    def train_batches(self, start_step: int, rank: int, world: int) -> Iterator[dict]:
        for step in range(start_step, self.steps):
            yield self.batch(step, rank, world)

    # --- the loss --------------------------------------------------------------------------------------

    @torch.compiler.disable
    def image_codes(self, params: Params, images: dict[str, Tensor]) -> Tensor | None:
        """The dVAE's codes of a batch part's images, from the cache where this training sample's were computed
        before (``--cache-codes``; the frozen tokenizer gives every sample the same codes each time), else
        computed now (and kept). ``None`` without the cache: the model tokenises ``image_for_codebook``."""
        if not self.options.cache_codes:
            return None
        index = images["index"].cpu()
        need = self._codes[index, 0] < 0
        if bool(need.any()):
            with torch.no_grad():
                codes = self.model.image_codes(params, images["image_for_codebook"][need.to(images["image"].device)])
            self._codes[index[need]] = codes.to("cpu", torch.int32)
        return self._codes[index].to(images["image"].device, torch.long)

    def loss(self, params: Params, state: None, batch: dict, key: Tensor) -> LossOutput:
        import torch.distributed as dist

        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        k = pr.split(key, 3)
        p = batch["paired"]
        codes = self.image_codes(params, p)
        parts = [self.model(params, p["image"], p["text"], p["image_for_codebook"], p["image_patches_mask"],
                            p["text_masked"], itm_labels=p["itm_labels"],
                            mlm_labels=p["mlm_labels"], image_codes=codes, key=k[0],
                            backprop_type="global" if world > 1 else "none").losses]
        if "image" in batch:
            i = batch["image"]
            codes = self.image_codes(params, i)
            parts.append(self.model(params, i["image"], None, i["image_for_codebook"], i["image_patches_mask"],
                                    required_embedding="image", image_codes=codes, key=k[1]).losses)
        if "text" in batch:
            t = batch["text"]
            parts.append(self.model(params, None, None, text_masked=t["text_masked"], mlm_labels=t["mlm_labels"],
                                    required_embedding="text", key=k[2]).losses)
        total = sum(x.total for x in parts)
        metrics = {n: v.detach() for x in parts for n, v in x.terms().items()}
        logits = parts[0].itm_logits
        metrics["itm_accuracy"] = (logits.argmax(-1) == p["itm_labels"]).float().mean().detach()
        return LossOutput(total, metrics, None)

    # --- evaluation --------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, params: Params, state: None, *, device: Any = "cpu") -> dict:
        """Zero-shot accuracy (image vs every class prompt, contrastive projections) on seen and held-out
        (shape, colour) pairs; image <-> text recall@1/5/10 on the 250 seen (shape, colour, size, position)
        combinations, one image and its unique caption each (``retrieval.py``)."""
        m = self.model.model
        mean, std = torch.tensor(IMAGE_MEAN)[:, None, None], torch.tensor(IMAGE_STD)[:, None, None]
        encode_image = lambda x: m.image_embeddings(params["model"], ((x - mean) / std).to(device))  # noqa: E731
        tokens = lambda c: self.tokenizer(c)["input_ids"].to(device)  # noqa: E731
        encode_text = lambda c: m.text_embeddings(params["model"], tokens(c))  # noqa: E731
        classes = encode_text(self.prompts)
        metrics = {}
        for name, ds in self.eval_sets.items():
            correct = 0
            for lo in eval_progress(range(0, len(ds), 256), f"eval {name}"):
                items = ds.__getitems__(list(range(lo, min(lo + 256, len(ds)))))
                pred = (encode_image(torch.stack([it["image"] for it in items])) @ classes.T).argmax(-1).cpu()
                correct += int((pred == torch.tensor([it["label"] for it in items])).sum())
            metrics[f"eval/zero_shot_{name}"] = correct / len(ds)
        metrics |= {f"eval/{k}": v for k, v in retrieval_recall(encode_image, encode_text, self.retrieval).items()}
        return metrics
