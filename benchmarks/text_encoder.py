"""BERT-base forward and forward+backward: polymodal (functional and shell, eager and compiled) against
``transformers``' ``BertModel`` (eager and compiled, its SDPA attention) from the same weights, in one
run; then tokenizer throughput against the Hugging Face fast tokenizer.

Reproduce (writes ``benchmarks/results/text_encoder.md``)::

    .venv/bin/python benchmarks/text_encoder.py                  # BERT-base, batch 8 x 128, 1 thread
    .venv/bin/python benchmarks/text_encoder.py --layers 2 --steps 2   # a quick look

The batch is 8 rows of 128 token ids with ragged padding (real lengths drawn in [32, 128], the
rest ``[PAD]`` and masked out); every row gets the same ids and ``attention_mask``. The polymodal
params are converted from the ``transformers`` model with ``from_huggingface``, and each row prints
the sum of its last hidden state so the rows are seen to compute the same thing. The loss of
forward+backward is ``(last_hidden_state * probe).mean()`` with a fixed random ``probe``; gradients go
to every parameter; a row's ``check`` is the forward's ``(hidden * probe).sum()`` or that loss.

Timing: on CPU, the CPU time of this process with torch on ``--threads`` threads (1 by default:
the machine is shared, so wall time mostly measures the neighbours), after ``--warmup`` untimed
calls (compilation happens there); best and median of ``--steps`` calls; ratios compare best
times (noise only ever adds time). On CUDA (``--device cuda``) wall time after synchronising.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "text_encoder.md"


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


def rows(args, device: torch.device) -> list[tuple[str, str, float, float, float]]:
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
    shell = pnn.BERTTextEncoder.from_params(spec, params).eval()
    ids, mask = batch(args.batch, args.seq, cfg.vocab_size, device)
    probe = torch.randn(args.batch, args.seq, cfg.hidden_size, generator=torch.Generator().manual_seed(1)).to(device)

    hf_fwd = lambda m: (lambda: m(input_ids=ids, attention_mask=mask).last_hidden_state)  # noqa: E731
    fn_fwd = lambda f: (lambda: f(params, ids, mask))  # noqa: E731
    shell_fwd = lambda m: (lambda: m(ids, mask).last_hidden_state)  # noqa: E731
    spec_hidden = lambda p, i, m: spec(p, i, m).last_hidden_state  # noqa: E731

    hf_compiled = torch.compile(ref)
    fn_compiled = torch.compile(spec_hidden, fullgraph=True)
    shell_compiled = torch.compile(shell)
    variants = [
        ("transformers BertModel (sdpa)", "eager", hf_fwd(ref), list(ref.parameters())),
        ("transformers BertModel (sdpa)", "compiled", hf_fwd(hf_compiled), list(ref.parameters())),
        ("polymodal functional", "eager", fn_fwd(spec_hidden), list(pytree.flatten(params).values())),
        ("polymodal functional", "compiled", fn_fwd(fn_compiled), list(pytree.flatten(params).values())),
        ("polymodal shell", "eager", shell_fwd(shell), list(shell.parameters())),
        ("polymodal shell", "compiled", shell_fwd(shell_compiled), list(shell.parameters())),
    ]
    out = []
    for name, mode, fwd, leaves in variants:
        def forward() -> float:
            with torch.no_grad():
                return float((fwd() * probe).double().sum())

        def train() -> float:
            for p in leaves:
                p.requires_grad_(True)
                p.grad = None
            loss = (fwd() * probe).mean()
            loss.backward()
            return float(loss)

        for what, fn in (("forward", forward), ("forward+backward", train)):
            best, med, check = timed(fn, args.warmup, args.steps, device)
            print(f"{name:32s} {mode:9s} {what:17s} best {best * 1e3:9.1f} ms  median {med * 1e3:9.1f} ms  "
                  f"check {check:.6g}", flush=True)
            out.append((f"{name} {mode}", what, best, med, check))
        for p in leaves:
            p.requires_grad_(False)
            p.grad = None
    return out


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


def report(args, res, tok, device: torch.device) -> str:
    lines = [f"# BERT text encoder: polymodal vs transformers (`benchmarks/text_encoder.py`)", "",
             f"BERT-base layout with {args.layers} layers, batch {args.batch} x {args.seq} tokens, ragged padding "
             f"(lengths in [32, {args.seq}]), fp32, device `{device}`"
             + (f", torch on {args.threads} thread(s), **CPU time of the process** (the machine is shared by several "
                "jobs; wall time would measure them)" if device.type == "cpu" else ", wall time") +
             f"; {args.warmup} warm-up and {args.steps} timed calls per row, best and median. "
             f"torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
             f"{platform.processor() or platform.machine()}. One run, all rows in one process from the same weights "
             "(`from_huggingface`); `check` is `(hidden * probe).sum()` for a fixed random probe (forward) or `(hidden * probe).mean()`, the loss (forward+backward).", "",
             "| implementation | pass | best (ms) | median (ms) | check | transformers eager / this | "
             "transformers same-mode / this |", "|---|---|---:|---:|---:|---:|---:|"]
    base = {(r[0], r[1]): r[2] for r in res}
    for name, what, best, med, check in res:
        mode = name.rsplit(" ", 1)[1]
        eager = base[("transformers BertModel (sdpa) eager", what)]
        same = base[(f"transformers BertModel (sdpa) {mode}", what)]
        lines.append(f"| {name} | {what} | {best * 1e3:.1f} | {med * 1e3:.1f} | {check:.6g} | {eager / best:.2f}x | "
                     f"{same / best:.2f}x |")
    lines += ["", "Ratios > 1 mean polymodal is faster than that transformers row.", "",
              "## Tokenizer throughput", "",
              f"{args.tokenize} sentences of 24 words (WordPiece, a 3,000-word vocabulary), padded and truncated to "
              "128, as tensors; CPU time, best of 3.", "", "| tokenizer | sentences / s |", "|---|---:|"]
    lines += [f"| {n} | {v:,.0f} |" for n, v in tok]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokenize", type=int, default=20_000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    res = rows(args, device)
    tok = tokenizer_rows(args.tokenize)
    Path(args.out).write_text(report(args, res, tok, device))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
