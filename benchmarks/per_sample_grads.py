"""Per-sample gradients of a small transformer encoder: vmap(grad) next to a batch gradient and a loop.

Reproduce (writes ``benchmarks/results/per_sample_grads.md``)::

    .venv/bin/python benchmarks/per_sample_grads.py            # ~4 minutes on 2 CPU cores
    .venv/bin/python benchmarks/per_sample_grads.py --quick    # fewer repetitions
    python benchmarks/per_sample_grads.py --device cuda --threads 0 --out /tmp/gpu.md

The model is a text classifier: token embedding + learned positions, a 2-layer pre-norm
``TransformerEncoder`` (width 128, 4 heads, feed-forward 512, GELU), mean pooling and a linear
head; the loss is cross-entropy. Rows, all from one run on the same params and batch:

* ``batch gradient``: ``grad`` of the mean loss over the batch: one backward, *not* per-sample
  (the reference cost: what ordinary training pays).
* ``vmap(grad)``: per-sample gradients, ``vmap(grad(per-example loss))``; attention is torch's
  SDPA, batched by the rules ``polymodal.core.layers.attention_kernel`` registers (one fused
  kernel call for the whole batch).
* ``torch.compile(vmap(grad))`` (``--compile``): the same under ``torch.compile(fullgraph=True)``
  (inductor), compile time excluded.
* ``vmap(grad), torch's per-example fallback``: the same with those rules removed, as torch ships:
  the CPU flash kernels (and the CUDA backward kernels) have no batching rule, so torch warns
  and runs them once per example inside vmap.
* ``loop of grad``: per-sample gradients one example at a time.

The vmap per-sample gradients are checked against the loop first (max abs difference printed).
Each row runs in a fresh process. On CPU, time is CPU seconds of that process
(``time.process_time``, torch on ``--threads`` threads, 1 by default), which other processes
on a shared machine disturb little; on CUDA it is wall time after synchronising. Each time is
the median of ``reps`` runs after a warm-up and a measured run. Peak memory is of that run: the
rise of the process's peak resident set (``VmHWM``) over its resident set before the run on
CPU, of ``torch.cuda.max_memory_allocated`` over the allocated memory on CUDA; outputs (the
per-sample gradients) are counted.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from polymodal.core import random as pr
from polymodal.core.layers import Embedding, Linear
from polymodal.core.layers.transformer import TransformerEncoder, TransformerEncoderLayer
from polymodal.core.pytree import leaves, num_params, tree_map

RESULTS = Path(__file__).parent / "results" / "per_sample_grads.md"
VOCAB, WIDTH, HEADS, FF, LAYERS, CLASSES, MAX_LEN = 1000, 128, 4, 512, 2, 10, 512


def build(key):
    k1, k2, k3, k4 = pr.split(key, 4)
    emb, head = Embedding(VOCAB, WIDTH, weight_init="normal", init_std=0.02), Linear(WIDTH, CLASSES)
    enc = TransformerEncoder(TransformerEncoderLayer(WIDTH, HEADS, FF, activation="gelu", norm_first=True),
                             LAYERS, final_norm=True)
    params = {"emb": emb.init(key=k1), "pos": 0.02 * pr.normal(k2, (MAX_LEN, WIDTH)), "enc": enc.init(key=k3),
              "head": head.init(key=k4)}

    def logits(p, ids):  # ids (B, T) or (T,)
        x = emb(p["emb"], ids) + p["pos"][: ids.shape[-1]]
        return head(p["head"], enc(p["enc"], x).last_hidden_state.mean(-2))

    def loss_one(p, ids, y):  # one example
        return F.cross_entropy(logits(p, ids[None]), y[None])

    def loss_batch(p, ids, y):
        return F.cross_entropy(logits(p, ids), y)

    return params, loss_one, loss_batch


def _kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


ROWS = {
    "batch": "batch gradient (not per-sample)",
    "vmap": "vmap(grad), polymodal's SDPA batching rules",
    "compiled": "torch.compile(vmap(grad)), inductor",
    "fallback": "vmap(grad), torch's per-example fallback",
    "loop": "loop of grad over examples",
}


def setup(args, b):
    params, loss_one, loss_batch = build(pr.key(0))
    params = tree_map(lambda t: t.to(args.device), params)
    ids = pr.randint(pr.key(b), (b, args.seq), 0, VOCAB).to(args.device)
    y = pr.randint(pr.key(b + 1), (b,), 0, CLASSES).to(args.device)
    return params, ids, y, loss_one, loss_batch


def row_fn(row, args, b):
    params, ids, y, loss_one, loss_batch = setup(args, b)
    ps_grad = vmap(grad(loss_one), in_dims=(None, 0, 0))
    if row == "batch":
        return lambda: grad(loss_batch)(params, ids, y)
    if row == "vmap":
        return lambda: ps_grad(params, ids, y)
    if row == "fallback":  # drop polymodal's batching rules: torch loops over examples inside vmap
        sys.modules["polymodal.core.layers.attention_kernel"]._LIB._destroy()
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        return lambda: ps_grad(params, ids, y)
    if row == "compiled":
        compiled = torch.compile(ps_grad, fullgraph=True)
        compiled(params, ids, y)  # compile outside the measurement
        return lambda: compiled(params, ids, y)
    return lambda: [grad(loss_one)(params, ids[i], y[i]) for i in range(b)]


def worker(args) -> None:
    """One row in a fresh process, so that peak memory is this row's alone. Prints JSON."""
    if args.threads:
        torch.set_num_threads(args.threads)
    fn = row_fn(args.worker, args, args.batch[0])
    cuda = args.device == "cuda"
    fn()  # warm-up: one-off allocations (thread pools, caches) are not the row's
    gc.collect()
    if not cuda:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the resident set is a fair base
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        base = _kb("VmRSS") * 1024
    out = fn()  # the measured call, outputs held
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _kb("VmHWM") * 1024 - base
    del out
    clock = time.perf_counter if cuda else time.process_time
    times = []
    for _ in range(args.reps):
        t = clock()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(clock() - t)
    print(json.dumps({"sec": statistics.median(times), "mib": peak / 2**20}))


def check(args, b) -> float:
    """Largest difference between vmap(grad) per-sample gradients and the loop's."""
    params, ids, y, loss_one, _ = setup(args, b)
    batched = leaves(vmap(grad(loss_one), in_dims=(None, 0, 0))(params, ids, y))
    looped = [leaves(grad(loss_one)(params, ids[i], y[i])) for i in range(b)]
    return max((bt - torch.stack(ls)).abs().max().item() for bt, ls in zip(batched, zip(*looped)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true", help="add the torch.compile(vmap(grad)) row")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", choices=sorted(ROWS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.reps = 2
    if args.worker:
        return worker(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = ["batch", "vmap"] + (["compiled"] if args.compile else []) + ["fallback", "loop"]
    lines = []
    for b in args.batch:
        err = check(args, b)
        print(f"B={b}: max |vmap(grad) - loop| = {err:.2e}", flush=True)
        assert err < 1e-4
        res = {}
        for row in rows:
            cmd = [sys.executable, __file__, "--worker", row, "--batch", str(b), "--seq", str(args.seq),
                   "--reps", str(args.reps), "--threads", str(args.threads), "--device", args.device]
            res[row] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            print(f"B={b} {ROWS[row]}: {res[row]['sec'] * 1e3:.1f} ms, peak +{res[row]['mib']:.1f} MiB", flush=True)
        bt, bm, vt, vm = res["batch"]["sec"], res["batch"]["mib"], res["vmap"]["sec"], res["vmap"]["mib"]
        for row in rows:
            t, m = res[row]["sec"], res[row]["mib"]
            lines.append(f"| {b} | {ROWS[row]} | {t * 1e3:,.1f} | {t / bt:.2f}x | {t / vt:.2f}x "
                         f"| {m:,.1f} | {m / bm:.2f}x | {m / vm:.2f}x |")
    params, *_ = build(pr.key(0))
    write(args, params, lines, args.reps)


def write(args, params, lines, reps) -> None:
    dev = args.device
    if dev == "cuda":
        machine = f"{torch.cuda.get_device_name()}, wall time"
    else:
        machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, torch on {torch.get_num_threads()} thread(s), "
                   f"CPU time (process_time); load average {os.getloadavg()[0]:.1f} when finished")
    text = f"""# Per-sample gradients: vmap(grad) vs batch gradient vs loop

`per_sample_grads.py`: a 2-layer pre-norm transformer encoder text classifier (width {WIDTH}, {HEADS} heads,
feed-forward {FF}, vocabulary {VOCAB}, {num_params(params):,} parameters), sequences of {args.seq} tokens,
cross-entropy. Each row in a fresh process; time: median of {reps} runs after a warm-up; peak memory:
of one run after the warm-up, rise of the peak resident set (CPU) or of the peak allocated memory (CUDA) over
the start, outputs included. vmap(grad) per-sample gradients match the loop (max abs difference < 1e-4).
Machine: {machine}; python {platform.python_version()}, torch {torch.__version__}.

| B | method | time (ms) | / batch grad | / vmap(grad) | peak memory (MiB) | / batch grad | / vmap(grad) |
|---:|---|---:|---:|---:|---:|---:|---:|
""" + "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
