"""Tokenizer throughput: polymodal's CLIPTokenizer next to open_clip's SimpleTokenizer.

Reproduce (writes ``benchmarks/results/tokenizer.md``; about 15 s on 2 CPU cores)::

    .venv/bin/python benchmarks/tokenizer_throughput.py

Both tokenizers get the same 20,000 synthetic captions (templates over a few hundred words, with
capitals, numbers, punctuation, and some accents, emoji and HTML entities), called on the whole
list at once, producing ``(20000, 77)`` ids; the script checks that the ids are identical. Each
tokenizer is built fresh and timed on one pass (cold caches: every word is new to it), then on a
second pass over the same captions (warm caches, as in later epochs). One-off library set-up
(ftfy's tables, regex compilation) is done beforehand with a throwaway instance. Single-threaded:
``TOKENIZERS_PARALLELISM=false`` (open_clip sets it on import anyway).
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"

import open_clip  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402

from polymodal.data.tokenizer import CLIPTokenizer  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "tokenizer.md"

NOUNS = """dog cat man woman child girl boy horse bird car bus train truck bicycle motorcycle boat plane
table chair bench bed couch laptop phone book clock vase bottle cup bowl pizza sandwich cake banana apple
orange broccoli carrot street road beach field park kitchen bathroom bedroom office mountain river lake
tree flower umbrella kite surfboard skateboard skis frisbee ball giraffe elephant zebra sheep cow bear
teddy tie suitcase backpack handbag window door wall sign fence building bridge tower sky cloud snow
grass water wave sand rock hill road crowd player team game match court stadium market restaurant""".split()
ADJS = """red blue green yellow white black brown orange pink purple grey small large tiny huge old young
wooden metal plastic glass shiny dirty clean empty crowded busy quiet sunny rainy snowy dark bright
colorful striped spotted fluffy wet dry tall short long round square open closed""".split()
VERBS = """sitting standing walking running riding holding eating drinking playing looking lying flying
jumping parked floating hanging leaning waiting crossing carrying throwing catching watching""".split()
PREPS = "on in near next to under over behind beside with across along".split()
TEMPLATES = [
    "A {a} {n} {v} {p} a {a2} {n2}.",
    "Two {n}s {v} {p} the {n2}",
    "{N} {v} {p} {k} {a} {n2}s, {a2} {n3} in the background.",
    "a close-up photo of the {a} {n}",
    "There is a {n} {v} {p} a {n2} and a {n3}!",
    "An image of {k} {a} {n}s {v} near the {n2}; it's {a2}.",
    "{N}'s {n2} is {a} and {a2}...",
]
EXTRAS = ["café", "naïve", "Zürich", "São Paulo", "🐶", "😀", "❤️", "&amp;", "&quot;hi&quot;", "日本", "—", "(2019)"]


def captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = {k: rng.choice(NOUNS) for k in ("n", "n2", "n3")}
        words.update(a=rng.choice(ADJS), a2=rng.choice(ADJS), v=rng.choice(VERBS), p=rng.choice(PREPS))
        words.update(N=words["n"].capitalize(), k=str(rng.randint(2, 12)))
        text = rng.choice(TEMPLATES).format(**words)
        if rng.random() < 0.1:
            text += " " + rng.choice(EXTRAS)
        out.append(text)
    return out


def timed(fn) -> tuple[float, torch.Tensor]:
    t = time.perf_counter()
    ids = fn()
    return time.perf_counter() - t, ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000, help="number of captions")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    texts = captions(args.n)
    warm_up = ["Lazy set-up shared by both (ftfy tables, regex compilation): é &amp; 🐶 ok"]

    results = {}
    for name, make in (
        ("open_clip `SimpleTokenizer`", lambda: open_clip.tokenizer.SimpleTokenizer()),
        ("polymodal `CLIPTokenizer`", lambda: CLIPTokenizer()),
    ):
        make()(warm_up)  # a throwaway instance: the timed one starts with empty caches
        tok = make()
        cold, ids = timed(lambda: tok(texts))
        warm, ids_again = timed(lambda: tok(texts))
        assert torch.equal(ids, ids_again)
        results[name] = (args.n / cold, args.n / warm, ids)
        print(f"{name:30s} cold {args.n / cold:10,.0f} captions/s   warm {args.n / warm:10,.0f} captions/s")
    (base_cold, base_warm, base_ids), ours = results["open_clip `SimpleTokenizer`"], results["polymodal `CLIPTokenizer`"]
    same = torch.equal(base_ids, ours[2])
    assert same, "ids differ from open_clip"

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# Tokenizer throughput",
        "",
        f"`{Path(__file__).name}`: {args.n:,} synthetic captions tokenized to `({args.n}, 77)` ids in one call, "
        "one timed run per pass, single-threaded; ids identical between the two: "
        f"{'yes' if same else 'NO'}. Cold: a fresh tokenizer (every word new); warm: the same "
        "captions again.",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, python "
        f"{platform.python_version()}, open_clip {open_clip.__version__}, tokenizers {tokenizers.__version__}; "
        f"load average {load:.1f} when finished (shared machine, so expect noise).",
        "",
        "| tokenizer | captions/s, cold | ratio | captions/s, warm | ratio |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {name} | {c:,.0f} | {c / base_cold:.2f}x | {w:,.0f} | {w / base_warm:.2f}x |"
            for name, (c, w, _) in results.items()
        ),
        "",
    ]
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
