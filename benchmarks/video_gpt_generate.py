"""Text-to-video GPT generation, tokens per second: polymodal's ``generate`` with and without the KV
cache against TorchMultimodal's ``GenerationUtil.sample`` (its KV cache, ``causal=True``) from the same
weights, in one run, interleaved.

polymodal's cached rows decode on a preallocated KV cache written in place, with the logits of the
newest position over the video vocabulary only (``core/encoders/gpt_decode.py``): ``eager`` runs the
step as PyTorch ops, ``torch.compile`` runs it as one compiled graph (``generate(..., compile=True)``;
the compile time of the first call is reported separately and not in the row). The ``frozen_weights`` row
runs the eager ``generate`` inside one :class:`~polymodal.core.layers.linear_kernel.frozen_weights` scope kept
across calls: the weights are packed for oneDNN at the first call and reused after (``generate`` otherwise
packs them at every call).

Reproduce (writes ``benchmarks/results/video_gpt_generate.md``)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/video_gpt_generate.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/video_gpt_generate.py --configs tiny --rounds 2   # a quick look

Configurations: ``tiny`` (``mugen_gpt_tiny``: d_model 96, 4 layers, 8 text tokens -> 4x8x8 = 256
video codes) and ``mugen_L8`` (``mugen_gpt(video_latent_shape=(2, 8, 8))``: MUGEN's published GPT for
8-frame clips, d_model 768, 12 layers, 128 text tokens -> 128 video codes); batch 4, sampling from
the full distribution (no top-k / top-p). ``--prompts``: the batch holds 4 distinct captions (``distinct``),
or one caption 4 times (``one``: 4 samples of it, as ``polymodal generate --num-samples 4`` and DALL-E
style reranking draw them; polymodal prefills a repeated prompt once, TorchMultimodal runs every row).
The no-cache and compiled rows are measured on distinct prompts only, the no-cache row on ``tiny`` only.
TorchMultimodal's model is composed as
``examples/mugen/generation/text_video_gpt.py`` builds it, with a code table in place of the VQ-VAE
(generation reads only the codebook; decoding the videos is not timed for either library).
TorchMultimodal's ``sample(use_cache=False)`` feeds only the newest token without the earlier ones
(no cache, no context: not a generation), so it has no row; its cache lives in the attention
modules (``MultiHeadAttention.cache``) and is never cleared, so a second ``sample`` call fails on a
shape mismatch: the benchmark clears it before every call (inside the timing); polymodal's no-cache row recomputes the
full sequence at every step.

Timing: CPU time of this process (``time.process_time``; the machine is shared) on ``--threads``
threads, one untimed call first, then ``--rounds`` rounds interleaving the variants. tokens/s =
batch x new tokens / best time.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

RESULTS = Path(__file__).parent / "results" / "video_gpt_generate.md"


class CodeTable(nn.Module):
    """A tokenizer with a codebook and nothing else (TorchMultimodal's GPT calls encode / lookup / decode)."""

    def __init__(self, n: int, d: int, table: bool) -> None:
        super().__init__()
        self.table = table
        if table:  # MUGEN's text tokenizer: an nn.Embedding named "embedding"
            self.embedding = nn.Embedding(n, d)
        else:  # the VQ-VAE: a codebook buffer
            self.codebook = nn.Module()
            self.codebook.register_buffer("embedding", torch.randn(n, d))

    def encode(self, x, **kwargs):
        return x

    def lookup(self, ids):
        return self.embedding(ids) if self.table else nn.functional.embedding(ids, self.codebook.embedding)

    def decode(self, ids, **kwargs):
        return ids


def build(config: str):
    from torchmultimodal.models.video_gpt.gpt import MultimodalGPT, MultimodalTransformerDecoder, RightShift, \
        TransformerDecoder, TransformerDecoderLayer
    from torchmultimodal.modules.layers.attention import SelfAttention
    from torchmultimodal.modules.layers.position_embedding import BroadcastedPositionEmbedding

    from polymodal.models.mugen import mugen_gpt, mugen_gpt_tiny
    from polymodal.models.mugen.convert import from_torchmultimodal

    spec = mugen_gpt_tiny() if config == "tiny" else mugen_gpt(video_latent_shape=(2, 8, 8))
    d, n_in, n_out = spec.d_model, spec.num_in_tokens, spec.num_out_tokens
    heads, layers = spec.decoder.layer.num_heads, spec.decoder.num_layers
    torch.manual_seed(0)
    layer = TransformerDecoderLayer(d, heads, 0.2, attn_module=SelfAttention(attn_dropout=0.3))
    mm = MultimodalTransformerDecoder(nn.Embedding(spec.in_len, d), BroadcastedPositionEmbedding(spec.out_shape, d),
                                      TransformerDecoder(layer, layers), RightShift(d))
    emb = spec.out_embed.embedding_dim
    ref = MultimodalGPT(d, n_in, n_out, spec.out_shape, CodeTable(n_in, d, True), CodeTable(n_out, emb, False), mm,
                        nn.Identity(), nn.Linear(emb, d, bias=False)).eval()
    with torch.no_grad():
        ref.to_logit.weight.normal_(std=0.02)  # zero-initialised: every sample would be uniform noise
    params = from_torchmultimodal(ref.state_dict(), spec)
    text = torch.randint(0, n_in, (4, spec.in_len))
    return spec, params, ref, text


def run(config: str, rounds: int, compiled: bool, prompts: str) -> tuple[list[str], list[str]]:
    from torchmultimodal.utils.generate import GenerationUtil

    from polymodal.core import random as pr
    from polymodal.core.encoders.gpt_generate import generate
    from polymodal.core.layers.linear_kernel import frozen_weights

    spec, params, ref, text = build(config)
    if prompts == "one":  # 4 samples of one caption (polymodal generate --num-samples 4; reranking)
        text = text[:1].repeat_interleave(text.shape[0], 0)
    util = GenerationUtil(ref)
    n = spec.out_len
    step = {"i": 0}

    def ours(cache, compile=False, scope=None):
        def f():
            step["i"] += 1
            if scope is None:
                return generate(spec, params, text, key=pr.key(step["i"]), use_cache=cache, compile=compile)
            with scope:  # the packed weights of the first call serve the later ones
                return generate(spec, params, text, key=pr.key(step["i"]), use_cache=cache, compile=compile)
        return f

    def theirs():
        for m in ref.modules():  # its KV cache lives in the attention modules and outlives a call: clear it
            if hasattr(m, "cache"):
                m.cache = None
        return util.sample(text, n, use_cache=True, causal=True)

    fns = {"TorchMultimodal GenerationUtil (KV cache)": theirs,
           "polymodal generate (static KV cache, eager)": ours(True)}
    fns["polymodal generate inside frozen_weights (packs reused across calls)"] = ours(True, scope=frozen_weights())
    if compiled and prompts == "distinct":
        fns["polymodal generate (static KV cache, torch.compile)"] = ours(True, True)
    if config == "tiny" and prompts == "distinct":  # at MUGEN's size the full pass per step takes CPU minutes a call
        fns["polymodal generate (no cache)"] = ours(False)
    first = {}
    for k, fn in fns.items():
        t = time.process_time()
        fn()
        first[k] = time.process_time() - t
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.process_time()
            fn()
            times[k].append(time.process_time() - t)
    base = min(times["TorchMultimodal GenerationUtil (KV cache)"])
    rows = []
    for k, v in times.items():
        tps = text.shape[0] * n / min(v)
        rows.append(f"| {config} | {prompts} | {k} | {n} | {min(v):.2f} | {statistics.median(v):.2f} | "
                    f"{tps:.0f} | {base / min(v):.2f}x |")
        print(rows[-1], flush=True)
    notes = [f"{config}, {prompts} prompts: first call (compile included) of the torch.compile row {first[k]:.1f} "
             f"CPU s, i.e. "
             f"{first[k] - min(v):.1f} s of compilation; amortised over {c} calls the row's time per call is "
             f"{min(v) + (first[k] - min(v)) / c:.2f} s"
             for k, v in times.items() if "compile" in k for c in (10,)]
    for n_ in notes:
        print(n_, flush=True)
    return rows, notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["tiny", "mugen_L8"], choices=["tiny", "mugen_L8"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    ap.add_argument("--prompts", nargs="+", default=["distinct", "one"], choices=["distinct", "one"],
                    help="the batch's 4 prompts: 4 distinct ones, or one repeated (4 samples of a caption)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows, notes = [], []
    for c in args.configs:
        for prompts in args.prompts:
            r, n_ = run(c, args.rounds, not args.no_compile, prompts)
            rows, notes = rows + r, notes + n_
    if args.no_write:
        return
    load = open("/proc/loadavg").read().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    text = "\n".join([
        "# Text-to-video GPT generation: polymodal vs TorchMultimodal's GenerationUtil (same weights)", "",
        f"Command: `OMP_NUM_THREADS={args.threads} .venv/bin/python benchmarks/video_gpt_generate.py "
        f"--configs {' '.join(args.configs)} --prompts {' '.join(args.prompts)} --rounds {args.rounds}`", "",
        f"Machine: {platform.machine()} CPU, torch {torch.__version__}, {args.threads} thread(s); "
        f"load average at the end {' '.join(load)} (shared: CPU time of this process is measured).", "",
        "Batch 4, all video codes of a clip generated per call; prompts: 4 distinct captions, or one caption "
        "4 times (4 samples of it, both libraries given the same batch). Seconds are CPU seconds per call; "
        "ratio = TorchMultimodal's best / this row's best (> 1: faster), within a config and prompts.", "",
        "| config | prompts | variant | new tokens | best s | median s | tokens/s | vs TorchMultimodal |",
        "|---|---|---|---|---|---|---|---|", *rows, "", *[f"- {n_}" for n_ in notes], ""])
    RESULTS.write_text(text)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
