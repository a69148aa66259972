"""Training internals on a ViT-B: activation checkpointing, sharded memory, the two sharding routes.

Reproduce (writes ``benchmarks/results/training_internals.md``)::

    .venv/bin/python benchmarks/training_internals.py            # ViT-B/16, CPU
    .venv/bin/python benchmarks/training_internals.py --cuda     # also the checkpointing rows on the GPU
    .venv/bin/python benchmarks/training_internals.py --small    # a 2-layer, 96-wide smoke run

The model is a ViT-B/16 classifier over the polymodal core (``PatchEmbedding``, a 12-layer,
768-wide pre-norm ``TransformerEncoder`` over the block seam, 197 tokens, a 1000-way head),
fp32, trained with cross-entropy and ``torch.optim.AdamW``; a step is forward + backward + AdamW.

1. Activation checkpointing (``polymodal.train.policy``): every config runs in fresh
   subprocesses, batch 8, AdamW state allocated up front. CPU memory: peak resident set
   (``ru_maxrss``) over two steps minus the resident set before the first (activations +
   gradients + workspace), with glibc told to mmap blocks over 64 KiB so that freed memory leaves
   the RSS at once; CPU time: a separate process with the default allocator, median over the
   timed steps after one warm-up step. CUDA: ``max_memory_allocated`` over the timed steps above
   the live memory before them, fused AdamW.
2. Per-rank parameter + optimizer memory, 2 gloo ranks (``polymodal.train.distributed.sharding``): bytes each
   rank holds after one AdamW step, sharded (``shard_params``) vs unsharded (every rank a full
   copy, as DDP).
3. One step of each sharding route on 2 gloo ranks, global batch 8: the pytree route
   (``shard_params`` + ``gather_rest`` + the gather policy at the seam) and the ``fully_shard``
   route (``fully_shard_shell``), each with and without checkpointing every block; median step
   time over the timed steps, same ranks, same data.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from polymodal.core import random as pr  # noqa: E402
from polymodal.core.layers import Linear, PatchEmbedding  # noqa: E402
from polymodal.core.layers.seam import use_policy  # noqa: E402
from polymodal.core.layers.transformer import TransformerEncoder, TransformerEncoderLayer  # noqa: E402
from polymodal.core.pytree import leaves, num_params  # noqa: E402
from polymodal.core.spec import Spec  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "training_internals.md"


@dataclass(frozen=True)
class ViT(Spec):
    """ViT classifier; ``__call__`` returns the mean cross-entropy of ``labels``."""

    width: int = 768  # model width
    depth: int = 12  # blocks
    heads: int = 12  # attention heads
    image: int = 224  # image side (patch 16: 196 patches + CLS = 197 tokens)
    classes: int = 1000  # head outputs

    def patch(self) -> PatchEmbedding:
        return PatchEmbedding(self.image, 16, 3, self.width)

    def encoder(self) -> TransformerEncoder:
        layer = TransformerEncoderLayer(self.width, self.heads, 4 * self.width, activation="gelu",
                                        norm_first=True, layer_norm_eps=1e-6)
        return TransformerEncoder(layer, self.depth, final_norm=True)

    def block_stacks(self):
        return [f"encoder.{s}" for s in self.encoder().block_stacks()]

    def init(self, *, key):
        k = pr.split(key, 3)
        return {"patch": self.patch().init(key=k[0]), "encoder": self.encoder().init(key=k[1]),
                "head": Linear(self.width, self.classes).init(key=k[2])}

    def __call__(self, params, images, labels):
        x = self.patch()(params["patch"], images).embeddings
        x = self.encoder()(params["encoder"], x).last_hidden_state
        return F.cross_entropy(Linear(self.width, self.classes)(params["head"], x[:, 0]), labels)


def _spec(small: bool) -> ViT:
    return ViT(width=96, depth=2, heads=4, image=64, classes=10) if small else ViT()


def _batch(spec: ViT, n: int, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, spec.image, spec.image, generator=g)
    return images.to(device), torch.randint(0, spec.classes, (n,), generator=g).to(device)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _preallocate_adamw(opt: torch.optim.AdamW) -> None:
    """Create AdamW's state (as its first step would) so the measured steps start in steady state."""
    for group in opt.param_groups:
        for p in group["params"]:
            step = torch.zeros((), device=p.device) if group.get("fused") else torch.tensor(0.0)
            opt.state[p] = {"step": step, "exp_avg": torch.zeros_like(p),
                            "exp_avg_sq": torch.zeros_like(p)}


# ----------------------------------------------------------------- 1. checkpointing (child)


def child_checkpointing(every: int, small: bool, device: str, batch: int, steps: int, what: str) -> dict:
    """One config in this (fresh) process: ``what="memory"`` or ``"time"`` (CUDA measures both at once)."""
    from polymodal.train.policy import checkpoint_policy

    spec = _spec(small)
    params = spec.init(key=pr.key(0))
    flat = leaves(params)
    for t in flat:
        t.data = t.data.to(device)
        t.requires_grad_()
    cuda = device == "cuda"
    # fused AdamW on CUDA: the foreach default would add a gradient-sized temporary to every step's peak
    opt = torch.optim.AdamW(flat, lr=1e-4, fused=cuda or None)
    _preallocate_adamw(opt)
    images, labels = _batch(spec, batch, device=device)
    n = steps + 1 if (cuda or what == "time") else 2
    times = []

    def step():
        with use_policy(checkpoint_policy(every)):
            loss = spec(params, images[:bs], labels[:bs])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if what == "memory":  # one-time library set-up (thread pools, kernels) outside the measurement
        bs = 1
        step()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    bs = batch
    base = _rss()
    for i in range(n):
        if cuda and i == 1:  # the caching allocator counts live tensors exactly: measure after warm-up
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {"every": every, "resident_bytes": base, "loss": float(loss.detach()), "threads": torch.get_num_threads()}
    if cuda or what == "memory":
        out["step_peak_bytes"] = peak - base
    if cuda or what == "time":
        out["step_s"] = statistics.median(times)
    return out


def run_checkpointing(small: bool, device: str, batch: int, steps: int) -> list[dict]:
    """Per config: on CPU a memory run (large blocks mmapped, so RSS follows live memory) and a
    separate timing run (default malloc); on CUDA one run."""
    rows = []
    for every in (0, 1, 2):
        row = {}
        for what in (("both",) if device == "cuda" else ("memory", "time")):
            cmd = [sys.executable, __file__, "--child-every", str(every), "--device", device, "--batch", str(batch),
                   "--steps", str(steps), "--child-what", what] + (["--small"] if small else [])
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0") if what == "memory" \
                else os.environ
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            row.update(json.loads(out.strip().splitlines()[-1]))
        rows.append(row)
        print(f"  [{device}] checkpoint every {every}: {row}", flush=True)
    return rows


# ----------------------------------------------------------------- 2 + 3. two ranks


def _rank_bench(mesh, small: bool, batch: int, steps: int) -> dict:
    import torch.distributed as dist

    from polymodal.nn.shell import Shell
    from polymodal.train.policy import checkpoint_policy, training_policy
    from polymodal.train.distributed.sharding import full_params, gather_rest, local_bytes, shard_params
    from polymodal.train.distributed.fsdp import fully_shard_shell

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // mesh.size()))
    spec = _spec(small)
    params = spec.init(key=pr.key(0))
    rank, n = mesh.get_local_rank(), mesh.size()
    images, labels = _batch(spec, batch)
    b = batch // n
    mine = images[rank * b:(rank + 1) * b], labels[rank * b:(rank + 1) * b]
    out = {"params": num_params(params), "threads": torch.get_num_threads()}

    # 2. memory: unsharded replica (DDP-like) vs sharded, after one AdamW step
    full = [t.clone().requires_grad_() for t in leaves(params)]
    opt = torch.optim.AdamW(full, lr=1e-4)
    for t in full:
        t.grad = torch.zeros_like(t)
    opt.step()
    out["unsharded_bytes"] = (sum(t.numel() * t.element_size() for t in full), local_bytes(opt))
    del full, opt

    def pytree_step(sharded, policy):
        local = gather_rest(sharded, stacks=spec)
        with use_policy(policy):
            loss = spec(local, *mine)
        loss.backward()
        return loss

    def fsdp_step(shell, policy):
        with use_policy(policy):
            loss = shell(*mine)
        loss.backward()
        return loss

    routes = {
        "pytree": (lambda: shard_params(params, mesh), lambda m: leaves(m), pytree_step, training_policy()),
        "pytree + checkpoint every block": (lambda: shard_params(params, mesh), lambda m: leaves(m), pytree_step,
                                            training_policy(checkpoint_every=1)),
        "fully_shard": (lambda: fully_shard_shell(Shell.from_params(spec, params), mesh), lambda m: m.parameters(),
                        fsdp_step, checkpoint_policy(0)),
        "fully_shard + checkpoint every block": (lambda: fully_shard_shell(Shell.from_params(spec, params), mesh),
                                                 lambda m: m.parameters(), fsdp_step, checkpoint_policy(1)),
    }
    out["routes"] = {}
    for name, (make, parameters, step, policy) in routes.items():
        model = make()
        opt = torch.optim.AdamW(list(parameters(model)), lr=1e-4)
        times, losses = [], []
        for i in range(steps + 1):
            dist.barrier()
            t0 = time.perf_counter()
            loss = step(model, policy)
            opt.step()
            opt.zero_grad(set_to_none=True)
            dist.barrier()
            if i:
                times.append(time.perf_counter() - t0)
            losses.append(float(loss.detach()))
        out["routes"][name] = {"step_s": statistics.median(times), "losses": losses}
        if name == "pytree":
            out["sharded_bytes"] = (local_bytes(model), local_bytes(opt))
            full_params(model)  # (collective: keeps the ranks in step)
        del model, opt
    return out


def run_ranks_bench(small: bool, batch: int, steps: int) -> list[dict]:
    from polymodal.train.distributed import run_ranks

    return run_ranks(_rank_bench, 2, small, batch, steps)


# ----------------------------------------------------------------- report


def _mb(b: float) -> str:
    return f"{b / 2**20:,.0f} MiB"


def report(args, ckpt: dict[str, list[dict]], ranks: list[dict], wall: float) -> str:
    spec = _spec(args.small)
    lines = ["# Training internals", "",
             f"`benchmarks/training_internals.py{' --cuda' if args.cuda else ''}{' --small' if args.small else ''}` "
             f"(one run, {wall:.0f} s): ViT{'-small-smoke' if args.small else '-B/16'} classifier "
             f"({ranks[0]['params']:,} params, {spec.depth} layers, width {spec.width}, "
             f"{(spec.image // 16) ** 2 + 1} tokens), fp32, AdamW.",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
             f"python {platform.python_version()}"
             + (f", GPU {torch.cuda.get_device_name()}" if args.cuda else "")
             + f"; load average {os.getloadavg()[0]:.1f} when finished.", ""]
    lines += ["## 1. Activation checkpointing (batch %d, median of %d steps after a warm-up)" % (args.batch, args.steps),
              "", "Step peak = peak memory during a step above what is resident before it (params + AdamW state):",
              "activations, gradients, workspace. CPU: peak RSS of a fresh process per row (glibc mmaps blocks over",
              "64 KiB, so freed memory leaves the RSS), time from another process with the default allocator;",
              "CUDA: max_memory_allocated, fused AdamW.",
              "", "| device | policy | step peak | vs none | step time | vs none |", "|---|---|---:|---:|---:|---:|"]
    names = {0: "none", 1: "every block", 2: "every 2nd block"}
    for device, rows in ckpt.items():
        base = rows[0]
        for r in rows:
            lines.append(f"| {device} | {names[r['every']]} | {_mb(r['step_peak_bytes'])} | "
                         f"{r['step_peak_bytes'] / base['step_peak_bytes']:.2f}x "
                         f"({1 - r['step_peak_bytes'] / base['step_peak_bytes']:.0%} less) | "
                         f"{r['step_s'] * 1e3:,.0f} ms | {r['step_s'] / base['step_s']:.2f}x |")
    un, sh = ranks[0]["unsharded_bytes"], [r["sharded_bytes"] for r in ranks]
    lines += ["", "## 2. Per-rank parameter + optimizer memory (2 gloo ranks, after one AdamW step)", "",
              "| | params | AdamW state | total | vs unsharded |", "|---|---:|---:|---:|---:|",
              f"| unsharded (each rank) | {_mb(un[0])} | {_mb(un[1])} | {_mb(sum(un))} | 1.00x |"]
    for r, (p, o) in enumerate(sh):
        lines.append(f"| sharded, rank {r} | {_mb(p)} | {_mb(o)} | {_mb(p + o)} | {(p + o) / sum(un):.3f}x |")
    routes = ranks[0]["routes"]
    base = routes["pytree"]["step_s"]
    lines += ["", f"## 3. One training step per route (2 gloo ranks, {ranks[0]['threads']} threads each, "
              f"global batch {args.batch}, median of {args.steps} steps after a warm-up)", "",
              "| route | step time (rank 0) | vs pytree | losses equal to pytree |", "|---|---:|---:|---|"]
    for name, r in routes.items():
        same = max(abs(a - b) for a, b in zip(r["losses"], routes["pytree"]["losses"]))
        lines.append(f"| {name} | {r['step_s'] * 1e3:,.0f} ms | {r['step_s'] / base:.2f}x | max diff {same:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a tiny model (smoke run)")
    ap.add_argument("--cuda", action="store_true", help="also measure checkpointing on the GPU")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--skip-ranks", action="store_true", help="only the checkpointing section (printed, not written)")
    ap.add_argument("--child-every", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    ap.add_argument("--child-what", default="both", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_every is not None:
        print(json.dumps(child_checkpointing(args.child_every, args.small, args.device, args.batch, args.steps,
                                             args.child_what)))
        return
    t0 = time.time()
    ckpt = {"cpu": run_checkpointing(args.small, "cpu", args.batch, args.steps)}
    if args.cuda:
        ckpt["cuda"] = run_checkpointing(args.small, "cuda", args.batch, args.steps)
    if args.skip_ranks:
        print(json.dumps(ckpt, indent=1))
        return
    ranks = run_ranks_bench(args.small, args.batch, args.steps)
    text = report(args, ckpt, ranks, time.time() - t0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
