"""One MDETR training step (forward, Hungarian matching of every decoder layer, MDETR's losses, backward,
AdamW): polymodal against TorchMultimodal from the same weights, eager, interleaved rounds; the matcher's
share and the optimizer's.

Reproduce (writes ``benchmarks/results/mdetr_step.md``)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mdetr_step.py            # small + full configuration
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mdetr_step.py --only small --small-rounds 10
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mdetr_step.py --only full --profile   # ops by self CPU time

Both sides run the same step on the same batch: the phrase-grounding model's forward on padded images
and captions, ``class_embed`` / ``bbox_embed`` on every decoder layer, Hungarian matching per layer
(``scipy.optimize.linear_sum_assignment``; TorchMultimodal's is ``examples/mdetr/matcher.py``, copied
below as it is not installed), soft-token + L1 + GIoU on every layer (the installed
``torchmultimodal.modules.losses.mdetr``) and contrastive alignment on every layer's projected queries
(``examples/mdetr/loss.py``, copied; every layer as the original MDETR's auxiliary losses and polymodal's
default), MDETR's weights, then ``backward``. Both sides keep their parameters as persistent leaf tensors
whose gradients are dropped at the start of the next step (TorchMultimodal: ``zero_grad(set_to_none=True)``;
polymodal: as ``polymodal.train.loop``). TorchMultimodal's examples do not ``torch.compile``, so
only eager is compared. Dropout is 0 on both sides so the losses agree (checked before the timed rounds).
The step ends with AdamW over MDETR's three parameter groups as each library trains: TorchMultimodal with
``torch.optim.AdamW``'s default implementation (``examples/mdetr/optimizer.py``), polymodal with the fused
kernel (``polymodal.train.loop.default_optimizer``); the table also gives the ratio of the steps without
their optimizer (the models like for like) and each optimizer's time. ``--optimizer none`` times forward
to backward only.

* ``small``: TorchMultimodal's classes at a CPU size (torchvision ResNet with one basic block per stage,
  a 1-layer width-32 RoBERTa-style text encoder, DETR 2 + 2 of width 32, 8 queries), batch 4, 64 x 64.
* ``full``: ``mdetr_for_phrase_grounding`` (ResNet-101, RoBERTa-base, DETR 6 + 6 of width 256,
  100 queries), batch 2, 256 x 256 images, 12-token captions.

Timing: CPU time of this process (``time.process_time``; the machine is shared) after one warm-up step,
``--small-rounds`` / ``--rounds`` rounds timing each side once in turn. The matcher's share is the CPU time inside
``hungarian_match`` over the polymodal step's.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops.boxes import box_convert, generalized_box_iou

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polymodal.core import random as pr  # noqa: E402
from polymodal.core.encoders.bert import bert_text_encoder  # noqa: E402
from polymodal.core.encoders.resnet import resnet  # noqa: E402
from polymodal.core.pytree import flatten, unflatten  # noqa: E402
from polymodal.models.mdetr import (  # noqa: E402
    MDETRForPhraseGrounding, box_losses, contrastive_alignment_loss, from_torchmultimodal, hungarian_match, mdetr,
    mdetr_for_phrase_grounding, pad_images, pad_text, soft_token_loss,
)
from polymodal.models.mdetr import matcher as ours_matcher  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "mdetr_step.md"
W = {"soft_token": 1.0, "l1": 5.0, "giou": 2.0, "contrastive": 1.0}


# --- TorchMultimodal: examples/mdetr/matcher.py (HungarianMatcher.forward) and the contrastive loss of
# examples/mdetr/loss.py, minimal copies (facebookresearch/multimodal; the examples are not installed)

@torch.no_grad()
def tmm_match(pred_logits, pred_boxes, target_boxes_per_sample, positive_map, cost_class=1, cost_bbox=5, cost_giou=2):
    bs, num_queries = pred_logits.shape[:2]
    target_boxes = torch.cat(target_boxes_per_sample)
    out_prob = pred_logits.flatten(0, 1).softmax(-1)
    out_bbox = pred_boxes.flatten(0, 1)
    c_class = -(out_prob.unsqueeze(1) * positive_map.unsqueeze(0)).sum(-1)
    c_bbox = torch.cdist(out_bbox, target_boxes, p=1)
    c_giou = -generalized_box_iou(box_convert(out_bbox, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy"))
    c = (cost_bbox * c_bbox + cost_class * c_class + cost_giou * c_giou).view(bs, num_queries, -1).cpu()
    sizes = [x.size(0) for x in target_boxes_per_sample]
    idx = [linear_sum_assignment(m[i]) for i, m in enumerate(c.split(sizes, -1))]
    return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in idx]


def tmm_contrastive(queries, tokens, token_maps, indices, num_boxes, temperature=0.07):
    logits = torch.matmul(queries, tokens.transpose(-1, -2)) / temperature
    positive_map = torch.zeros(logits.shape, dtype=torch.bool)
    for i, ((idx_src, idx_tgt), tm) in enumerate(zip(indices, token_maps)):
        for j, t in enumerate(idx_tgt.tolist()):  # the reference's char_to_token loop; here spans are tokens
            cols = tm[t].nonzero().flatten()
            positive_map[i, idx_src[j], int(cols[0]): int(cols[-1]) + 1].fill_(True)
    pos, neg = -logits.masked_fill(~positive_map, 0), logits
    b2t = ((pos.sum(2) / (positive_map.sum(2) + 1e-6) + neg.logsumexp(2)).masked_fill(~positive_map.any(2), 0).sum())
    t2b = ((pos.sum(1) / (positive_map.sum(1) + 1e-6) + neg.logsumexp(1)).masked_fill(~positive_map.any(1), 0).sum())
    return (b2t + t2b) / 2 / num_boxes


def build(config: str):
    from torchmultimodal.models.mdetr import model as tm
    from torchmultimodal.models.mdetr.image_encoder import (
        FrozenBatchNorm2d, MaskedIntermediateLayer, PositionEmbedding2D, mdetr_resnet101_backbone,
    )
    from torchmultimodal.models.mdetr.text_encoder import FeatureResizer, mdetr_roberta_text_encoder
    from torchmultimodal.models.mdetr.transformer import mdetr_transformer
    from torchmultimodal.modules.layers.mlp import MLP

    torch.manual_seed(0)
    if config == "small":
        body = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1],
                                                norm_layer=FrozenBatchNorm2d)
        for name, p in body.named_parameters():  # the stem and layer1 frozen, as mdetr_resnet101_backbone (and ours)
            if not name.startswith(("layer2", "layer3", "layer4")):
                p.requires_grad_(False)
        text = mdetr_roberta_text_encoder(embedding_dim=32, vocab_size=64, max_position_embeddings=40, ffn_dimension=64,
                                          num_attention_heads=2, num_encoder_layers=1, embedding_dropout_prob=0.0,
                                          encoder_dropout_prob=0.0)
        model = tm.MDETR(MaskedIntermediateLayer(body, "layer4"), text, mdetr_transformer(32, 2, 2, 2, 64, 0.0),
                         PositionEmbedding2D(16, scale=2 * math.pi), FeatureResizer(32, 32, dropout=0.0),
                         nn.Conv2d(512, 32, 1), nn.Embedding(8, 32), MLP(32, 4, [32] * 2, dropout=0.0),
                         nn.Linear(32, 256))
        ref = tm.MDETRForPhraseGrounding(model, nn.Linear(32, 16), nn.Linear(32, 16))
        txt = bert_text_encoder(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                                max_position_embeddings=40, type_vocab_size=1, pad_token_id=1, layer_norm_eps=1e-5,
                                position_offset=True, pooler=False)
        spec = MDETRForPhraseGrounding(mdetr(resnet(layers=(1, 1, 1, 1), block="basic", width=64, trainable_layers=3),
                                             txt, num_queries=8, d_model=32, num_heads=2, num_encoder_layers=2,
                                             num_decoder_layers=2, dim_feedforward=64, dropout=0.0), 16)
        b, side, vocab, t = 4, 64, 64, 10
    else:
        tm.mdetr_resnet101_backbone = lambda: mdetr_resnet101_backbone(weights=None)
        ref = tm.mdetr_for_phrase_grounding(transformer_dropout=0.0)
        # Randomly initialised, the frozen batch norms are identities, and the 33 residual blocks blow the
        # features up to ~1e5-1e6: attention logits ~1e10, whose backward is NaN in SDPA's CPU flash kernel
        # (the reference's math path stays finite). Each block's last norm scaled to 0.2 keeps them at a
        # trained backbone's size (std ~0.2); the same ops run either way, so the timing is unchanged.
        for name, m in ref.model.image_backbone.named_modules():
            if isinstance(m, FrozenBatchNorm2d) and name.endswith("bn3"):
                m.weight.fill_(0.2)
        for m in ref.modules():  # the text encoder's dropout too (its attention's is an attribute)
            if isinstance(m, nn.Dropout):
                m.p = 0.0
            if isinstance(m, nn.MultiheadAttention):
                m.dropout = 0.0
        spec = mdetr_for_phrase_grounding(dropout=0.0)
        from dataclasses import replace
        te = spec.model.text_encoder
        te = replace(te, embeddings=replace(te.embeddings, dropout=0.0),
                     encoder=replace(te.encoder, layer=replace(te.encoder.layer, dropout=0.0, attn_dropout=0.0)))
        spec = replace(spec, model=replace(spec.model, text_encoder=te))
        b, side, vocab, t = 2, 256, 50265, 12
    ref.train()
    params = from_torchmultimodal(ref.state_dict(), spec)
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(3, side, side, generator=g) for _ in range(b)]
    texts = [torch.cat([torch.tensor([0]), torch.randint(3, vocab, (t - 2 - i,), generator=g), torch.tensor([2])])
             for i in range(b)]
    n = [2, 1, 3, 2][:b]
    boxes = [torch.cat([torch.rand(m, 2, generator=g) * 0.6 + 0.2, torch.rand(m, 2, generator=g) * 0.3 + 0.05], -1)
             for m in n]
    token_maps = []
    for m in n:
        tm_ = torch.zeros(m, t - 2, dtype=torch.bool)  # the shortest caption's length bounds the spans
        for j in range(m):
            tm_[j, 1 + 2 * j: 3 + 2 * j] = True
        token_maps.append(tm_)
    tlen = max(len(x) for x in texts)
    token_maps = [torch.nn.functional.pad(tm_, (0, tlen - tm_.shape[1])) for tm_ in token_maps]
    c = 256
    pm = torch.nn.functional.pad(torch.cat(token_maps).float(), (0, c - tlen))
    pm = pm / pm.sum(-1, keepdim=True)
    return ref, spec, params, (images, texts, boxes, token_maps, pm, n)


def adamw(named, fused):
    """AdamW over MDETR's three parameter groups (``examples/mdetr/optimizer.py``: the rest, the backbone, the
    text encoder); ``fused=False`` is torch's default implementation, what the reference's examples get."""
    named = [(n, p) for n, p in named if p.requires_grad]
    groups = [[p for n, p in named if "backbone" not in n and "text_encoder" not in n],
              [p for n, p in named if "backbone" in n], [p for n, p in named if "text_encoder" in n]]
    # learning rates 1e-6 x MDETR's (1e-4, 1e-5, 5e-5): every round trains on the same batch, and at full size
    # the boxes would collapse (NaN matching costs) within the rounds; the update's cost does not depend on it
    return torch.optim.AdamW([{"params": g, "lr": lr} for g, lr in zip(groups, (1e-10, 1e-11, 5e-11))], lr=1e-10,
                             weight_decay=1e-4, fused=fused or None)


def _opt_step(opt, timer):
    if opt is not None:
        t0 = time.process_time()
        opt.step()
        timer[1] += time.process_time() - t0


def step_tmm(ref, data, opt=None, timer=None):
    images, texts, boxes, token_maps, pm, n = data
    ref.zero_grad(set_to_none=True)
    out = ref(images, texts)
    hs = out.model_output.transformer_output.decoder_hidden_states
    logits, bx = ref.model.class_embed(hs), ref.model.bbox_embed(hs).sigmoid()
    # every layer's projected queries, as the original MDETR (TorchMultimodal's model projects the last only)
    queries = nn.functional.normalize(ref.contrastive_alignment_image_projection(hs), p=2, dim=-1)
    tokens = out.contrastive_embeddings.token_embeddings
    from torchmultimodal.modules.losses.mdetr import box_losses as tb, soft_token_prediction_loss as ts
    num, loss = float(sum(n)), 0.0
    for layer in range(hs.shape[0]):
        idx = tmm_match(logits[layer], bx[layer], boxes, pm)
        bl = tb(bx[layer], boxes, idx, num)
        loss = loss + W["soft_token"] * ts(logits[layer], n, pm, idx, num) + W["l1"] * bl.l1_loss + W["giou"] * bl.giou_loss
        loss = loss + W["contrastive"] * tmm_contrastive(queries[layer], tokens, token_maps, idx, num)
    loss.backward()
    _opt_step(opt, timer)
    return float(loss.detach())


def step_ours(spec, leaves, data, timer, opt=None):
    """``leaves``: the params as persistent leaf tensors, their ``.grad`` reset at the start of the step, as
    ``polymodal.train.loop`` (and as the reference's module keeps ``.grad`` until ``zero_grad``)."""
    images, texts, boxes, token_maps, pm, n = data
    for v in leaves.values():
        v.grad = None
    x, mask = pad_images(images)
    ids, pad = pad_text(texts)
    out = spec(unflatten(leaves), x, ids, mask, pad)
    mo, num, loss = out.model_output, float(sum(n)), 0.0
    for layer in range(mo.aux_logits.shape[0]):
        t0 = time.process_time()
        idx = hungarian_match(mo.aux_logits[layer].detach(), mo.aux_boxes[layer].detach(), boxes, pm)
        timer[0] += time.process_time() - t0
        l1, giou = box_losses(mo.aux_boxes[layer], boxes, idx, num)
        loss = loss + W["soft_token"] * soft_token_loss(mo.aux_logits[layer], pm, n, idx, num) + W["l1"] * l1 + W["giou"] * giou
        loss = loss + W["contrastive"] * contrastive_alignment_loss(out.aux_query_embeddings[layer],
                                                                    out.token_embeddings, token_maps, idx, num)
    loss.backward()
    _opt_step(opt, timer)
    return float(loss.detach())


def run(config: str, rounds: int, optimizer: bool) -> dict:
    ref, spec, params, data = build(config)
    params = {k: v.detach().clone().requires_grad_() for k, v in flatten(params).items()}  # as the training loop's leaves
    timer, rtimer = [0.0, 0.0], [0.0, 0.0]
    a, b = step_tmm(ref, data), step_ours(spec, params, data, timer)  # warm-up, and the losses agree
    assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), (a, b)
    ropt = adamw(ref.named_parameters(), fused=False) if optimizer else None
    oopt = adamw(params.items(), fused=True) if optimizer else None
    step_tmm(ref, data, ropt, rtimer), step_ours(spec, params, data, timer, oopt)  # the optimizers' state allocated
    tt, to, share, topt, oopt_t = [], [], [], [], []
    for _ in range(rounds):
        rtimer[1] = 0.0
        t0 = time.process_time()
        step_tmm(ref, data, ropt, rtimer)
        tt.append(time.process_time() - t0)
        topt.append(rtimer[1])
        timer[0] = timer[1] = 0.0
        t0 = time.process_time()
        step_ours(spec, params, data, timer, oopt)
        to.append(time.process_time() - t0)
        oopt_t.append(timer[1])
        share.append(timer[0] / to[-1])
    return {"config": config, "tmm": tt, "ours": to, "share": share, "loss": (a, b), "tmm_opt": topt,
            "ours_opt": oopt_t}


def profile(config: str, rows: int = 25) -> None:
    """``torch.profiler`` of one warm step of each side: the ops by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    ref, spec, params, data = build(config)
    params = {k: v.detach().clone().requires_grad_() for k, v in flatten(params).items()}
    timer = [0.0]
    for name, fn in (("TorchMultimodal", lambda: step_tmm(ref, data)),
                     ("polymodal", lambda: step_ours(spec, params, data, timer))):
        fn()
        with prof(activities=[ProfilerActivity.CPU]) as p:
            fn()
        print(f"===== {config}: {name}")
        print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=["small", "full"])
    ap.add_argument("--rounds", type=int, default=4, help="timed rounds of the full configuration")
    ap.add_argument("--small-rounds", type=int, default=30, help="timed rounds of the small configuration")
    ap.add_argument("--optimizer", choices=["adamw", "none"], default="adamw",
                    help="end each step with each library's AdamW (default) or time forward + backward only")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results file (written only when both configs ran)")
    ap.add_argument("--profile", action="store_true", help="print each side's ops by self CPU time (one step each)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.profile:
        for c in ["small", "full"] if args.only is None else [args.only]:
            profile(c)
        return
    rows = [run(c, args.small_rounds if c == "small" else args.rounds, args.optimizer == "adamw")
            for c in (["small", "full"] if args.only is None else [args.only])]
    load = os.getloadavg()
    cmd = "" if args.optimizer == "adamw" else " --optimizer none"
    lines = ["# MDETR training step: polymodal vs TorchMultimodal (eager, same weights)", "",
             f"`OMP_NUM_THREADS={torch.get_num_threads()} .venv/bin/python benchmarks/mdetr_step.py{cmd}`; torch "
             f"{torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs shared with "
             f"other jobs (load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end); CPU time of this "
             "process per step (see the script's docstring).", ""]
    if args.optimizer == "adamw":
        lines += ["Each step ends with AdamW over MDETR's three parameter groups, as each library trains: TorchMultimodal "
                  "with `torch.optim.AdamW`'s default implementation (`examples/mdetr/optimizer.py`), polymodal with "
                  "the fused kernel (`fused=True`, as `polymodal.train.loop.default_optimizer`). *Model* is the step "
                  "without the optimizer (forward, matching, losses, backward); *AdamW* the optimizer's share.", "",
                  "| config | TorchMultimodal best / median (s) | polymodal best / median (s) | speed-up (best) | "
                  "median per-round ratio | model only: median ratio | AdamW median (s): tmm / ours | "
                  "matcher share (median) | loss (tmm / ours) |",
                  "|---|---|---|---|---|---|---|---|---|"]
    else:
        lines += ["Forward, matching, losses and backward; no optimizer step.", "",
                  "| config | TorchMultimodal best / median (s) | polymodal best / median (s) | speed-up (best) | "
                  "median per-round ratio | matcher share (median) | loss (tmm / ours) |",
                  "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratios = [t / o for t, o in zip(r["tmm"], r["ours"])]
        head = (f"| {r['config']} | {min(r['tmm']):.3f} / {statistics.median(r['tmm']):.3f} | "
                f"{min(r['ours']):.3f} / {statistics.median(r['ours']):.3f} | "
                f"{min(r['tmm']) / min(r['ours']):.2f}x | {statistics.median(ratios):.2f}x | ")
        tail = f"{100 * statistics.median(r['share']):.1f} % | {r['loss'][0]:.4f} / {r['loss'][1]:.4f} |"
        if args.optimizer == "adamw":
            model = [(t - a) / (o - b) for t, o, a, b in zip(r["tmm"], r["ours"], r["tmm_opt"], r["ours_opt"])]
            head += (f"{statistics.median(model):.2f}x | {statistics.median(r['tmm_opt']):.3f} / "
                     f"{statistics.median(r['ours_opt']):.3f} | ")
        lines.append(head + tail)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.only is None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
