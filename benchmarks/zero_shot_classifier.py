"""Building a zero-shot classifier (class names x OpenAI's 80 ImageNet prompt templates through the
text tower): polymodal's ``zero_shot_classifier`` next to open_clip's ``build_zero_shot_classifier``.

Reproduce (writes ``benchmarks/results/zero_shot_classifier.md``; about 2 minutes on 1 CPU thread)::

    .venv/bin/python benchmarks/zero_shot_classifier.py

Both get the same ViT-B/32 text weights (a randomly initialised open_clip model with QuickGELU,
converted with ``from_open_clip``), the same class names and templates, and 77-token rows from
their own tokenizers (identical ids). polymodal trims each batch of prompts after its longest one
before the text tower (``trim_text=True``, the default); the ``trim_text=False`` row feeds the
full 77 positions as open_clip does, so the two polymodal rows show what trimming buys and what
the rest of the tower does. The table checks that the classifiers agree. Time is the process's
CPU time on ``--threads`` torch threads, best of ``--repeats`` runs, no gradients.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "zero_shot_classifier.md"
CLASSES = ("golden retriever", "tabby cat", "goldfish", "great white shark", "tree frog", "bald eagle",
           "school bus", "espresso", "volcano", "grand piano", "red fox", "lighthouse")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, default=8, help=f"how many class names (at most {len(CLASSES)})")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import open_clip
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    from polymodal.data import CLIPTokenizer
    from polymodal.eval import OPENAI_IMAGENET_TEMPLATES, zero_shot_classifier
    from polymodal.models.clip import build, from_open_clip

    torch.manual_seed(0)
    reference = open_clip.model.CLIP(512, dict(image_size=224, layers=12, width=768, patch_size=32),
                                     dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12),
                                     quick_gelu=True).eval()
    spec = build("clip_vit_b32")
    params = from_open_clip(reference.state_dict(), spec)
    classes, templates = list(CLASSES[: args.classes]), list(OPENAI_IMAGENET_TEMPLATES)
    tok = CLIPTokenizer()
    rows = {
        "open_clip build_zero_shot_classifier": lambda: build_zero_shot_classifier(
            reference, open_clip.tokenize, classes, templates, num_classes_per_batch=4),
        "polymodal zero_shot_classifier, trim_text=False": lambda: zero_shot_classifier(
            spec, params, tok, classes, templates, classes_per_batch=4, trim_text=False),
        "polymodal zero_shot_classifier": lambda: zero_shot_classifier(
            spec, params, tok, classes, templates, classes_per_batch=4),
    }
    times, outs = {}, {}
    for name, run in rows.items():
        best = float("inf")
        for _ in range(args.repeats):
            t = time.process_time()
            with torch.no_grad():
                outs[name] = run()
            best = min(best, time.process_time() - t)
        times[name] = best
        print(f"  {name:50s} {best:7.2f} s", flush=True)
    base_name = next(iter(rows))
    base = times[base_name]
    prompts = tok([t.format(c) for c in classes for t in templates])
    longest = int(prompts.argmax(-1).max()) + 1
    lines = [
        "# Zero-shot classifier construction", "",
        "`benchmarks/zero_shot_classifier.py`: class names x OpenAI's 80 ImageNet templates through the ViT-B/32 "
        "text tower, 4 classes (320 prompts) per call, same weights; process CPU time, best of "
        f"{args.repeats} runs.",
        f"Command: `python benchmarks/zero_shot_classifier.py --classes {args.classes} --threads {args.threads} "
        f"--repeats {args.repeats}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads; "
        f"torch {torch.__version__}, open_clip {open_clip.__version__}; load average {os.getloadavg()[0]:.1f} "
        "when finished (shared machine).",
        f"Prompts: {len(classes)} classes x {len(templates)} templates = {len(prompts)}; the longest is "
        f"{longest} of 77 tokens.", "",
        "| implementation | seconds | prompts / s | vs open_clip | max abs difference from open_clip |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, secs in times.items():
        diff = (outs[name] - outs[base_name]).abs().max().item()
        lines.append(f"| {name} | {secs:.2f} | {len(prompts) / secs:,.0f} | {base / secs:.2f}x | {diff:.1e} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
