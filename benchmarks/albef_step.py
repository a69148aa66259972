"""One ALBEF training step (ITC + ITM + MLM with momentum distillation, momentum update, enqueue, backward,
SGD) in polymodal against TorchMultimodal from the same weights, eager and compiled, in one run.

Reproduce (writes ``benchmarks/results/albef_step.md``)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/albef_step.py                 # tiny (B 32) + full (B 2)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/albef_step.py --configs tiny --rounds 3   # a quick look

TorchMultimodal's ALBEF has no MLM objective, so its step is the examples' ``ALBEFModelForRetrieval``
training forward (``ALBEFModelWithSimilarity``: momentum update, momentum features, queues, ITC, hard
negatives by ``torch.multinomial``, ITM) plus MLM composed from its own modules the way ALBEF does it
(the masked text through ``text_encoder`` and ``multimodal_encoder`` with the step's image embeddings,
a BERT MLM head tied to the word embeddings; the momentum encoders and a momentum head give the soft
targets). Both sides run the same computation, from the same weights (converted with
``from_torchmultimodal``); the ``check`` column is the first step's loss (equal up to the negatives,
which each side samples with its own generator).

Timing: CPU time of this process (the machine is shared: wall time measures the neighbours), one
torch thread, ``--warmup`` untimed steps (compilation happens there), then ``--rounds`` rounds, each
timing every variant once in turn. Reported: best and median step time, ratio = TorchMultimodal's
best / this row's best (> 1: polymodal faster). "full" is ALBEF's configuration (ViT-B/16, 6 + 6 BERT
layers, embed 256, queue 65,536) at 256 px (pretraining resolution), batch 2.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

RESULTS = Path(__file__).parent / "results" / "albef_step.md"
CONFIGS = {
    "tiny": dict(batch=32, queue=256, image=32, patch=8, width=64, vlayers=2, vheads=4, vmlp=128, vocab=64,
                 tlayers=2, mlayers=2, heads=4, ff=128, embed=32, seq=16),
    "full": dict(batch=2, queue=65536, image=256, patch=16, width=768, vlayers=12, vheads=12, vmlp=3072, vocab=30522,
                 tlayers=6, mlayers=6, heads=12, ff=3072, embed=256, seq=30),
}


class MLMHead(nn.Module):  # BERT's cls.predictions (tied decoder), as ALBEF's BertForMaskedLM
    def __init__(self, h):
        super().__init__()
        self.dense, self.norm = nn.Linear(h, h), nn.LayerNorm(h, eps=1e-12)

    def forward(self, x, word, bias):
        return F.linear(self.norm(F.gelu(self.dense(x))), word, bias)


def reference(c):
    """TorchMultimodal's retrieval model (examples/albef/model.py's training forward) + MLM from its modules."""
    from torchmultimodal.models.albef.image_encoder import ALBEFVisionEncoder
    from torchmultimodal.models.albef.model import ALBEFModel, ALBEFModelWithSimilarity
    from torchmultimodal.models.albef.multimodal_encoder import ALBEFMultimodalEncoder
    from torchmultimodal.modules.encoders.bert_text_encoder import bert_text_encoder
    from torchmultimodal.modules.losses.albef import ImageTextContrastiveLoss
    from torchmultimodal.utils.common import momentum_update

    class Ref(nn.Module):
        def __init__(self):
            super().__init__()
            ve = ALBEFVisionEncoder(image_size=c["image"], patch_size=c["patch"], num_hidden_layers=c["vlayers"],
                                    num_attention_heads=c["vheads"], hidden_size=c["width"], mlp_dim=c["vmlp"])
            te = bert_text_encoder(hidden_size=c["width"], num_hidden_layers=c["tlayers"],
                                   num_attention_heads=c["heads"], intermediate_size=c["ff"], vocab_size=c["vocab"],
                                   dropout=0.0)
            me = ALBEFMultimodalEncoder(c["width"], c["mlayers"], c["heads"], c["ff"])
            self.model_with_similarity = ALBEFModelWithSimilarity(
                ALBEFModel(ve, te, me), nn.Linear(c["width"], c["embed"]), nn.Linear(c["width"], c["embed"]),
                embed_size=c["embed"], queue_size=c["queue"])
            self.itc_loss = ImageTextContrastiveLoss()
            self.itm_head = nn.Linear(c["width"], 2)
            self.mlm_head, self.mlm_head_m = MLMHead(c["width"]), MLMHead(c["width"])
            self.mlm_bias = nn.Parameter(torch.zeros(c["vocab"]))
            self.mlm_head_m.load_state_dict(self.mlm_head.state_dict())
            self.register_buffer("mlm_bias_m", torch.zeros(c["vocab"]))
            self.stash = {}
            self.model_with_similarity.albef_model.register_forward_hook(lambda m, i, o: self.stash.update(out=o))

        def forward(self, image, text, atts, idx, mlm_ids, mlm_labels, alpha=0.4):
            ms = self.model_with_similarity
            out = ms(image, text, atts, idx)
            s = out.similarity
            itc = self.itc_loss(s.sim_i2t, s.sim_t2i, s.sim_i2t_m, s.sim_t2i_m, out.sim_targets, alpha)
            vl = torch.cat([out.multimodal_embeddings[:, 0], out.multimodal_embeddings_neg[:, 0]])
            b = image.shape[0]
            labels = torch.cat([torch.ones(b, dtype=torch.long), torch.zeros(2 * b, dtype=torch.long)])
            itm = F.cross_entropy(self.itm_head(vl), labels)
            am, o = ms.albef_model, self.stash["out"]
            h = am.multimodal_encoder(am.text_encoder(mlm_ids, atts).last_hidden_state, atts, o.image_embeddings)
            logits = self.mlm_head(h, am.text_encoder.embeddings.word_embeddings.weight, self.mlm_bias)
            with torch.no_grad():
                momentum_update(self.mlm_head, self.mlm_head_m, am.momentum)
                self.mlm_bias_m.mul_(am.momentum).add_(self.mlm_bias.detach() * (1 - am.momentum))
                hm = am.multimodal_encoder_m(am.text_encoder_m(mlm_ids, atts).last_hidden_state, atts,
                                             o.image_embeddings_m)
                logits_m = self.mlm_head_m(hm, am.text_encoder_m.embeddings.word_embeddings.weight, self.mlm_bias_m)
            valid = mlm_labels != -100
            n = valid.sum().clamp(min=1)
            ce = F.cross_entropy(logits.flatten(0, 1), mlm_labels.flatten(), reduction="sum") / n
            soft = -(F.log_softmax(logits, -1) * F.softmax(logits_m, -1)).sum(-1)
            mlm = (1 - alpha) * ce + alpha * (soft * valid).sum() / n
            return itc + itm + mlm

    torch.manual_seed(0)
    return Ref()


def polymodal_side(ref, c):
    from polymodal.core import pytree
    from polymodal.models.albef.builders import albef_retrieval
    from polymodal.models.albef.convert import from_torchmultimodal

    spec = albef_retrieval(image_size=c["image"], patch_size=c["patch"], vision_width=c["width"],
                           vision_layers=c["vlayers"], vision_heads=c["vheads"], vision_mlp=c["vmlp"],
                           vocab_size=c["vocab"], hidden_size=c["width"], text_layers=c["tlayers"],
                           multimodal_layers=c["mlayers"], num_heads=c["heads"], intermediate_size=c["ff"],
                           embed_size=c["embed"], queue_size=c["queue"], mlm=True, negatives_by_idx=False)
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()
          if not k.startswith(("mlm_", "stash"))}
    import dataclasses

    base = dataclasses.replace(spec, mlm_head=None)
    params, state = from_torchmultimodal(sd, base)
    head = {"transform": {"dense": {"weight": ref.mlm_head.dense.weight.detach().clone(),
                                    "bias": ref.mlm_head.dense.bias.detach().clone()},
                          "LayerNorm": {"weight": ref.mlm_head.norm.weight.detach().clone(),
                                        "bias": ref.mlm_head.norm.bias.detach().clone()}},
            "bias": ref.mlm_bias.detach().clone()}
    params["mlm_head"] = head
    state["momentum"]["mlm_head"] = pytree.tree_map(lambda t: t.clone(), head)
    return spec, params, state


def make_batch(c):
    g = torch.Generator().manual_seed(1)
    b, t = c["batch"], c["seq"]
    images = torch.randn(b, 3, c["image"], c["image"], generator=g)
    ids = torch.randint(5, c["vocab"], (b, t), generator=g)
    ids[:, 0] = 2
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
    atts = (torch.arange(t) < lengths[:, None]).long()
    ids = ids * atts
    chosen = (torch.rand(b, t, generator=g) < 0.15) & (atts == 1)
    chosen[:, 1] = True
    labels = ids.masked_fill(~chosen, -100)
    return images, ids, atts, torch.arange(b), ids.masked_fill(chosen, 4), labels


def variants(c, compile_modes):
    from polymodal.core import pytree
    from polymodal.core import random as pr

    ref = reference(c)
    spec, params, state0 = polymodal_side(ref, c)
    images, ids, atts, idx, mlm_ids, labels = make_batch(c)
    ref_opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=1e-5)
    leaves = {k: v.requires_grad_() for k, v in pytree.flatten(params).items()}
    opt = torch.optim.SGD(list(leaves.values()), lr=1e-5)
    box = {"state": state0, "step": 0}

    def loss_fn(p, s, key):
        out, new = spec(p, images, ids, atts, idx, s, key=key, mlm_input_ids=mlm_ids, mlm_labels=labels)
        return out.loss, new

    out = []
    for mode in compile_modes:
        ref_fwd = ref if mode == "eager" else torch.compile(ref)
        ours = loss_fn if mode == "eager" else torch.compile(loss_fn, fullgraph=True)

        def ref_step(f=ref_fwd):
            loss = f(images, ids, atts, idx, mlm_ids, labels)
            ref_opt.zero_grad(set_to_none=True)
            loss.backward()
            ref_opt.step()
            return float(loss.detach())

        def our_step(f=ours):
            box["step"] += 1
            loss, box["state"] = f(pytree.unflatten(leaves), box["state"], pr.key(box["step"]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return float(loss.detach())

        out += [("TorchMultimodal", mode, ref_step), ("polymodal functional", mode, our_step)]
    return out


def run(name, c, args):
    torch.manual_seed(0)
    vs = variants(c, args.modes)
    checks, times = {}, {(n, m): [] for n, m, _ in vs}
    for n, m, f in vs:
        t0 = time.perf_counter()
        for i in range(args.warmup):
            loss = f()
            checks.setdefault((n, m), loss)
        print(f"  {name} {n} {m}: warmup {time.perf_counter() - t0:.1f} s wall", flush=True)
    for r in range(args.rounds):
        for n, m, f in vs:
            t0 = time.process_time()
            f()
            times[(n, m)].append(time.process_time() - t0)
    rows = []
    for m in args.modes:
        ref_best = min(times[("TorchMultimodal", m)])
        for n in ("TorchMultimodal", "polymodal functional"):
            ts = times[(n, m)]
            rows.append((name, n, m, min(ts), statistics.median(ts), ref_best / min(ts), checks[(n, m)]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", nargs="+", default=["tiny", "full"], choices=sorted(CONFIGS))
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.configs:
        rows += run(name, CONFIGS[name], args)
    load = os.getloadavg()
    lines = ["# ALBEF training step: polymodal vs TorchMultimodal", "",
             f"`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/albef_step.py {' '.join(os.sys.argv[1:])}`", "",
             f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread, CPU time; "
             f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (shared machine); "
             f"{args.warmup} warmup steps, {args.rounds} interleaved rounds.", "",
             "| config | implementation | mode | best (s) | median (s) | ratio (TMM best / best) "
             "| check (first loss) |",
             "|---|---|---|---|---|---|---|"]
    for name, n, m, best, med, ratio, check in rows:
        lines.append(f"| {name} | {n} | {m} | {best:.3f} | {med:.3f} | {ratio:.2f}x | {check:.4f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        RESULTS.write_text(text)


if __name__ == "__main__":
    main()
