"""``make demo``: train the tiny CLIP on the built-in synthetic captions, then show how to use it.

    .venv/bin/python -m polymodal.demo [--steps N] [--out DIR]

Trains ``polymodal train clip --preset tiny`` from scratch on procedurally rendered shapes
(nothing is downloaded), evaluates zero-shot accuracy on seen and held-out (shape, colour)
combinations, writes the loss/accuracy plot, renders an example image, and prints the
``polymodal zero-shot`` command to try on it.
"""

from __future__ import annotations

import argparse
import json
import math
import itertools
import os
import sys
import time

import torch

from polymodal.cli import main as cli


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--out", default=None, help="run directory, new or empty (default: the first free of "
                    "runs/demo, runs/demo-2, ...); an existing run is never overwritten or deleted")
    args = ap.parse_args(argv)
    if args.out is None:  # a fresh run in a new folder: earlier demos stay as they are
        args.out = next(d for d in (f"runs/demo-{i}" if i > 1 else "runs/demo" for i in itertools.count(1))
                        if not os.path.exists(d))
    print(f"polymodal demo: CLIP (tiny preset) from scratch on synthetic shapes, {args.steps} steps on "
          f"{torch.get_num_threads()} CPU threads\n", flush=True)
    t0 = time.perf_counter()
    rc = cli(["train", "clip", "--preset", "tiny", "--steps", str(args.steps), "--batch-size", "128",
              "--lr", "3e-3", "--warmup", "20", "--eval-every", str(max(math.ceil(args.steps / 4), 1)), "--save-every", "0",
              "--eval-size", "512", "--out", args.out])
    if rc:
        return rc
    minutes = (time.perf_counter() - t0) / 60
    last = [json.loads(line) for line in open(os.path.join(args.out, "metrics.jsonl")) if "eval/" in line][-1]

    from polymodal.data import synthetic

    example = os.path.join(args.out, "example.png")
    img = synthetic.render(torch.tensor([7, 11]), {"shape": ["triangle"], "color": ["blue"], "size": ["large"],
                                                   "position": ["center"]}, 64)[0]
    from PIL import Image

    Image.fromarray((img.permute(1, 2, 0) * 255).round().byte().numpy()).save(example)
    print(f"\ntrained in {minutes:.1f} min: zero-shot accuracy {last['eval/zero_shot_seen']:.1%} on seen "
          f"(shape, colour) combinations, {last['eval/zero_shot_heldout']:.1%} on held-out ones (chance 3.3%)")
    print(f"loss and accuracy curves: {os.path.join(args.out, 'curves.png')}")
    print("\ntry it on an image (a large blue triangle was rendered for you):")
    print(f"  .venv/bin/polymodal zero-shot --run {args.out} --image {example} "
          f"--labels \"blue triangle,red triangle,blue circle,green square\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
