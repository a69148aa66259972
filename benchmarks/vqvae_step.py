"""Video VQ-VAE training step (forward + backward, the codebook's EMA / restarts and the batch-norm
statistics updated): polymodal (functional, eager; and ``torch.compile``) against TorchMultimodal's
``VQVAE(VideoEncoder, VideoDecoder)`` from the same weights, in one run, interleaved.

Reproduce (writes ``benchmarks/results/vqvae_step.md``)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vqvae_step.py
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vqvae_step.py --rounds 2 --configs tiny   # a quick look

Configurations: ``tiny`` (``vqvae_tiny``: 48 channels, 1 residual block, 8x32x32 clips, batch 8) and
``video`` (VideoGPT's ``video_vqvae`` defaults: 240 channels, 4 residual blocks, codebook 1024 x 256;
at 4x32x32 clips, batch 1, to stay short on CPU). Loss: reconstruction MSE + commitment (0.25) for
both. The codebooks start initialised (TorchMultimodal's state dict loaded: no lazy init).

Timing: the CPU time of this process (``time.process_time``: the machine is shared, so wall time
mostly measures the neighbours) on ``--threads`` threads; ``--warmup`` untimed steps (compilation
happens there), then ``--rounds`` rounds timing each variant once in turn. Reported: best and median
per variant, and the ratio of best times TorchMultimodal / polymodal (> 1: polymodal faster).
``torch.compile`` runs for ``tiny`` only (inductor's CPU compile of the full model takes many minutes here).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).parent / "results" / "vqvae_step.md"


def build(config: str):
    from torchmultimodal.models.video_gpt.model import video_vqvae as tmm_video_vqvae

    from polymodal.models.vqvae import video_vqvae, vqvae_tiny
    from polymodal.models.vqvae.convert import from_torchmultimodal

    torch.manual_seed(0)
    if config == "tiny":
        spec = vqvae_tiny()
        ref = tmm_video_vqvae(((3, 3, 3), (3, 3, 3)), ((2, 2, 2), (1, 2, 2)), (3, 3, 3), (1, 1, 1),
                              encoder_hidden_dim=48, n_res_layers=1, attn_hidden_dim=48, num_embeddings=256,
                              embedding_dim=32, decoder_hidden_dim=48)
        x = torch.rand(8, 3, 8, 32, 32) - 0.5
    else:
        spec, ref = video_vqvae(), tmm_video_vqvae()
        x = torch.rand(1, 3, 4, 32, 32) - 0.5
    sd = ref.state_dict()
    sd["codebook.embedding"] = torch.randn_like(sd["codebook.embedding"]) * 0.1
    sd["codebook.code_avg"] = sd["codebook.embedding"].clone()
    sd["codebook.code_usage"] = torch.ones_like(sd["codebook.code_usage"])
    ref.load_state_dict(sd)  # marks the codebook initialised
    ref.train()
    params, state = from_torchmultimodal(sd, spec)
    return spec, params, state, ref, x


def variants(spec, params, state, ref, x, compile_: bool):
    from polymodal.core import pytree
    from polymodal.core import random as pr

    leaves = {k: v.clone().requires_grad_() for k, v in pytree.flatten(params).items()}
    box = {"state": state, "step": 0}

    def loss_fn(p, s, key):
        out, s2 = spec(p, x, s, training=True, key=key)
        return spec.losses(out, x)["loss"], s2

    def ours(fn):
        def step():
            for v in leaves.values():
                v.grad = None
            loss, box["state"] = fn(pytree.unflatten(leaves), box["state"], pr.key(box["step"]))
            box["step"] += 1
            loss.backward()
            return float(loss)
        return step

    def theirs():
        ref.zero_grad(set_to_none=True)
        out = ref(x)
        cb = out.codebook_output
        loss = F.mse_loss(out.decoded, x) + 0.25 * F.mse_loss(cb.quantized_flat.detach(), cb.encoded_flat)
        loss.backward()
        return float(loss)

    out = {"TorchMultimodal (eager)": theirs, "polymodal functional (eager)": ours(loss_fn)}
    if compile_:
        out["polymodal functional (torch.compile)"] = ours(torch.compile(loss_fn))
    return out


def run(config: str, rounds: int, warmup: int, compile_: bool) -> list[str]:
    spec, params, state, ref, x = build(config)
    fns = variants(spec, params, state, ref, x, compile_ and config == "tiny")  # inductor on CPU: minutes per graph
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.process_time()
            fn()
            times[k].append(time.process_time() - t)
    base = min(times["TorchMultimodal (eager)"])
    rows = [f"| {config} | {k} | {min(v) * 1e3:.0f} | {statistics.median(v) * 1e3:.0f} | {base / min(v):.2f}x |"
            for k, v in times.items()]
    for r in rows:
        print(r, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["tiny", "video"], choices=["tiny", "video"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for c in args.configs:
        rows += run(c, args.rounds, args.warmup, not args.no_compile)
    if args.no_write:
        return
    load = open("/proc/loadavg").read().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    text = "\n".join([
        "# Video VQ-VAE training step: polymodal vs TorchMultimodal (same weights)", "",
        f"Command: `OMP_NUM_THREADS={args.threads} .venv/bin/python benchmarks/vqvae_step.py "
        f"--configs {' '.join(args.configs)} --rounds {args.rounds}`", "",
        f"Machine: {platform.machine()} CPU, torch {torch.__version__}, {args.threads} thread(s); "
        f"load average at the end {' '.join(load)} (shared with other jobs: CPU time of this process is measured).", "",
        "Forward + backward of reconstruction MSE + commitment, codebook EMA and batch-norm statistics updated "
        "(training mode). Times are CPU milliseconds per step; ratio = TorchMultimodal's best / this row's best.", "",
        "| config | variant | best ms | median ms | vs TorchMultimodal |", "|---|---|---|---|---|", *rows, ""])
    RESULTS.write_text(text)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
