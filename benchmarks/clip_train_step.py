"""One CLIP training step (forward, contrastive loss, backward, AdamW) in polymodal, TorchMultimodal
and open_clip, at the same configuration, batch and weights, in one process.

Reproduce (writes ``benchmarks/results/clip_train_step.md``)::

    .venv/bin/python benchmarks/clip_train_step.py                 # ~10 minutes on 2 CPU cores
    .venv/bin/python benchmarks/clip_train_step.py --configs tiny   # ~1 minute
    # on a GPU (results/clip_train_step_cuda.md: H100, bf16 autocast as open_clip's amp_bf16)
    python benchmarks/clip_train_step.py --device cuda --configs vit_b32 --batch-vit 256 \\
        --precision bf16 --compile-peers --steps 10 --out /tmp/vit.md
    python benchmarks/clip_train_step.py --device cuda --configs tiny --batch-tiny 1024 \\
        --precision bf16 --compile-peers --steps 20 --warmup 3 --out /tmp/tiny.md

Configurations: ``vit_b32`` is CLIP ViT-B/32 (224 px, text context 77, 151M parameters);
``tiny`` is ``clip_tiny`` (64 px, patch 8, 2 x 128 wide towers, context 32). Every
implementation starts from the same weights (an open_clip model with QuickGELU, converted with
``from_open_clip`` / ``to_torchmultimodal``) and gets the same batch of random images and token
ids; the loss of its first step is printed in the table, so the rows are seen to compute the
same thing. Rows:

* ``open_clip``: ``open_clip.model.CLIP`` + ``ClipLoss``, ``torch.optim.AdamW`` (foreach).
* ``TorchMultimodal``: its ``CLIP`` (``CLIPViTEncoder`` + ``CLIPTextEncoder``) +
  ``ContrastiveLossWithTemperature`` (the temperature lives in the loss module).
* ``polymodal functional``: ``spec(params, images, tokens)`` + ``contrastive_loss_with_temperature``,
  autograd over the parameter pytree's leaves, the same AdamW.
* ``polymodal shell``: ``polymodal.nn.CLIP`` (an ``nn.Module``) in train mode.
* ``... + torch.compile``: the forward and loss (functional) or the module (shell) compiled with
  inductor, and the AdamW step compiled too (torch's compiled optimizer: one fused kernel instead
  of a dozen foreach passes); eager rows use the foreach AdamW. Compilation happens in the
  warm-up steps and is not timed. ``--compile-peers`` adds the peers compiled the same way.

Each row builds its model, runs ``--warmup`` steps, then times ``--steps`` steps: on CPU the
CPU time of the process with torch on ``--threads`` threads (1 by default: on a shared machine
wall time mostly measures the neighbours), on CUDA the wall time after synchronising. Rows run one
after another (the models are not all kept in memory at once); the eager rows run a second time,
in reverse order, after the compiled ones, so slow drift of the machine shows. The table gives
the best and the median step; ratios compare best steps (noise only ever adds time).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "clip_train_step.md"
CONFIGS = {  # name -> (open_clip embed_dim, vision_cfg, text_cfg, polymodal builder)
    "vit_b32": (512, dict(image_size=224, layers=12, width=768, patch_size=32),
                dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12), "clip_vit_b32"),
    "tiny": (128, dict(image_size=64, layers=2, width=128, patch_size=8, head_width=32),
             dict(context_length=32, vocab_size=49408, width=128, heads=4, layers=2), "clip_tiny"),
}
LR, WD = 1e-4, 0.1
AMP: dict = {"enabled": False}  # torch.autocast arguments for forward + loss (--precision bf16)


def autocast():
    return torch.autocast(**AMP) if AMP["enabled"] else contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def inputs(cfg: str, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    _, vision, text, _ = CONFIGS[cfg]
    g = torch.Generator().manual_seed(0)
    s, t = vision["image_size"], text["context_length"]
    images = torch.randn(batch, 3, s, s, generator=g)
    tokens = torch.randint(1, 49406, (batch, t), generator=g)
    eot = torch.randint(2, t, (batch,), generator=g)
    tokens = torch.where(torch.arange(t)[None] < eot[:, None], tokens, 0).scatter(1, eot[:, None], 49407)
    return images.to(device), tokens.to(device)


def reference(cfg: str) -> dict[str, torch.Tensor]:
    """The shared initial weights: a randomly initialised open_clip model (QuickGELU, as OpenAI's)."""
    import open_clip

    embed, vision, text, _ = CONFIGS[cfg]
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in open_clip.model.CLIP(embed, vision, text, quick_gelu=True).state_dict().items()}


def _adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, weight_decay=WD, foreach=True)


def _update(opt: torch.optim.Optimizer, compile_: bool) -> Callable[[], None]:
    """``opt.step``, compiled into fused kernels for the compiled rows (torch's "compiled optimizer")."""
    if not compile_:
        return opt.step

    @torch.compile(fullgraph=False)
    def update():
        opt.step()

    return update


def make_open_clip(cfg: str, sd: dict, device: torch.device, compile_: bool = False) -> Callable:
    import open_clip

    embed, vision, text, _ = CONFIGS[cfg]
    model = open_clip.model.CLIP(embed, vision, text, quick_gelu=True)
    model.load_state_dict(sd)
    model.to(device).train()
    loss_fn, opt = open_clip.loss.ClipLoss(), _adamw(model.parameters())
    fwd, update = (torch.compile(model) if compile_ else model), _update(opt, compile_)

    def step(images, tokens):
        with autocast():
            img, txt, scale = fwd(images, tokens)
            loss = loss_fn(img, txt, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        update()
        return loss

    return step


def make_torchmultimodal(cfg: str, sd: dict, device: torch.device, compile_: bool = False) -> Callable:
    from torchmultimodal.models.clip.image_encoder import CLIPViTEncoder
    from torchmultimodal.models.clip.model import CLIP
    from torchmultimodal.models.clip.text_encoder import CLIPTextEncoder
    from torchmultimodal.modules.losses.contrastive_loss_with_temperature import ContrastiveLossWithTemperature

    from polymodal.models.clip import from_open_clip, to_torchmultimodal

    embed, v, t, _ = CONFIGS[cfg]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested-tensor notice of nn.TransformerEncoder
        model = CLIP(
            CLIPViTEncoder(embed, v["patch_size"], v["image_size"], v["width"], v["width"] // v.get("head_width", 64),
                           v["layers"]),
            CLIPTextEncoder(embed, t["context_length"], t["vocab_size"], t["width"], 4 * t["width"], t["heads"],
                            t["layers"]),
        )
    model.load_state_dict(to_torchmultimodal(from_open_clip(sd)))
    loss_fn = ContrastiveLossWithTemperature(logit_scale=float(sd["logit_scale"]))
    model.to(device).train()
    loss_fn.to(device)
    opt = _adamw(list(model.parameters()) + list(loss_fn.parameters()))
    fwd, update = (torch.compile(model) if compile_ else model), _update(opt, compile_)

    def step(images, tokens):
        with autocast():
            out = fwd(images, tokens)
            loss = loss_fn(out.embeddings_a, out.embeddings_b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        update()
        return loss

    return step


def make_polymodal(cfg: str, sd: dict, device: torch.device, shell: bool, compile_: bool = False) -> Callable:
    from polymodal import nn as pnn
    from polymodal.core import pytree
    from polymodal.core.losses import contrastive_loss_with_temperature
    from polymodal.models.clip import build, from_open_clip

    spec = build(CONFIGS[cfg][3])
    params = pytree.tree_map(lambda x: x.detach().clone().to(device), from_open_clip(sd, spec))

    def contrastive(out):
        return contrastive_loss_with_temperature(out.image_embeddings, out.text_embeddings, out.logit_scale).loss

    if shell:
        model = pnn.CLIP.from_params(spec, params).train()
        opt = _adamw(model.parameters())
        fwd = torch.compile(model) if compile_ else model
        loss_of = lambda images, tokens: contrastive(fwd(images, tokens))  # noqa: E731
    else:
        leaves = [p.requires_grad_(True) for p in pytree.leaves(params)]
        opt = _adamw(leaves)
        loss_of = lambda images, tokens: contrastive(spec(params, images, tokens))  # noqa: E731
        if compile_:
            loss_of = torch.compile(loss_of)
    update = _update(opt, compile_)

    def step(images, tokens):
        with autocast():
            loss = loss_of(images, tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        update()
        return loss

    return step


def clock(device: torch.device) -> Callable[[], float]:
    """CPU: seconds of CPU time of this process (other processes on a shared machine disturb it
    little); CUDA: wall time (callers synchronise)."""
    return time.process_time if device.type == "cpu" else time.perf_counter


def measure(make: Callable, images, tokens, warmup: int, steps: int, device: torch.device) -> tuple[list[float], float]:
    """``(per-step seconds, first-step loss)`` of a freshly built implementation."""
    step = make()
    now = clock(device)
    first = float(step(images, tokens).detach())
    for _ in range(warmup - 1):
        step(images, tokens)
    sync(device)
    times = []
    for _ in range(steps):
        t = now()
        step(images, tokens)
        sync(device)
        times.append(now() - t)
    del step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return times, first


def run_config(cfg: str, batch: int, args, device: torch.device) -> list[tuple[str, list[float], float]]:
    """Eager rows run twice (in order, and in reverse after the compiled rows), compiled rows once."""
    sd = reference(cfg)
    images, tokens = inputs(cfg, batch, device)
    eager = [
        ("open_clip", lambda: make_open_clip(cfg, sd, device)),
        ("TorchMultimodal", lambda: make_torchmultimodal(cfg, sd, device)),
        ("polymodal functional", lambda: make_polymodal(cfg, sd, device, shell=False)),
        ("polymodal shell", lambda: make_polymodal(cfg, sd, device, shell=True)),
    ]
    compiled = [
        ("polymodal functional + torch.compile", lambda: make_polymodal(cfg, sd, device, False, True)),
        ("polymodal shell + torch.compile", lambda: make_polymodal(cfg, sd, device, True, True)),
    ]
    if args.compile_peers:
        compiled += [("open_clip + torch.compile", lambda: make_open_clip(cfg, sd, device, True)),
                     ("TorchMultimodal + torch.compile", lambda: make_torchmultimodal(cfg, sd, device, True))]
    eager = [(n, m) for n, m in eager if not any(s in n for s in args.skip)]
    compiled = [(n, m) for n, m in compiled if not any(s in n for s in args.skip)]
    times: dict[str, list[float]] = {}
    firsts: dict[str, float] = {}
    for name, make in eager + compiled + eager[::-1]:
        is_compiled = "compile" in name
        torch._dynamo.reset()
        t0 = time.perf_counter()
        ts, first = measure(make, images, tokens, args.warmup + (2 if is_compiled else 0), args.steps, device)
        times.setdefault(name, []).extend(ts)
        firsts[name] = first
        print(f"  {cfg:8s} {name:40s} best {min(ts) * 1e3:9.1f} ms/step  median {statistics.median(ts) * 1e3:9.1f}  "
              f"first loss {first:.6f}  ({time.perf_counter() - t0:.0f}s)", flush=True)
    names = [n for n, _ in eager + compiled]
    return [(n, times[n], firsts[n]) for n in names]


def table(cfg: str, batch: int, rows) -> str:
    base = min(rows[0][1])
    lines = [f"### {cfg} (batch {batch})", "",
             "| implementation | best ms / step | median ms / step | samples / s (best) | vs open_clip | loss, step 1 |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, ts, first in rows:
        best = min(ts)
        rate = batch / best
        lines.append(f"| {name} | {best * 1e3:,.1f} | {statistics.median(ts) * 1e3:,.1f} | {rate:,.{2 if rate < 10 else 1}f} | "
                     f"{base / best:.2f}x | {first:.6f} |")
    return "\n".join(lines) + "\n"


def command_line(args, device: torch.device) -> str:
    """The flags that reproduce this run."""
    parts = [f"--device {device.type}", "--configs " + " ".join(args.configs)]
    parts += [f"--batch-vit {args.batch_vit}"] if "vit_b32" in args.configs else []
    parts += [f"--batch-tiny {args.batch_tiny}"] if "tiny" in args.configs else []
    parts += [f"--warmup {args.warmup} --steps {args.steps}"]
    parts += [f"--threads {args.threads}"] if device.type == "cpu" else []
    parts += [f"--precision {args.precision}"] if args.precision != "fp32" else []
    parts += ["--compile-peers"] if args.compile_peers else []
    parts += ["--skip " + " ".join(f"'{s}'" for s in args.skip)] if args.skip else []
    return " ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["vit_b32", "tiny"], choices=sorted(CONFIGS))
    ap.add_argument("--batch-vit", type=int, default=8, help="batch of vit_b32")
    ap.add_argument("--batch-tiny", type=int, default=64, help="batch of tiny")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps (+2 for compiled rows)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--compile-peers", action="store_true", help="also time open_clip and TMM under torch.compile")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"],
                    help="fp32; tf32 matmuls (CUDA); bf16: torch.autocast(bfloat16) around forward and loss, "
                         "fp32 weights and optimizer (open_clip's --precision amp_bf16)")
    ap.add_argument("--skip", nargs="*", default=[], metavar="TEXT",
                    help="leave out the rows whose name contains TEXT (e.g. 'shell + torch.compile')")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.precision == "bf16":
        AMP.update(enabled=True, device_type=device.type, dtype=torch.bfloat16)
    if args.threads:
        torch.set_num_threads(args.threads)
    import logging

    logging.getLogger().setLevel(logging.ERROR)
    sections = []
    for cfg in args.configs:
        batch = args.batch_vit if cfg == "vit_b32" else args.batch_tiny
        sections.append(table(cfg, batch, run_config(cfg, batch, args, device)))
    import open_clip
    import torchmultimodal

    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads")
    load = f"; load average {os.getloadavg()[0]:.1f} when finished (shared machine)" if device.type == "cpu" else ""
    header = (
        "# CLIP training step\n\n"
        "`benchmarks/clip_train_step.py`: forward, contrastive loss, backward and AdamW on the same weights and batch "
        "in each library, one process, rows one after another (eager rows twice: before and, in reverse order, after "
        f"the compiled rows); {'CPU time of the process' if device.type == 'cpu' else 'wall time'} per step over "
        f"{args.steps} timed steps per run after {args.warmup} warm-up steps (+2 for compiled rows, compile time "
        "excluded). Ratios compare the best step (the least disturbed by other load) with open_clip's.\n"
        f"Command: `python benchmarks/clip_train_step.py {command_line(args, device)}`\n"
        f"Machine: {where}; torch {torch.__version__}, open_clip {open_clip.__version__}, "
        f"torchmultimodal {getattr(torchmultimodal, '__version__', 'nightly')}{load}.\n\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(header + "\n".join(sections))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
