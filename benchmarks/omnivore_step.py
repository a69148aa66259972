"""Omnivore forward and training step, polymodal (functional) vs TorchMultimodal, same weights, on an
image batch and a video batch, eager and ``torch.compile``d (CPU; one process).

    OMP_NUM_THREADS=1 python benchmarks/omnivore_step.py --configs tiny swin_t --iters 5

``swin_t`` is ``omnivore_swin_t`` (28.9 M params) at a CPU-sized input (``--size``, default 112 px,
4-frame videos); ``tiny`` is ``omnivore_tiny`` on 32 px, 4-frame inputs. A train step is forward,
cross-entropy, backward and an AdamW update of every parameter as each library trains (``--optimizer adamw``,
the default): TorchMultimodal with torch's default implementation (``examples/omnivore/train.py``'s
``--opt adamw``), polymodal with the fused kernel (``polymodal.train``'s ``default_optimizer``);
``--optimizer sgd`` gives both the same plain SGD step, so the models' own share compares like for like.
The eager forward is also timed inside :class:`polymodal.core.layers.linear_kernel.frozen_weights` (row
"forward, frozen_weights": polymodal's inference scope, which reorders each weight for oneDNN once instead
of at every call; TorchMultimodal has no counterpart, so its column is its plain forward again).
Times are CPU time of this process (the machine may be shared), best and median of ``--iters`` interleaved
rounds (ten times as many for ``tiny``) after ``--warmup`` runs (and the compilation); ratio =
TorchMultimodal time / polymodal time.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from polymodal.core.layers.linear_kernel import frozen_weights  # noqa: E402
from polymodal.core.pytree import leaves, tree_map  # noqa: E402
from polymodal.models.omnivore import build, from_torchmultimodal  # noqa: E402


def reference(config: str) -> nn.Module:
    from torchmultimodal.models import omnivore as tmm
    from torchmultimodal.modules.encoders.swin_transformer_3d_encoder import SwinTransformer3d

    torch.manual_seed(0)
    if config == "swin_t":
        return tmm.omnivore_swin_t()
    enc = SwinTransformer3d(patch_size=[2, 4, 4], embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=[2, 4, 4],
                            stochastic_depth_prob=0.0, norm_layer=nn.LayerNorm, patch_embed=tmm.PatchEmbedOmnivore,
                            num_classes=None)
    heads = nn.ModuleDict({"image": nn.Linear(enc.num_features, 30),
                           "video": nn.Sequential(nn.Dropout(0.0), nn.Linear(enc.num_features, 4)),
                           "rgbd": nn.Linear(enc.num_features, 6)})
    return tmm.Omnivore(enc, heads)


def inputs(config: str, kind: str, batch: int, size: int):
    g = torch.Generator().manual_seed(1)
    s = 32 if config == "tiny" else size
    shape = (batch, 3, 1, s, s) if kind == "image" else (batch, 3, 4, s, s)
    classes = {"tiny": {"image": 30, "video": 4}, "swin_t": {"image": 1000, "video": 400}}[config][kind]
    return torch.randn(shape, generator=g), torch.randint(0, classes, (batch,), generator=g)


def timed_pair(ours, theirs, warmup: int, iters: int) -> tuple[float, float, float, float]:
    """Best and median CPU seconds of ``ours`` and ``theirs``: ``warmup`` untimed calls each, then ``iters``
    rounds timing each once in turn (interleaved, so drifting load on a shared machine hits both alike)."""
    for _ in range(warmup):
        ours()
        theirs()
    a, b = [], []
    for _ in range(iters):
        for fn, out in ((ours, a), (theirs, b)):
            t = time.process_time()
            fn()
            out.append(time.process_time() - t)
    return min(a), statistics.median(a), min(b), statistics.median(b)


def make_steps(config: str, kind: str, compiled: bool, optimizer: str = "adamw"):
    ref = reference(config).eval()  # eval: no dropout / drop path in either (timing the same maths)
    spec = build("omnivore_tiny" if config == "tiny" else "omnivore_swin_t")
    params = tree_map(lambda t: t.detach().clone().requires_grad_(), from_torchmultimodal(ref.state_dict(), spec))
    if optimizer == "adamw":
        opt_p = torch.optim.AdamW(leaves(params), lr=1e-3, fused=True)
        opt_r = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    else:
        opt_p = torch.optim.SGD(leaves(params), lr=1e-3)
        opt_r = torch.optim.SGD(ref.parameters(), lr=1e-3)

    def fwd_p(x):
        return spec(params, x, kind).logits

    def fwd_r(x):
        return ref(x, kind)

    if compiled:
        fwd_p, fwd_r = torch.compile(fwd_p), torch.compile(fwd_r)

    def infer(fwd, scope=None):
        def run(x, y):
            with torch.no_grad():
                if scope is None:
                    return fwd(x)
                with scope:
                    return fwd(x)
        return run

    def train(fwd, opt):
        def run(x, y):
            loss = F.cross_entropy(fwd(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss
        return run

    steps = {"forward": (infer(fwd_p), infer(fwd_r))}
    if not compiled:  # polymodal's inference scope: each weight reordered for oneDNN once, not at every call
        steps["forward, frozen_weights"] = (infer(fwd_p, frozen_weights()), infer(fwd_r))
    steps["train step"] = (train(fwd_p, opt_p), train(fwd_r, opt_r))
    return steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["tiny", "swin_t"], choices=["tiny", "swin_t"])
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                    help="the train step's update: each library's AdamW (default) or the same SGD on both")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f}, "
          f"train-step optimizer: {args.optimizer}", flush=True)
    print("| config | input | mode | what | polymodal best ms | median | TorchMultimodal best ms | median "
          "| ratio (best) | ratio (median) |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|")
    for config in args.configs:
        for kind in ("image", "video"):
            x, y = inputs(config, kind, args.batch, args.size)
            for mode in args.modes:
                torch._dynamo.reset()
                steps = make_steps(config, kind, mode == "compiled", args.optimizer)
                for what, (ours, theirs) in steps.items():
                    if what.startswith("forward"):
                        torch.testing.assert_close(ours(x, y), theirs(x, y), rtol=1e-3, atol=1e-3)
                    iters = args.iters * (10 if config == "tiny" else 1)  # milliseconds: more runs against noise
                    a, am, b, bm = timed_pair(lambda: ours(x, y), lambda: theirs(x, y), args.warmup, iters)
                    print(f"| {config} | {kind} {tuple(x.shape)} | {mode} | {what} | {a * 1e3:.1f} | {am * 1e3:.1f} | "
                          f"{b * 1e3:.1f} | {bm * 1e3:.1f} | {b / a:.2f}x | {bm / am:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
