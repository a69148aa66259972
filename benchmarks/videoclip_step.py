"""One VideoCLIP training step (both towers in train mode, the contrastive loss, backward): polymodal
against TorchMultimodal's VideoCLIP from the same weights, eager and ``torch.compile``-d.

Reproduce (writes ``benchmarks/results/videoclip_step.md``)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/videoclip_step.py                  # small (eager + compiled), full (eager)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/videoclip_step.py --only small --rounds 3

TorchMultimodal's VideoCLIP is ``examples/mugen/retrieval/video_clip.py`` (not installed): the test
``tests/models/mugen/test_videoclip_parity.py`` holds the minimal copy used here (the installed ``CLIP``,
torchvision's ``S3D``, transformers' ``DistilBertModel``), with the installed
``ContrastiveLossWithTemperature`` at MUGEN's settings. Weights go reference -> ours through
``from_torchmultimodal``; dropout is 0 on both sides so the losses agree (checked every round).

* ``small``: a 2-layer width-32 DistilBERT and torchvision's full-width S3D with a 1x1x1 head pool,
  batch 8 of 8-frame 32x32 clips, 8-token captions.
* ``full``: MUGEN's ``videoclip()`` (DistilBERT-base, S3D with its 2x7x7 pool), batch 2 of 16-frame
  224x224 clips (the fewest frames the pool takes; MUGEN trains on 32), 16-token captions. Eager only:
  compiling the full S3D's backward takes minutes of the shared machine's CPU.

Timing: CPU time of this process (``time.process_time``; the machine is shared) after warm-up
steps, ``--rounds`` rounds timing each side once in turn; the median is reported.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "models" / "mugen"))

from test_videoclip_parity import _SMALL_TEXT, reference_videoclip  # noqa: E402
from torchmultimodal.modules.losses.contrastive_loss_with_temperature import (  # noqa: E402
    ContrastiveLossWithTemperature,
)

from polymodal.core.encoders.bert import bert_text_encoder  # noqa: E402
from polymodal.core.encoders.s3d import s3d  # noqa: E402
from polymodal.core.pytree import tree_map  # noqa: E402
from polymodal.models.mugen.videoclip import VideoCLIP  # noqa: E402
from polymodal.models.mugen.videoclip_builders import distilbert_text_encoder, videoclip  # noqa: E402
from polymodal.models.mugen.videoclip_convert import from_torchmultimodal  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "videoclip_step.md"


def build(config: str):
    torch.manual_seed(0)
    if config == "small":
        ref = reference_videoclip(_SMALL_TEXT, proj_out_dim=16, proj_dropout=0.0)
        ref.encoder_b[0].model.avgpool = torch.nn.AvgPool3d((1, 1, 1), stride=1)
        text = bert_text_encoder(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                 max_position_embeddings=16, type_vocab_size=0, pooler=False)
        spec = VideoCLIP(text, s3d(pool_kernel=(1, 1, 1)), proj_dim=16, proj_dropout=0.0)
        b, t, side, vocab, length = 8, 8, 32, 64, 8
    else:
        ref = reference_videoclip(dict(dropout=0.0, attention_dropout=0.0), proj_dropout=0.0)
        spec = videoclip(text=distilbert_text_encoder(dropout=0.0, attn_dropout=0.0), proj_dropout=0.0)
        b, t, side, vocab, length = 2, 16, 224, 30522, 16
    ref.train()
    params, state = from_torchmultimodal({k: v.detach().clone() for k, v in ref.state_dict().items()}, spec)
    params = tree_map(lambda x: x.requires_grad_(x.is_floating_point()), params)
    g = torch.Generator().manual_seed(1)
    video = torch.rand(b, 3, t, side, side, generator=g)
    ids = torch.randint(1, vocab, (b, length), generator=g)
    ids[-1, length // 2:] = 0
    return ref, spec, params, state, video, ids


def make_steps(config: str, compiled: bool):
    ref, spec, params, state, video, ids = build(config)
    loss_fn = ContrastiveLossWithTemperature(logit_scale=0.07, logit_scale_min=None, logit_scale_max=100)

    def ref_loss(v, i):
        out = ref(i, v)
        return loss_fn(out.embeddings_a, out.embeddings_b)

    def our_loss(p, s, v, i):
        out, _ = spec(p, v, i, s, training=True)
        return spec.loss(p, out).loss

    if compiled:
        ref_loss, our_loss = torch.compile(ref_loss), torch.compile(our_loss)

    def ref_step():
        ref.zero_grad(set_to_none=True)
        loss_fn.zero_grad(set_to_none=True)
        loss = ref_loss(video, ids)
        loss.backward()
        return float(loss.detach())

    def our_step():
        for leaf in (x for x in torch.utils._pytree.tree_leaves(params) if x.requires_grad):
            leaf.grad = None
        loss = our_loss(params, state, video, ids)
        loss.backward()
        return float(loss.detach())

    return ref_step, our_step


def measure(config: str, compiled: bool, rounds: int, warmup: int) -> dict:
    ref_step, our_step = make_steps(config, compiled)
    for _ in range(warmup):
        a, b = ref_step(), our_step()
    # the reference's BatchNorm buffers advance in place, ours are returned and dropped: same batch stats each step
    assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), f"losses differ: TorchMultimodal {a} vs polymodal {b}"
    t_ref, t_ours = [], []
    for _ in range(rounds):
        t = time.process_time()
        a = ref_step()
        t_ref.append(time.process_time() - t)
        t = time.process_time()
        b = our_step()
        t_ours.append(time.process_time() - t)
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), f"losses differ: {a} vs {b}"
    r, o = statistics.median(t_ref), statistics.median(t_ours)
    return {"config": config, "mode": "compiled" if compiled else "eager", "ref_ms": 1e3 * r, "ours_ms": 1e3 * o,
            "ratio": r / o, "loss": b}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("small", "full"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    ap.add_argument("--no-write", action="store_true", help=f"do not write {RESULTS.name}")
    args = ap.parse_args()
    runs = []
    if args.only in (None, "small"):
        runs.append(measure("small", False, args.rounds, 2))
        if not args.no_compile:
            runs.append(measure("small", True, args.rounds, 2))
    if args.only in (None, "full"):
        runs.append(measure("full", False, max(2, args.rounds // 2), 1))
    load = os.getloadavg()
    lines = [
        "# VideoCLIP training step: polymodal vs TorchMultimodal (same weights)", "",
        f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} .venv/bin/python "
        f"benchmarks/videoclip_step.py{' --only ' + args.only if args.only else ''} --rounds {args.rounds}"
        f"{' --no-compile' if args.no_compile else ''}`", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs shared with other jobs (load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end), torch {torch.__version__}, CPU time of this "
        f"process, median of the rounds. Step = forward of both towers in train mode + contrastive loss + backward.",
        "", "| config | mode | TorchMultimodal ms | polymodal ms | speed-up (TMM / ours) | loss |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(f"| {r['config']} | {r['mode']} | {r['ref_ms']:.1f} | {r['ours_ms']:.1f} | {r['ratio']:.2f}x | "
                     f"{r['loss']:.4f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_write:
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
