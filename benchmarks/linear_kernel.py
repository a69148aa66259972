"""CPU GEMM shapes of a Swin / ViT block: MKL's ``addmm`` (``F.linear``), oneDNN's linear with a dense
weight (what ``linear_kernel.linear`` runs for inference) and with the weight reordered once (what it runs
inside ``frozen_weights``), weights not in cache (each timed call cycles through ~40 MB of weights).

    OMP_NUM_THREADS=1 python benchmarks/linear_kernel.py

Prints microseconds per call (best of rounds) and the ratios, and writes them to
``benchmarks/results/linear_kernel.md`` (``--out``; ``--out -`` writes nothing).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

# (rows, in, out): Omnivore swin_t at 2 x 112 px, stages 1-4 (window-attention q/k/v, MLP), and ViT-B rows
SHAPES = [(1568, 96, 288), (1568, 96, 384), (1568, 384, 96), (392, 192, 576), (392, 192, 768), (392, 768, 192),
          (98, 384, 1152), (98, 384, 1536), (98, 1536, 384), (98, 384, 384), (32, 768, 2304), (32, 768, 3072),
          (32, 3072, 768), (32, 768, 768), (50, 768, 3072)]


def best_us(fn, calls: int, rounds: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--megabytes", type=float, default=40.0, help="weights cycled through per timed round")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "linear_kernel.md"))
    args = ap.parse_args()
    op = torch.ops.mkldnn._linear_pointwise
    lines = ["# CPU GEMMs: MKL addmm, oneDNN with a dense weight, oneDNN with the weight reordered once", "",
             "Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/linear_kernel.py`", "",
             f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f}. Microseconds per call, best "
             f"of 5 rounds, each round cycling through ~{args.megabytes:.0f} MB of weights (none in cache).", "",
             "| rows x in x out | addmm us | oneDNN dense us | oneDNN reordered once us | dense / reordered |",
             "|---|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for m, k, n in SHAPES:
        count = max(2, int(args.megabytes * 1e6 // (n * k * 4)))
        ws = [torch.randn(n, k) for _ in range(count)]
        xs = [torch.randn(m, k) for _ in range(count)]
        b = torch.randn(n)
        packed = [torch.ops.mkldnn._reorder_linear_weight(w, m) for w in ws]
        with torch.no_grad():
            a = best_us(lambda: [torch.addmm(b, x, w.t()) for x, w in zip(xs, ws)], count)
            d = best_us(lambda: [op(x, w, b, "none", [], "") for x, w in zip(xs, ws)], count)
            p = best_us(lambda: [op(x, w, b, "none", [], "") for x, w in zip(xs, packed)], count)
        lines.append(f"| {m} x {k} x {n} | {a:.0f} | {d:.0f} | {p:.0f} | {d / p:.2f}x |")
        print(lines[-1], flush=True)
    if args.out != "-":
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
