"""One decoding step's attention on CPU: SDPA against ``gpt_decode._gemv_attention`` (the scores as a
matrix-vector product over the cached keys, the values as a weighted sum of the cached values), over
views of a preallocated cache as generation reads them, twelve layers' caches cycled.

    OMP_NUM_THREADS=1 python benchmarks/decode_attention.py

Writes ``benchmarks/results/decode_attention.md`` (``--out -``: print only): the ratio SDPA time /
``_gemv_attention`` time (> 1: the matrix-vector form is faster) per batch, heads, head width and filled
length, and which one ``gpt_decode`` runs there. The dispatch rule (``GEMV_ATTENTION_*`` in
``core/encoders/gpt_decode.py``) is read from this table.
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

LAYERS = 12
LENGTHS = (64, 128, 256, 512, 1024)


def best_us(fn, reps: int = 20, rounds: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "decode_attention.md"))
    args = ap.parse_args()
    lines = ["# Decoding attention on CPU: SDPA / the matrix-vector form", "",
             "Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/decode_attention.py`", "",
             f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f}. Each cell: SDPA time / "
             f"`_gemv_attention` time for one query per head over `n` cached positions (views of a buffer of "
             f"n + 64), {LAYERS} layers' caches cycled; `*`: `gpt_decode` runs the matrix-vector form there.", "",
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
    if args.out != "-":
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
