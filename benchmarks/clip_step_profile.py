"""Profile of the compiled CLIP training step, polymodal (functional) and open_clip, on CUDA with
bf16 autocast: wall time per step over 10 steps, then GPU time and launches per step from the
profiler over 3 steps. It explains the launch-bound ``tiny`` rows of
``results/clip_train_step_cuda.md``, where wall time measures the host more than the GPU.

    python benchmarks/clip_step_profile.py --config tiny --batch 1024 --out /tmp/prof
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import clip_train_step as bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="tiny", choices=sorted(bench.CONFIGS))
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=Path("."), help="folder for the profiler tables")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("clip_step_profile: needs a CUDA GPU; skipped")
        return
    device = torch.device("cuda")
    bench.AMP.update(enabled=True, device_type="cuda", dtype=torch.bfloat16)
    sd = bench.reference(args.config)
    images, tokens = bench.inputs(args.config, args.batch, device)
    rows = {"polymodal": lambda: bench.make_polymodal(args.config, sd, device, shell=False, compile_=True),
            "open_clip": lambda: bench.make_open_clip(args.config, sd, device, compile_=True)}
    for name, make in rows.items():
        torch._dynamo.reset()
        step = make()
        for _ in range(5):  # compile and warm up
            step(images, tokens)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10):
            step(images, tokens)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / 10
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step(images, tokens)
            torch.cuda.synchronize()
        events = prof.key_averages()
        gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]  # kernels, copies, memsets
        gpu_ms = sum(e.self_device_time_total for e in gpu) / 3e3
        print(f"{name:10s} wall {wall * 1e3:6.2f} ms/step   GPU {gpu_ms:6.2f} ms/step   "
              f"{sum(e.count for e in gpu) / 3:.0f} launches/step", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{name}_{args.config}.txt").write_text(
            events.table(sort_by="self_device_time_total", row_limit=40)
            + events.table(sort_by="self_cpu_time_total", row_limit=30))
        del step


if __name__ == "__main__":
    main()
