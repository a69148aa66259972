"""How fast the synthetic image-caption data renders, next to what a tiny CLIP step consumes.

Reproduce (writes ``benchmarks/results/data_synthetic.md``)::

    .venv/bin/python benchmarks/data_synthetic.py           # ~5 minutes on 2 CPU cores
    .venv/bin/python benchmarks/data_synthetic.py --quick   # fewer repetitions

Rows:

* ``render``: ``polymodal.data.synthetic.render`` on a batch of random attributes.
* ``SyntheticCaptions + DataLoader``: the dataset through ``DataLoader(batch_size=B)``
  (batched ``__getitems__``), captions, labels and collation included.
* ``torchvision FakeData + DataLoader``: the peer baseline (random PIL images + ``to_tensor``).
* ``tiny ViT train step``: the consumer, forward + backward + Adam of a 2-layer, 64-wide
  torchvision ``VisionTransformer`` (patch S/8) on a batch: a lower bound on the cost of a
  tiny CLIP step (whose text tower and loss only add to it). Data is not the bottleneck
  when the data rows are faster than this one.

The first table is images per CPU-second of one thread (``time.process_time``, torch
set to one thread, no workers), which other processes on a shared machine barely disturb;
the second is wall-clock images per second with 2 ``DataLoader`` workers, which they do.
Each number is the best of ``reps`` timed runs after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.data import DataLoader

from polymodal.core import random as pr
from polymodal.data.synthetic import _ATTRS, _VOCAB, SyntheticCaptions, render

RESULTS = Path(__file__).parent / "results" / "data_synthetic.md"


def best_rate(fn, images: int, reps: int, clock=time.process_time) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = clock()
        fn()
        best = min(best, clock() - t)
    return images / best


def render_rate(size: int, batch: int, reps: int) -> float:
    g = torch.Generator().manual_seed(0)  # attribute choice for the benchmark only
    attrs = {a: torch.randint(0, len(_VOCAB[a]), (batch,), generator=g) for a in _ATTRS}
    return best_rate(lambda: render(pr.key(0), attrs, size), batch, reps)


def loader_rate(dataset, batch: int, workers: int, reps: int) -> float:
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, persistent_workers=workers > 0)

    def epoch():
        for _ in loader:
            pass

    return best_rate(epoch, len(dataset), reps, time.process_time if workers == 0 else time.perf_counter)


def vit_step_rate(size: int, batch: int, reps: int) -> float:
    torch.manual_seed(0)  # the benchmark model only; polymodal itself never seeds globally
    model = torchvision.models.VisionTransformer(
        image_size=size, patch_size=size // 8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=64
    )
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = torch.rand(batch, 3, size, size), torch.randint(0, 64, (batch,))

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return best_rate(step, batch, reps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    reps = 3 if args.quick else 10
    sizes = {32: 256, 64: 256, 128: 128, 224: 64}  # image side -> batch
    tables: list[list[tuple[str, list[str]]]] = [[], []]

    def row(table, name, fn):
        cells = [f"{fn(s, b):,.0f}" for s, b in sizes.items()]
        tables[table].append((name, cells))
        print(f"{name:45s}", *(f"{c:>9s}" for c in cells), flush=True)

    to_tensor = torchvision.transforms.functional.to_tensor
    torch.set_num_threads(1)
    print(f"{'images per CPU-second, one thread':45s}", *(f"{s:>6d} px" for s in sizes))
    row(0, "render", lambda s, b: render_rate(s, b, reps))
    row(0, "SyntheticCaptions + DataLoader", lambda s, b: loader_rate(SyntheticCaptions(size=4 * b, image_size=s), b, 0, reps))
    row(0, "torchvision FakeData + DataLoader", lambda s, b: loader_rate(torchvision.datasets.FakeData(4 * b, (3, s, s), transform=to_tensor), b, 0, reps))
    row(0, "tiny ViT train step (the consumer)", lambda s, b: vit_step_rate(s, b, reps))
    print(f"{'wall-clock images/s, 2 workers':45s}", *(f"{s:>6d} px" for s in sizes))
    row(1, "SyntheticCaptions + DataLoader, 2 workers", lambda s, b: loader_rate(SyntheticCaptions(size=4 * b, image_size=s), b, 2, reps))
    row(1, "torchvision FakeData + DataLoader, 2 workers", lambda s, b: loader_rate(torchvision.datasets.FakeData(4 * b, (3, s, s), transform=to_tensor), b, 2, reps))

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# Synthetic data: rendering speed",
        "",
        f"`{Path(__file__).name}`{' --quick' if args.quick else ''}: images per second (best of {reps}), batch "
        + ", ".join(f"{b} at {s} px" for s, b in sizes.items())
        + ".",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}; load average {load:.1f} when finished (shared machine).",
    ]
    for title, rows in zip(("images per CPU-second (one thread)", "wall-clock images/s (2 DataLoader workers)"), tables):
        lines += [
            "",
            f"| {title} | " + " | ".join(f"{s} px" for s in sizes) + " |",
            "|---|" + "---:|" * len(sizes),
            *(f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows),
        ]
    data, consumer = (dict(zip(sizes, (float(c.replace(",", "")) for c in cells))) for _, cells in (tables[0][1], tables[0][3]))
    lines += [
        "",
        "Per CPU-second, SyntheticCaptions delivers "
        + ", ".join(f"{data[s] / consumer[s]:.1f}x ({s} px)" for s in sizes)
        + " the images the tiny ViT step consumes"
        + (": data is not the bottleneck." if min(data[s] / consumer[s] for s in sizes) > 1 else "."),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
