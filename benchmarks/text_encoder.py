"""BERT-base forward and forward+backward: polymodal (functional and shell, eager and compiled) against
``transformers``' ``BertModel`` (eager and compiled, its SDPA attention) from the same weights, in one
run, interleaved; then tokenizer throughput against the Hugging Face fast tokenizer.

Reproduce (writes ``benchmarks/results/text_encoder.md``)::

    .venv/bin/python benchmarks/text_encoder.py       # BERT-base, 8 x 128, 1 thread and torch's default
    .venv/bin/python benchmarks/text_encoder.py --layers 2 --rounds 2 --threads 1   # a quick look

The batch is 8 rows of 128 token ids with ragged padding (real lengths drawn in [32, 128], the
rest ``[PAD]`` and masked out; 77 % of the positions are real). The polymodal params are converted
from the ``transformers`` model with ``from_huggingface``. polymodal runs twice:

* ``unpad``: ``bert_text_encoder(..., unpad=True)``: the projections, feed-forward, residuals and
  LayerNorms run on the real tokens only (``core/encoders/bert_unpad.py``); attention is SDPA on the
  padded ``(B, H, T, Dh)`` with the key-padding mask, as in the padded path. Real positions equal
  ``transformers``' (1e-5); padded positions are zeros where ``transformers`` computes the pad
  queries' attention over the real tokens (values nobody reads: masked out of attention, pooling
  and losses).
* ``padded``: the default encoder, every position computed, equal to ``transformers`` everywhere.

The loss of forward+backward is ``(last_hidden_state * probe).mean()`` with a fixed random ``probe``
that is zero at padded positions (so both forms of the output give the same loss and gradients);
gradients go to every parameter; a row's ``check`` is the forward's ``(hidden * probe).sum()`` or
that loss.

Timing: on CPU, the CPU time of this process (the machine is shared, so wall time mostly measures
the neighbours), with torch on each of ``--threads``; after ``--warmup`` untimed calls
(compilation happens there), ``--rounds`` rounds, each round timing every variant once in turn
(interleaved, so load drift hits all rows alike). Reported: best, median and the spread
(max / min - 1) of a row; ratios of best times, and the median and minimum over rounds of the
per-round ratio (the same round's transformers time over this row's). On CUDA (``--device cuda``)
wall time after synchronising.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "text_encoder.md"
HF = "transformers BertModel (sdpa)"


def _clock(device: torch.device) -> Callable[[], float]:
    if device.type == "cuda":
        def wall() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()
        return wall
    return time.process_time


def timed(fn: Callable[[], float], warmup: int, steps: int, device: torch.device) -> tuple[float, float, float]:
    """``(best, median, checksum)`` seconds of ``fn()`` after ``warmup`` calls."""
    clock = _clock(device)
    check = 0.0
    for _ in range(warmup):
        check = fn()
    times = []
    for _ in range(steps):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return min(times), statistics.median(times), check


def batch(b: int, t: int, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(32, t + 1, (b,), generator=g)
    lengths[0] = t
    mask = (torch.arange(t) < lengths[:, None]).long()
    ids = torch.randint(1000, vocab, (b, t), generator=g)
    ids[:, 0] = 101
    ids = ids.masked_fill(mask == 0, 0)
    return ids.to(device), mask.to(device)


def _dynamic(fn: Callable) -> Callable:
    """``fn`` with dynamo capturing data-dependent shapes (the unpadded path's ``nonzero``)."""
    def call(*a, **k):
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            return fn(*a, **k)
    return call


def variants(args, device: torch.device):
    """``[(name, mode, forward fn, parameter leaves)]`` and the probe, all from one set of weights."""
    import transformers as tf

    from polymodal import nn as pnn
    from polymodal.core import pytree
    from polymodal.models.bert.convert import from_huggingface

    cfg = tf.BertConfig(num_hidden_layers=args.layers, attn_implementation="sdpa", hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    ref = tf.BertModel(cfg).to(device).eval()
    spec, params = from_huggingface({k: v.detach().clone() for k, v in ref.state_dict().items()}, cfg.to_dict())
    params = pytree.tree_map(lambda x: x.to(device), params)
    ids, mask = batch(args.batch, args.seq, cfg.vocab_size, device)
    probe = torch.randn(args.batch, args.seq, cfg.hidden_size, generator=torch.Generator().manual_seed(1)).to(device)
    probe = probe * mask[..., None]
    out = [(HF, "eager", lambda: ref(input_ids=ids, attention_mask=mask).last_hidden_state, list(ref.parameters()))]
    hf_c = torch.compile(ref)
    out.append((HF, "compiled", lambda: hf_c(input_ids=ids, attention_mask=mask).last_hidden_state,
                list(ref.parameters())))
    leaves = list(pytree.flatten(params).values())
    for form in args.forms:
        s = dataclasses.replace(spec, unpad=form == "unpad")
        hidden = (lambda s: lambda p, i, m: s(p, i, m).last_hidden_state)(s)
        fn_c = _dynamic(torch.compile(hidden, fullgraph=True))
        shell = pnn.BERTTextEncoder.from_params(s, params).eval()
        shell_c = _dynamic(torch.compile(shell))
        out += [(f"polymodal {form} functional", "eager", (lambda h: lambda: h(params, ids, mask))(hidden), leaves),
                (f"polymodal {form} functional", "compiled", (lambda h: lambda: h(params, ids, mask))(fn_c), leaves),
                (f"polymodal {form} shell", "eager", (lambda m: lambda: m(ids, mask).last_hidden_state)(shell),
                 list(shell.parameters())),
                (f"polymodal {form} shell", "compiled", (lambda m: lambda: m(ids, mask).last_hidden_state)(shell_c),
                 list(shell.parameters()))]
    return out, probe


def interleaved(args, device: torch.device) -> list[dict]:
    """Per variant and pass: the times of every round (rounds interleave the variants)."""
    vs, probe = variants(args, device)
    clock = _clock(device)

    def forward(fwd) -> float:
        with torch.no_grad():
            return float((fwd() * probe).double().sum())

    def train(fwd, leaves) -> float:
        for p in leaves:
            p.requires_grad_(True)
            p.grad = None
        loss = (fwd() * probe).mean()
        loss.backward()
        for p in leaves:
            p.requires_grad_(False)
            p.grad = None
        return float(loss)

    res = []
    for what in ("forward", "forward+backward"):
        calls = [(name, mode, (lambda f: lambda: forward(f))(fwd) if what == "forward" else
                  (lambda f, lv: lambda: train(f, lv))(fwd, leaves)) for name, mode, fwd, leaves in vs]
        rows = [{"name": f"{n} {m}", "mode": m, "pass": what, "times": [], "check": c()} for n, m, c in calls]
        print(f"{what} checks: " + "  ".join(f"{r['check']:.6g}" for r in rows), flush=True)
        for _ in range(args.warmup - 1):
            for _, _, c in calls:
                c()
        for r in range(args.rounds):
            for row, (_, _, c) in zip(rows, calls):
                t0 = clock()
                c()
                row["times"].append(clock() - t0)
            print(f"{what} round {r + 1}/{args.rounds}: " + "  ".join(f"{t['times'][-1] * 1e3:.0f}" for t in rows),
                  flush=True)
        res += rows
    return res


def tokenizer_rows(n: int) -> list[tuple[str, float]]:
    """Sentences per second of polymodal's BertTokenizer and HF's BertTokenizerFast (same vocabulary)."""
    import transformers as tf

    from polymodal.data.bert_tokenizer import BertTokenizer

    g = torch.Generator().manual_seed(0)
    words = [f"w{i}" for i in range(3000)] + ["the", "a", "of", "and", "to", "in"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + [f"##{c}" for c in "0123456789"]
    vocab_d = {w: i for i, w in enumerate(vocab)}
    idx = torch.randint(0, len(words), (n, 24), generator=g).tolist()
    texts = [" ".join(words[j] for j in row) + "." for row in idx]
    ours, ref = BertTokenizer(vocab_d, max_length=128), tf.BertTokenizerFast(vocab=vocab_d)
    assert ours(texts[:64])["input_ids"].tolist() == ref(texts[:64], padding=True, truncation=True,
                                                          max_length=128)["input_ids"]
    res = []
    for name, fn in (("polymodal BertTokenizer", lambda: ours(texts)),
                     ("transformers BertTokenizerFast", lambda: ref(texts, padding=True, truncation=True,
                                                                   max_length=128, return_tensors="pt"))):
        fn()
        best = min(timed(fn, 0, 3, torch.device("cpu"))[:2])
        res.append((name, n / best))
        print(f"{name:32s} {n / best:12.0f} sentences/s (CPU time)", flush=True)
    return res


def table(res: list[dict]) -> list[str]:
    lines = ["| implementation | pass | best (ms) | median (ms) | spread | check | transformers eager / this, "
             "best | same-mode / this, best | same-mode / this per round, median (min) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(r["name"], r["pass"]): r for r in res}
    for r in res:
        t = r["times"]
        eager, same = by[(f"{HF} eager", r["pass"])], by[(f"{HF} {r['mode']}", r["pass"])]
        per_round = [a / b for a, b in zip(same["times"], t)]
        lines.append(f"| {r['name']} | {r['pass']} | {min(t) * 1e3:.1f} | {statistics.median(t) * 1e3:.1f} | "
                     f"{max(t) / min(t) - 1:.0%} | {r['check']:.6g} | {min(eager['times']) / min(t):.2f}x | "
                     f"{min(same['times']) / min(t):.2f}x | {statistics.median(per_round):.2f}x "
                     f"({min(per_round):.2f}x) |")
    return lines


def load() -> str:
    try:
        return "load average " + " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "load average unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timed rounds per pass")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls per variant (the first compiles)")
    ap.add_argument("--threads", default="1,default", help="comma list of torch thread counts ('default': torch's)")
    ap.add_argument("--forms", default="unpad,padded", help="polymodal forms: unpad, padded")
    ap.add_argument("--tokenize", type=int, default=20_000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    args.forms = args.forms.split(",")
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    default_threads = torch.get_num_threads()
    lines = ["# BERT text encoder: polymodal vs transformers (`benchmarks/text_encoder.py`)", "",
             f"BERT-base layout with {args.layers} layers, batch {args.batch} x {args.seq} tokens, ragged padding "
             f"(lengths in [32, {args.seq}]), fp32, device `{device}`, "
             + ("**CPU time of the process**" if device.type == "cpu" else "wall time") +
             f"; {args.warmup} warm-up calls, then {args.rounds} interleaved rounds per pass. "
             f"torch {torch.__version__}, "
             f"transformers {__import__('transformers').__version__}, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs. All rows in one process from the same weights (`from_huggingface`); "
             "`check` is `(hidden * probe).sum()` (forward) or the loss `(hidden * probe).mean()` (forward+backward) "
             "for a fixed random probe that is zero at padding. `unpad`: the blocks skip padded positions "
             "(zeros there); `padded`: every position, equal to transformers everywhere. Spread: max / min - 1 "
             "over the rounds. Ratios > 1 mean polymodal is faster.", ""]
    for th in args.threads.split(","):
        n = default_threads if th == "default" else int(th)
        torch.set_num_threads(n)
        before = load()
        t0 = time.time()
        res = interleaved(args, device)
        lines += [f"## torch on {n} thread(s){' (the default)' if th == 'default' else ''}", "",
                  f"Machine load before: {before}; after: {load()} ({time.time() - t0:.0f} s wall).", ""]
        lines += table(res) + [""]
        Path(args.out).write_text("\n".join(lines) + "\n")  # each section as soon as it is measured
    torch.set_num_threads(default_threads)
    if args.tokenize:
        tok = tokenizer_rows(args.tokenize)
        lines += ["## Tokenizer throughput", "",
                  f"{args.tokenize} sentences of 24 words (WordPiece, a 3,000-word vocabulary), padded and truncated "
                  "to 128, as tensors; CPU time, best of 3.", "", "| tokenizer | sentences / s |", "|---|---:|"]
        lines += [f"| {name} | {v:,.0f} |" for name, v in tok]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
