"""CPU inference kernels behind two of polymodal's dispatch choices, on one thread:

* ``gemm``: the GEMM shapes of a Swin / ViT block with MKL's ``addmm`` (``F.linear``), oneDNN's linear with a
  dense weight (what ``linear_kernel.linear`` runs for inference) and with the weight reordered once (what it
  runs inside ``frozen_weights``), weights not in cache (each timed round cycles through ~40 MB of weights);
* ``attention``: one decoding step's attention, SDPA against ``gpt_decode._gemv_attention`` (the scores as a
  matrix-vector product over the cached keys, the values as a weighted sum of the cached values), over views
  of a preallocated cache as generation reads them, twelve layers' caches cycled. ``gpt_decode``'s dispatch
  rule (``GEMV_ATTENTION_*``) is read from this table.

    OMP_NUM_THREADS=1 python benchmarks/cpu_kernels.py               # both, about 3 minutes
    OMP_NUM_THREADS=1 python benchmarks/cpu_kernels.py --only gemm   # one table

Writes ``benchmarks/results/cpu_kernels.md`` (``--out -``: print only).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from polymodal.core.encoders import gpt_decode  # noqa: E402

# (rows, in, out): Omnivore swin_t at 2 x 112 px, stages 1-4 (window-attention q/k/v, MLP), and ViT-B rows
GEMM_SHAPES = [(1568, 96, 288), (1568, 96, 384), (1568, 384, 96), (392, 192, 576), (392, 192, 768), (392, 768, 192),
               (98, 384, 1152), (98, 384, 1536), (98, 1536, 384), (98, 384, 384), (32, 768, 2304), (32, 768, 3072),
               (32, 3072, 768), (32, 768, 768), (50, 768, 3072)]
LAYERS = 12
LENGTHS = (64, 128, 256, 512, 1024)


def best_us(fn, calls: int = 1, rounds: int = 5) -> float:
    """Microseconds per call of the best of ``rounds`` runs of ``fn`` (which makes ``calls`` calls)."""
    fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best / calls * 1e6


def gemm_table(megabytes: float) -> list[str]:
    op = torch.ops.mkldnn._linear_pointwise
    lines = ["## GEMMs: MKL addmm, oneDNN with a dense weight, oneDNN with the weight reordered once", "",
             f"Microseconds per call, best of 5 rounds, each cycling through ~{megabytes:.0f} MB of weights (none in "
             "cache).", "",
             "| rows x in x out | addmm us | oneDNN dense us | oneDNN reordered once us | dense / reordered |",
             "|---|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    for m, k, n in GEMM_SHAPES:
        count = max(2, int(megabytes * 1e6 // (n * k * 4)))
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
    return lines


def attention_table() -> list[str]:
    lines = ["## Decoding attention: SDPA / the matrix-vector form", "",
             f"Each cell: SDPA time / `_gemv_attention` time for one query per head over `n` cached positions (views "
             f"of a buffer of n + 64), {LAYERS} layers' caches cycled; `*`: `gpt_decode` runs the matrix-vector form "
             "there.", "",
             "| batch | heads | head dim | " + " | ".join(f"n = {n}" for n in LENGTHS) + " |",
             "|---:|---:|---:|" + "---:|" * len(LENGTHS)]
    print("\n".join(lines), flush=True)
    lo, hi = gpt_decode.GEMV_ATTENTION_ELEMENTS
    with torch.no_grad():
        for b, h in ((4, 8), (1, 12), (8, 8)):
            for dh in (32, 64, 96, 128):
                cells = []
                for n in LENGTHS:
                    bufs = [torch.randn(2, b, h, n + 64, dh) for _ in range(LAYERS)]
                    q = torch.randn(b, h, 1, dh)
                    ours = best_us(lambda: [gpt_decode._gemv_attention(q, c[0][:, :, :n], c[1][:, :, :n]) for c in bufs])
                    sdpa = best_us(lambda: [F.scaled_dot_product_attention(q, c[0][:, :, :n], c[1][:, :, :n])
                                            for c in bufs])
                    chosen = dh >= gpt_decode.GEMV_ATTENTION_MIN_HEAD_DIM and lo <= b * h * n * dh <= hi
                    cells.append(f"{sdpa / ours:.2f}{'*' if chosen else ''}")
                lines.append(f"| {b} | {h} | {dh} | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["gemm", "attention"], help="one table (default: both)")
    ap.add_argument("--megabytes", type=float, default=40.0, help="GEMM weights cycled through per timed round")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu_kernels.md"))
    args = ap.parse_args()
    lines = ["# CPU inference kernels", "",
             f"Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/cpu_kernels.py"
             f"{' --only ' + args.only if args.only else ''}`", "",
             f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f}.", ""]
    print("\n".join(lines), flush=True)
    if args.only in (None, "gemm"):
        lines += gemm_table(args.megabytes) + [""]
    if args.only in (None, "attention"):
        lines += attention_table()
    if args.out != "-":
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
