"""One FLAVA pretraining step (forward with all six losses, backward, AdamW) in polymodal against
TorchMultimodal from the same weights and batch, eager and compiled.

Reproduce (writes ``benchmarks/results/flava_pretrain_step.md``)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/flava_pretrain_step.py                   # tiny (B 32) + full (B 2)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/flava_pretrain_step.py --configs tiny --no-compile-full

Both sides compute the same thing: polymodal with ``mask_text_padding_in_mm=False`` (TorchMultimodal's
unmasked multimodal padding), the weights converted with ``to_torchmultimodal``, one paired batch with ITM
negatives, masked text and BEiT-style patch masks, and the losses summed (the ``check`` column: the first
step's total loss on each side). The dVAE tokenizer runs in both steps (no gradient). Each step ends with
AdamW as each library trains: TorchMultimodal with torch's default implementation (its examples'
``torch.optim.AdamW``), polymodal with the fused kernel (``polymodal.train``'s ``default_optimizer``); the
row "polymodal, torch's default AdamW" gives ours the reference's optimizer, so the models compare like for like.

Timing: CPU time of this process per step (the machine is shared: wall time measures the neighbours), one
torch thread, ``--warmup`` untimed steps (compilation happens there), then ``--steps`` timed steps per row;
"tiny" interleaves them (rounds, each timing every row once in turn). Reported: best and median; ratios =
TorchMultimodal's best (eager, and the same mode) / the row's best (> 1: faster than it).
"full" is ``flava_model_for_pretraining()`` (ViT-B/16 image and text encoders, 6 multimodal layers, the
8192-code dVAE at 112 px; 357.6 M parameters) at batch 2 and 32 text tokens; rows run one after another,
each library's model built, timed and freed in turn (two AdamW states of the full model do not fit here).
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from polymodal.core import random as pr
from polymodal.core.pytree import flatten, unflatten
from polymodal.models.flava import flava_model_for_pretraining
from polymodal.models.flava.convert import to_torchmultimodal

RESULTS = Path(__file__).parent / "results" / "flava_pretrain_step.md"
TINY = dict(image_hidden_size=64, image_num_attention_heads=4, image_num_hidden_layers=2, image_intermediate_size=128,
            image_size=32, patch_size=4, text_hidden_size=64, text_num_attention_heads=4, text_num_hidden_layers=2,
            text_intermediate_size=128, vocab_size=64, max_position_embeddings=32, multimodal_hidden_size=64,
            multimodal_num_attention_heads=4, multimodal_num_hidden_layers=1, multimodal_intermediate_size=128,
            text_and_image_proj_size=64)
CONFIGS = {
    "tiny": dict(batch=32, seq=16, model=TINY, codebook=dict(codebook_image_size=64, codebook_n_hid=4,
                                                              image_vocab_size=128)),
    "full": dict(batch=2, seq=32, model={}, codebook={}),
}


def _spec(cfg):
    return flava_model_for_pretraining(mask_text_padding_in_mm=False, **cfg["codebook"], **cfg["model"])


def _tmm(cfg, spec):
    from torchmultimodal.models.flava.model import DalleEncoder, DalleVAEEncoder, FLAVAForPreTraining, flava_model
    from torchmultimodal.modules.losses.flava import FLAVAPretrainingLoss

    cb = spec.image_codebook
    vae = DalleVAEEncoder(image_size=cb.image_size, pretrained=False)
    vae.encoder = DalleEncoder(n_hid=cb.n_hid, vocab_size=cb.vocab_size)
    loss = FLAVAPretrainingLoss(hidden_size=spec.model.mm_width, text_vocab_size=spec.loss.text_vocab_size,
                                image_vocab_size=spec.loss.image_vocab_size)
    return FLAVAForPreTraining(flava_model(**cfg["model"]), vae, loss)


def _batch(cfg, spec):
    g = torch.Generator().manual_seed(0)
    b, t = cfg["batch"], cfg["seq"]
    emb = spec.model.image_encoder.vit.embeddings
    vocab = spec.loss.text_vocab_size
    text = torch.randint(5, vocab, (b, t), generator=g)
    text[:, 0] = 2
    text[0, t * 3 // 4:] = 0
    chosen = (torch.rand(b, t, generator=g) < 0.15) & (text != 0)
    chosen[:, 1] = True
    return dict(image=torch.randn(b, 3, *emb.image_size, generator=g), text=text,
                image_for_codebook=torch.rand(b, 3, spec.image_codebook.image_size, spec.image_codebook.image_size,
                                              generator=g),
                image_patches_mask=torch.rand(b, emb.num_patches, generator=g) < 0.4,
                text_masked=text.masked_fill(chosen, 4), mlm_labels=torch.where(chosen, text, -1),
                itm_labels=torch.tensor([1, 0] * (b // 2)))


def _time(step, warmup, steps):
    check = None
    for i in range(warmup):
        v = step()
        check = v if i == 0 else check
    times = []
    for _ in range(steps):
        t0 = time.process_time()
        step()
        times.append((time.process_time() - t0) * 1000)
    return min(times), statistics.median(times), check


def make_tmm(cfg, sd, batch, compiled):
    spec = _spec(cfg)
    model = _tmm(cfg, spec)
    model.load_state_dict(sd, strict=True)
    model.train()
    fwd = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        out = fwd(**batch)
        loss = sum(v for v in vars(out.losses).values() if v is not None)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def make_ours(cfg, sd, batch, compiled, fused=True):
    """``fused``: AdamW's fused kernel, as ``polymodal.train`` steps (``default_optimizer``); ``False``: torch's
    default implementation, the reference's (the model's own share of the step, compared like for like)."""
    from polymodal.models.flava.convert import from_torchmultimodal

    spec = _spec(cfg)
    leaves = {k: v.detach().clone().requires_grad_() for k, v in flatten(from_torchmultimodal(sd, spec)).items()}
    loss_fn = lambda p, b: spec(p, **b).losses.total  # noqa: E731
    fn = torch.compile(loss_fn) if compiled else loss_fn
    opt = torch.optim.AdamW(list(leaves.values()), lr=1e-4, fused=fused or None)
    tree = unflatten(leaves)

    def step():
        loss = fn(tree, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    return step


def _interleaved(steps, rounds):
    """Warm every step function, then ``rounds`` rounds timing each once in turn (CPU time, ms): drifting
    load on a shared machine hits every row alike."""
    checks, times = [], [[] for _ in steps]
    for step, w in steps:
        checks.append([step() for _ in range(w)][0])
    for _ in range(rounds):
        for i, (step, _) in enumerate(steps):
            t0 = time.process_time()
            step()
            times[i].append((time.process_time() - t0) * 1000)
    return [(min(t), statistics.median(t), c) for t, c in zip(times, checks)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["tiny", "full"], choices=list(CONFIGS))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-compile-full", action="store_true", help="leave the compiled rows out for 'full'")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    parts = __doc__.split("\n\n")
    lines = ["# FLAVA pretraining step", "", parts[3].replace("\n", " "), "", parts[4].replace("\n", " "), "",
             f"Command: `OMP_NUM_THREADS=1 python benchmarks/flava_pretrain_step.py {' '.join(os.sys.argv[1:])}`",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, 1 torch thread; torch {torch.__version__}; "
             f"load average at start {os.getloadavg()[0]:.1f}", ""]
    for name in args.configs:
        cfg = CONFIGS[name]
        spec = _spec(cfg)
        sd = {k: v.clone() for k, v in to_torchmultimodal(spec.init(key=pr.key(0)), spec).items()}
        batch = _batch(cfg, spec)
        rows = []
        modes = [False] + ([] if name == "full" and args.no_compile_full else [True])
        variants = [(lib + (" + torch.compile" if c else ""), make, c) for c in modes
                    for lib, make in (("TorchMultimodal", make_tmm), ("polymodal", make_ours))]
        variants.insert(2, ("polymodal, torch's default AdamW", functools.partial(make_ours, fused=False), False))
        if name == "full":  # one model at a time: two AdamW states of 357.6 M parameters do not fit beside each other
            for label, make, compiled in variants:
                torch._dynamo.reset()
                print(f"{name}: {label} ...", flush=True)
                best, med, check = _time(make(cfg, sd, batch, compiled), args.warmup + (2 if compiled else 0),
                                         args.steps)
                rows.append((label, best, med, check))
                gc.collect()
                print(f"  best {best:,.1f} ms  median {med:,.1f} ms  loss {check:.6f}", flush=True)
        else:
            steps = [(make(cfg, sd, batch, c), args.warmup + (2 if c else 0)) for _, make, c in variants]
            rows = [(label, *res) for (label, _, _), res in zip(variants, _interleaved(steps, args.steps))]
        ref = rows[0][1]
        lines += [f"### {name} (batch {cfg['batch']})", "",
                  "| implementation | best ms / step | median ms / step | vs TorchMultimodal eager "
                  "| vs TorchMultimodal, same mode | check (loss, step 1) |",
                  "|---|---:|---:|---:|---:|---:|"]
        same = {("torch.compile" in lab): b for lab, b, _, _ in rows if lab.startswith("TorchMultimodal")}
        lines += [f"| {lab} | {b:,.1f} | {m:,.1f} | {ref / b:.2f}x | {same[('torch.compile' in lab)] / b:.2f}x "
                  f"| {c:.6f} |" for lab, b, m, c in rows]
        lines.append("")
        del sd
        gc.collect()
    lines.append(f"Load average at the end: {os.getloadavg()[0]:.1f}.")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
