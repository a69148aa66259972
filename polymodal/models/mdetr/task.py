"""``polymodal train mdetr``: phrase grounding (``--preset tiny``) or GQA-style VQA (``--preset tiny-vqa``) on
the built-in synthetic scenes (``polymodal.data.grounding``) or a grounding JSONL file, through the one loop.

The loss is MDETR's (Kamath et al. 2021, Section 2.2, its coefficients): every decoder layer's queries are
matched to the target boxes (Hungarian, :mod:`.matcher`) and pay soft-token cross-entropy (x1, no-object
weight 0.1), box L1 (x5), GIoU (x2) and the contrastive alignment of that layer's projected queries (x1,
temperature 0.07), as the original MDETR's auxiliary losses (``--tmm-last-layer-loss``: TorchMultimodal's
examples, which charge the last layer only); VQA adds the question-type heads' cross-entropies (x1). For VQA the text is the question and
the scene has no box targets (every query is "no object"). Evaluation: recall@1/5 at IoU >= 0.5 of
each caption phrase (boxes ranked by MDETR's soft-token probabilities; ``recall@1_alignment`` ranks
by the contrastive-alignment similarity instead), with two baselines: a uniformly random box, and a random one of the scene's
objects, VQA accuracy, and a PNG of an evaluation scene with its predicted boxes and phrases.

>>> from polymodal.train import LoopConfig, make_task
>>> task = make_task("mdetr", "tiny", {"train_size": 32, "eval_size": 8}, LoopConfig(steps=1, batch_size=4))
>>> b = next(iter(task.train_batches(0, 0, 1)))
>>> b["images"].shape, len(b["boxes"]), b["positive_map"].shape[-1]
(torch.Size([4, 3, 96, 96]), 4, 256)
"""

from __future__ import annotations

import random as _random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core import random as pr
from ...core.pytree import Params
from ...data.grounding import ANSWERS, QUESTION_TYPES, GroundingJSONL, GroundingScenes, WordTokenizer, token_map
from ...train.task import LossOutput, eval_progress, option
from .builders import BUILDERS
from .heads import MDETRForVQA
from .loss import (
    box_losses, contrastive_alignment_loss, gqa_masks, masked_cross_entropy, soft_token_loss, vqa_accuracy,
)
from .matcher import hungarian_match
from .model import pad_images, pad_text
from .postprocess import alignment_scores, rank_phrase_boxes, recall_at_k

__all__ = ["MDETRTask", "MDETROptions", "Collate", "mdetr_loss", "WEIGHTS"]

PRESETS = {"tiny": "mdetr_tiny", "tiny-vqa": "mdetr_tiny_vqa"}
WEIGHTS = {"soft_token": 1.0, "l1": 5.0, "giou": 2.0, "contrastive": 1.0, "vqa": 1.0}  # MDETR's coefficients
_HEAD_OF = {"obj": "answer_obj", "attr": "answer_attr", "rel": "answer_rel", "global": "answer_global",
            "cat": "answer_cat"}


class Collate:
    """Items -> ``{"images" (B, 3, H, W), "image_mask" (B, H, W), "input_ids" (B, T), "text_padding_mask" (B, T),
    "boxes": [(N_i, 4) normalised cxcywh], "positive_map" (sum N_i, C), "token_maps": [(N_i, T) bool],
    "phrase_maps" (B, P, C), "image_sizes" (B, 2), "gt": [(N_i, 4) pixel xyxy], "box_phrase": [(N_i,)]}``
    (+ ``"vqa"``: ``{head: labels}`` and ``"answer_type"`` when ``vqa``)."""

    def __init__(self, tokenizer: Any, num_slots: int, vqa: bool = False, max_tokens: int | None = None) -> None:
        self.tok, self.c, self.vqa, self.max_tokens = tokenizer, num_slots, vqa, max_tokens

    def _encode(self, texts: list[str]) -> tuple[list[Tensor], list]:
        if isinstance(self.tok, WordTokenizer):
            enc = [self.tok.encode(t) for t in texts]
            return [torch.tensor(i) for i, _ in enc], [o for _, o in enc]
        out = self.tok.tokenizer.encode_batch(texts)  # a RoBERTa tokenizer: offsets from the Rust tokenizer
        ids, offsets = [e.ids for e in out], [e.offsets for e in out]
        m = self.max_tokens
        if m is not None:  # longer captions: cut to the text encoder's positions, keeping the closing </s>
            ids = [i if len(i) <= m else i[: m - 1] + i[-1:] for i in ids]
            offsets = [o if len(o) <= m else o[: m - 1] + o[-1:] for o in offsets]
        return [torch.tensor(i) for i in ids], offsets

    def __call__(self, items: list[dict]) -> dict:
        images, mask = pad_images([it["image"] for it in items])
        texts = [it["question"] if self.vqa else it["caption"] for it in items]
        ids, offsets = self._encode(texts)
        input_ids, pad = pad_text(ids, 1)
        t = input_ids.shape[1]
        boxes, token_maps, gts, owners, pmaps = [], [], [], [], []
        for it, off in zip(items, offsets):
            h, w = it["image"].shape[1:]
            phrase_tm = token_map(list(off) + [(0, 0)] * (t - len(off)), it["phrases"])  # (P, T)
            pmaps.append(F.pad(phrase_tm.float(), (0, max(self.c - t, 0)))[:, : self.c])
            gt = it["boxes"] if not self.vqa else it["boxes"][:0]
            own = it["box_phrase"][: len(gt)]
            xyxy = gt / torch.tensor([w, h, w, h], dtype=torch.float32)
            boxes.append(torch.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
                                      xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]], -1))
            token_maps.append(phrase_tm[own] if len(own) else torch.zeros(0, t, dtype=torch.bool))
            gts.append(it["boxes"])
            owners.append(it["box_phrase"])
        tm_all = torch.cat(token_maps) if token_maps else torch.zeros(0, t, dtype=torch.bool)
        pm = F.pad(tm_all.float(), (0, max(self.c - t, 0)))[:, : self.c]
        pm = pm / pm.sum(-1, keepdim=True).clamp(min=1e-6)
        n_phr = max(len(p) for p in pmaps)
        phrase_maps = torch.stack([F.pad(p, (0, 0, 0, n_phr - len(p))) for p in pmaps])
        out = {"images": images, "image_mask": mask, "input_ids": input_ids, "text_padding_mask": pad,
               "boxes": boxes, "positive_map": pm, "token_maps": token_maps, "phrase_maps": phrase_maps,
               "image_sizes": torch.tensor([list(it["image"].shape[1:]) for it in items]), "gt": gts,
               "box_phrase": owners}
        if self.vqa:
            qt = torch.tensor([it["question_type"] for it in items])
            out["answer_type"] = qt
            labels = {"answer_type": qt}
            for i, name in enumerate(QUESTION_TYPES):
                labels[_HEAD_OF[name]] = torch.tensor([it["answer"] if it["question_type"] == i else 0 for it in items])
            out["vqa"] = labels
        return out


def mdetr_loss(model: Any, params: Params, batch: dict, key: Tensor | None, weights: dict = WEIGHTS,
               no_object_weight: float = 0.1, temperature: float = 0.07, aux_loss: bool = True) -> tuple[Tensor, dict]:
    """MDETR's weighted loss; returns ``(loss, parts)`` (each part summed over the layers it covers).

    ``aux_loss=True`` (default, the original MDETR's ``SetCriterion`` with ``--aux_loss``): every decoder
    layer is matched on its own and charged every loss (soft-token, L1, GIoU and contrastive alignment on
    that layer's projected queries, ``aux_query_embeddings``). ``aux_loss=False`` reproduces
    TorchMultimodal's ``examples/mdetr`` training loops (``phrase_grounding.py``, ``vqa_finetune.py``):
    only the last layer is matched and charged."""
    out = model(params, batch["images"], batch["input_ids"], batch["image_mask"], batch["text_padding_mask"], key=key)
    mo = out.model_output
    n = [len(b) for b in batch["boxes"]]
    num = float(max(sum(n), 1))
    parts = {"soft_token": 0.0, "l1": 0.0, "giou": 0.0, "contrastive": 0.0}
    n_layers = mo.aux_logits.shape[0]
    for layer in range(n_layers) if aux_loss else [n_layers - 1]:
        lg, bx = mo.aux_logits[layer], mo.aux_boxes[layer]
        idx = hungarian_match(lg.detach(), bx.detach(), batch["boxes"], batch["positive_map"])
        parts["soft_token"] = parts["soft_token"] + soft_token_loss(lg, batch["positive_map"], n, idx, num,
                                                                    no_object_weight)
        if sum(n):
            l1, giou = box_losses(bx, batch["boxes"], idx, num)
            parts["l1"], parts["giou"] = parts["l1"] + l1, parts["giou"] + giou
        parts["contrastive"] = parts["contrastive"] + contrastive_alignment_loss(
            out.aux_query_embeddings[layer], out.token_embeddings, batch["token_maps"], idx, num, temperature)
    if isinstance(model, MDETRForVQA):
        ce = masked_cross_entropy(out.vqa_preds, batch["vqa"], gqa_masks(batch["answer_type"]))
        parts["vqa"] = sum(ce.values())
    loss = sum(weights[k] * v for k, v in parts.items())
    return loss, {k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in parts.items()}


def _roberta_tokenizer(path: str) -> Any:
    """``--tokenizer``: a folder with RoBERTa's ``vocab.json`` + ``merges.txt`` (or a ``tokenizer.json``), or a
    ``tokenizer.json`` file; its ``<pad>`` must be id 1, the padding id of MDETR's RoBERTa encoder."""
    from ...data.bert_tokenizer import RobertaTokenizer, _FromJSON

    p = Path(path)
    if p.is_file() and p.name.endswith(".json"):
        tok = _FromJSON(p, pad_token="<pad>")
    elif (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
        tok = RobertaTokenizer.from_directory(p)
    elif (p / "tokenizer.json").is_file():
        tok = _FromJSON(p / "tokenizer.json", pad_token="<pad>")
    else:
        raise ValueError(f"mdetr: --tokenizer {path!r}: expected a folder with vocab.json + merges.txt (RoBERTa's "
                         "byte-level BPE) or a tokenizer.json, found neither")
    pad = tok.tokenizer.token_to_id("<pad>")
    if pad != 1:
        raise ValueError(f"mdetr: --tokenizer {path!r}: expected '<pad>' at id 1 (RoBERTa's layout: <s> 0, <pad> 1, "
                         f"</s> 2), got {pad}")
    return tok


@dataclass
class MDETROptions:
    """The task's options (the loop's are :class:`polymodal.train.LoopConfig`)."""

    data: str = option("synthetic", "'synthetic' or a grounding JSONL file (docs/models/mdetr.md)")
    tokenizer: str | None = option(None, "a RoBERTa tokenizer for --data JSONL: a folder with vocab.json + merges.txt "
                                         "(or tokenizer.json), or a tokenizer.json")
    train_size: int = option(4000, "synthetic training scenes", positive=True)
    eval_size: int = option(256, "synthetic evaluation scenes", positive=True)
    tmm_last_layer_loss: bool = option(False, "charge only the last decoder layer (TorchMultimodal's examples) "
                                       "instead of every layer (the original MDETR's auxiliary losses)")
    image_size: int = option(96, "side of the synthetic scenes (96: a 3 x 3 feature map, one cell per grid cell)",
                             positive=True)


class MDETRTask:
    """Phrase grounding / VQA with a tiny MDETR (see the module docstring)."""

    Options = MDETROptions
    evaluates_data_files = True  # --data JSONL holds out its first tenth: `polymodal eval --run` evaluates it
    loop_defaults = {"steps": 2500, "batch_size": 32, "lr": 1e-3, "eval_every": 0, "save_every": 0, "out": "runs/mdetr"}

    def __init__(self, preset: str, options: MDETROptions, loop: Any) -> None:
        from ...registry import family

        self.preset, self.options, self.loop = preset, options, loop
        builder = family("mdetr").builder_name(preset)
        self.vqa = builder == "mdetr_tiny_vqa" or builder == "mdetr_for_vqa"
        if options.data == "synthetic":
            self.tokenizer = WordTokenizer()
            self.train_set = GroundingScenes("train", options.train_size, options.image_size, loop.seed)
            self.eval_set = GroundingScenes("eval", options.eval_size, options.image_size, loop.seed)
        else:
            if self.vqa:
                raise ValueError("mdetr: --data JSONL holds grounding data; the VQA preset trains on synthetic data only")
            if options.tokenizer is None:
                raise ValueError(f"mdetr: --data {options.data!r} needs --tokenizer DIR (a RoBERTa vocab.json + merges.txt)")
            self.tokenizer = _roberta_tokenizer(options.tokenizer)
            full = GroundingJSONL(options.data)
            cut = max(1, len(full) // 10)
            self.train_set = torch.utils.data.Subset(full, range(cut, len(full)))
            self.eval_set = torch.utils.data.Subset(full, range(cut))
        self.model = BUILDERS[builder](vocab_size=self.tokenizer.vocab_size)
        emb = self.model.model.text_encoder.embeddings  # RoBERTa's positions start after the padding id
        max_tokens = emb.max_position_embeddings - (emb.pad_token_id + 1 if emb.position_offset else 0)
        self.collate = Collate(self.tokenizer, self.model.model.num_classes + 1, self.vqa, max_tokens)
        self.steps = loop.steps
        self.name = f"mdetr-{preset}"
        self.title = f"MDETR {preset} ({'VQA' if self.vqa else 'phrase grounding'})"

    def init(self, key: Tensor) -> tuple[Params, None]:
        return self.model.init(key=key), None

    def loss(self, params: Params, state: None, batch: dict, key: Tensor) -> LossOutput:
        loss, parts = mdetr_loss(self.model, params, batch, key, aux_loss=not self.options.tmm_last_layer_loss)
        return LossOutput(loss, parts, None)

    def train_batches(self, start_step: int, rank: int, world: int):
        """This rank's batches from ``start_step`` on, a pure function of ``(seed, step)``: epoch ``e`` visits
        ``permutation(fold_in(key, e))``, each rank takes its slice of the global batch."""
        n, bs = len(self.train_set), self.loop.batch_size
        if bs > n or bs % world:
            raise ValueError(f"mdetr: --batch-size {bs} must be at most the {n} training scenes and divisible by "
                             f"the {world} ranks")
        key, per_epoch, local = pr.fold_in(pr.key(self.loop.seed), 1), n // bs, bs // world
        for step in range(start_step, self.steps):
            epoch, i = divmod(step, per_epoch)
            glob = pr.permutation(pr.fold_in(key, epoch), n)[i * bs:(i + 1) * bs]
            yield self.collate([self.train_set[j] for j in glob[rank * local:(rank + 1) * local].tolist()])

    @torch.no_grad()
    def evaluate(self, params: Params, state: None, *, device: Any = "cpu") -> dict:
        ranked, aligned, truth, rand_box, rand_obj, vqa_right, n_q = [], [], [], [], [], 0.0, 0
        g = _random.Random(0)
        for i in eval_progress(range(0, len(self.eval_set), 64), "eval"):
            items = [self.eval_set[j] for j in range(i, min(i + 64, len(self.eval_set)))]
            b = self.collate(items)
            dev = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in b.items()}
            if self.vqa:
                out = self.model(params, dev["images"], dev["input_ids"], dev["image_mask"], dev["text_padding_mask"])
                vqa_right += float(vqa_accuracy({k: v.cpu() for k, v in out.vqa_preds.items()}, b["vqa"])) * len(items)
                n_q += len(items)
                cap = Collate(self.tokenizer, self.collate.c, False, self.collate.max_tokens)(items)
                dev = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in cap.items()}
                b = cap
            out = self.model(params, dev["images"], dev["input_ids"], dev["image_mask"], dev["text_padding_mask"])
            mo = out.model_output
            boxes, _ = rank_phrase_boxes(mo.pred_logits, mo.pred_boxes, dev["phrase_maps"], dev["image_sizes"], k=5)
            t = dev["input_ids"].shape[1]
            align = alignment_scores(out.query_embeddings, out.token_embeddings, dev["phrase_maps"][..., :t])
            aboxes, _ = rank_phrase_boxes(mo.pred_logits, mo.pred_boxes, dev["phrase_maps"], dev["image_sizes"], k=1,
                                          scores=align)
            for s, it in enumerate(items):
                h, w = it["image"].shape[1:]
                for p in range(len(it["phrases"])):
                    gt = it["boxes"][it["box_phrase"] == p]
                    ranked.append(boxes[s, p].cpu())
                    aligned.append(aboxes[s, p].cpu())
                    truth.append(gt)
                    x1, y1 = g.uniform(0, w - 1), g.uniform(0, h - 1)
                    rand_box.append(torch.tensor([[x1, y1, g.uniform(x1 + 1, w), g.uniform(y1 + 1, h)]]))
                    objects = it.get("object_boxes", it["boxes"])  # JSONL: the annotated boxes
                    rand_obj.append(objects[g.randrange(len(objects))][None] if len(objects) else gt[:0])
        r = recall_at_k(ranked, truth)
        metrics = {"eval/recall@1": r[1], "eval/recall@5": r[5],
                   "eval/recall@1_alignment": recall_at_k(aligned, truth, (1,))[1],
                   "eval/random_box_recall@1": recall_at_k(rand_box, truth, (1,))[1],
                   "eval/random_object_recall@1": recall_at_k(rand_obj, truth, (1,))[1]}
        if self.vqa:
            metrics["eval/vqa_accuracy"] = vqa_right / max(n_q, 1)
        self._draw(params, device)
        return metrics

    def _draw(self, params: Params, device: Any) -> None:
        """``<out>/mdetr_grounding.png``: the first evaluation scenes with each phrase's top-1 box."""
        from torchvision.utils import draw_bounding_boxes, make_grid, save_image

        items = [self.eval_set[j] for j in range(min(4, len(self.eval_set)))]
        b = Collate(self.tokenizer, self.collate.c, False, self.collate.max_tokens)(items)
        out = self.model(params, b["images"].to(device), b["input_ids"].to(device), b["image_mask"].to(device),
                         b["text_padding_mask"].to(device))
        boxes, _ = rank_phrase_boxes(out.model_output.pred_logits.cpu(), out.model_output.pred_boxes.cpu(),
                                     b["phrase_maps"], b["image_sizes"], k=1)
        scale, tiles = 4, []
        for s, it in enumerate(items):
            img = F.interpolate(it["image"][None], scale_factor=scale, mode="nearest")[0]
            img = (img * 255).to(torch.uint8)
            phrases = [it["caption"][a:e] for a, e in it["phrases"]]
            h, w = it["image"].shape[1:]
            bx = boxes[s, : len(phrases), 0].clamp(min=0) * scale
            bx = torch.minimum(bx, torch.tensor([w, h, w, h]) * scale)
            bx[:, 2:] = torch.maximum(bx[:, 2:], bx[:, :2] + 1)
            tiles.append(draw_bounding_boxes(img, bx, labels=phrases, colors=["white", "yellow"][: len(phrases)],
                                             width=2))
        out_dir = Path(self.loop.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_image(make_grid([t.float() / 255 for t in tiles], nrow=len(tiles), padding=4), out_dir / "mdetr_grounding.png")
