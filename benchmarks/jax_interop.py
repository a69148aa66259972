"""JAX interop costs: the bridge's per-call overhead over the torch function alone, and the native
translation's jitted speed next to torch eager and ``torch.compile``, for CLIP tiny and ViT-B/32 on CPU.

Reproduce (writes ``benchmarks/results/jax_interop.md``; about 10 minutes on 2 CPU cores, most of it
compiling ViT-B/32 with XLA and inductor)::

    .venv/bin/python benchmarks/jax_interop.py

Rows per model (the whole CLIP: both towers on a batch of images and captions):

* forward: torch eager (``torch.no_grad``); the bridge eagerly (DLPack both ways) and under
  ``jax.jit`` (``jax.pure_callback``); the translation (``export_to_jax``) under ``jax.jit``;
  ``torch.compile`` (inductor).
* gradient of the CLIP loss (``--grad-models``): ``torch.func.grad`` eager and compiled;
  ``jax.jit(jax.grad)`` through the bridge (custom_vjp; the backward recomputes the forward in
  torch) and through the translation.

Time is wall-clock per call, the median of ``--repeats`` calls after ``--warmup`` calls (compile
time excluded and reported separately), the rows of a model timed in turns (round robin). torch and XLA both run on ``--threads`` threads (default 1:
on a shared, loaded machine more threads spin-wait on each other and the times swing tenfold).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results" / "jax_interop.md"


def _timeit_round_robin(fns: list, warmup: int, repeats: int) -> list[tuple[float, float]]:
    """(first-call seconds, median seconds) per function; after the first calls and ``warmup`` more,
    the functions are timed in turns, one call each per round, so that the load of a shared machine
    drifting over time weighs on every row alike. Each ``fn`` blocks until its result is ready."""
    first = []
    for fn in fns:
        t = time.perf_counter()
        fn()
        first.append(time.perf_counter() - t)
        for _ in range(warmup - 1):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t)
    return [(f, statistics.median(ts)) for f, ts in zip(first, times)]


def _bench_model(name: str, batch: int, grad: bool, warmup: int, repeats: int) -> list[tuple]:
    import jax
    import jax.numpy as jnp
    import optax

    from polymodal.core import pytree
    from polymodal.core import random as pr
    from polymodal.interop.jax import export_to_jax, to_jax_function
    from polymodal.models.clip import build

    clip = build(name)
    params = clip.init(key=pr.key(0))
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, clip.image_size, clip.image_size, generator=g)
    tokens = torch.randint(1, 1000, (batch, clip.context_length), generator=g)
    fwd = lambda p, i, t: clip(p, i, t)  # noqa: E731
    jp, ji, jt = pytree.to_jax(params), jnp.asarray(images.numpy()), jnp.asarray(tokens.numpy().astype(np.int32))

    def loss_t(p):
        o = clip(p, images, tokens)
        logits = o.logit_scale.exp() * o.image_embeddings @ o.text_embeddings.T
        labels = torch.arange(batch)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    def loss_j(f):
        def loss(p):
            o = f(p, ji, jt)
            logits = jnp.exp(o.logit_scale) * o.image_embeddings @ o.text_embeddings.T
            ce = optax.softmax_cross_entropy_with_integer_labels
            return (ce(logits, jnp.arange(batch)).mean() + ce(logits.T, jnp.arange(batch)).mean()) / 2
        return loss

    bridge = to_jax_function(fwd)
    t = time.perf_counter()
    native = export_to_jax(fwd, (params, images, tokens))
    export_s = time.perf_counter() - t
    block = jax.block_until_ready

    def no_grad(f):
        def run():
            with torch.no_grad():
                return f()
        return run

    compiled = torch.compile(fwd)
    rows = [
        ("forward", "torch eager", no_grad(lambda: fwd(params, images, tokens))),
        ("forward", "bridge, eager (DLPack)", lambda: block(bridge(jp, ji, jt))),
        ("forward", "bridge, jax.jit (pure_callback)", lambda f=jax.jit(bridge): block(f(jp, ji, jt))),
        ("forward", "translation, jax.jit", lambda f=jax.jit(native): block(f(jp, ji, jt))),
        ("forward", "torch.compile", no_grad(lambda: compiled(params, images, tokens))),
    ]
    if grad:
        grad_t = torch.func.grad(loss_t)
        grad_c = torch.compile(grad_t)
        rows += [
            ("gradient", "torch.func.grad eager", lambda: grad_t(params)),
            ("gradient", "bridge, jax.jit(jax.grad)", lambda f=jax.jit(jax.grad(loss_j(bridge))): block(f(jp))),
            ("gradient", "translation, jax.jit(jax.grad)", lambda f=jax.jit(jax.grad(loss_j(native))): block(f(jp))),
            ("gradient", "torch.compile(torch.func.grad)", lambda: grad_c(params)),
        ]
    out = []
    for (kind, label, _), (first, median) in zip(rows, _timeit_round_robin([r[2] for r in rows], warmup, repeats)):
        print(f"  {name:14s} {kind:8s} {label:34s} first {first:7.2f} s  median {median * 1e3:9.2f} ms", flush=True)
        out.append((name, batch, kind, label, first, median))
    print(f"  {name}: torch.export + translation setup {export_s:.1f} s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="clip_tiny:8,clip_vit_b32:2", help="builder:batch, comma separated")
    ap.add_argument("--grad-models", default="clip_tiny,clip_vit_b32", help="models that also get gradient rows")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch and XLA CPU threads")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.threads == 1:  # before JAX starts its backend
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    import jax

    rows = []
    for spec in args.models.split(","):
        name, batch = spec.split(":")
        rows += _bench_model(name, int(batch), name in args.grad_models.split(","), args.warmup, args.repeats)

    lines = [
        "# JAX interop: bridge overhead and translated speed", "",
        "`benchmarks/jax_interop.py`: the whole CLIP (both towers) on a batch of images and 77- or 32-token "
        "captions. Wall-clock per call, median of "
        f"{args.repeats} calls after {args.warmup} warm-up calls, a model's rows timed in turns (round robin); "
        "'first call' includes tracing and compiling.",
        f"Command: `python benchmarks/jax_interop.py --models {args.models} --grad-models {args.grad_models} "
        f"--warmup {args.warmup} --repeats {args.repeats} --threads {args.threads}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch thread(s), "
        f"XLA on {'1 thread' if args.threads == 1 else 'its default threads'}; torch {torch.__version__}, jax {jax.__version__}; load average "
        f"{os.getloadavg()[0]:.1f} when finished. The machine is shared with other jobs and was loaded while "
        "this ran: absolute times are noisy; ratios within a model are the useful part.", "",
        "| model | batch | what | implementation | first call (s) | per call (ms) | vs torch eager | overhead vs torch eager (ms) |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for name, batch, kind, label, first, median in rows:
        base = next(m for n, _, k, lab, _, m in rows if n == name and k == kind and "eager" in lab and "torch" in lab)
        lines.append(f"| {name} | {batch} | {kind} | {label} | {first:.2f} | {median * 1e3:.1f} | "
                     f"{base / median:.2f}x | {(median - base) * 1e3:+.1f} |")
    lines += ["", "'vs torch eager' > 1 is faster than torch eager. The bridge runs the torch function itself, so "
              "its overhead column is the cost of crossing (DLPack or the host callback, the custom_vjp, and for "
              "gradients the recomputed forward). The translation runs XLA-compiled JAX code with no torch at "
              "call time. torch.compile's first call reads inductor's on-disk cache when an earlier run "
              "filled it."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
