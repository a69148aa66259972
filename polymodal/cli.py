"""``polymodal`` command line: train, eval, zero-shot.

    polymodal train clip --preset tiny --steps 300 --out runs/clip
    polymodal eval --run runs/clip
    polymodal zero-shot --run runs/clip --image x.png --labels "a red circle,a blue square"
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

__all__ = ["main", "build_parser"]


class CLIError(Exception):
    """A user-facing problem: printed as one line, exit status 2."""


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _train_args(p: argparse.ArgumentParser) -> None:
    from .models.clip.task import PRESETS
    from .train.trainer import TrainConfig

    d = TrainConfig()
    p.add_argument("--preset", choices=sorted(PRESETS), default=d.preset, help="model size (default: %(default)s)")
    p.add_argument("--data", default=d.data,
                   help="'synthetic' (built-in shapes captions, the default) or a JSONL/CSV of image,caption rows")
    p.add_argument("--image-root", default=None, help="folder that image paths in --data are relative to")
    p.add_argument("--steps", type=_positive_int, default=d.steps, help="optimizer steps (default: %(default)s)")
    p.add_argument("--epochs", type=float, default=None, help="passes over the data (overrides --steps)")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="global batch (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warmup steps (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=d.precision, help="compute precision")
    p.add_argument("--compile", action="store_true", help="torch.compile the training loss")
    p.add_argument("--nproc", type=_positive_int, default=1, help="processes (relaunches itself under torchrun)")
    p.add_argument("--shard", action="store_true", help="FSDP-style sharded parameters (with --nproc > 1)")
    p.add_argument("--checkpointing", type=int, default=0, metavar="K",
                   help="activation checkpointing of every K-th block (0: off)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--out", default=d.out, help="run directory (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of every random draw (default: %(default)s)")
    p.add_argument("--train-size", type=_positive_int, default=d.train_size, help="synthetic training pairs")
    p.add_argument("--eval-size", type=_positive_int, default=d.eval_size, help="synthetic eval pairs per split")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between evaluations (0: at the end)")
    p.add_argument("--save-every", type=int, default=d.save_every, help="steps between checkpoints (0: at the end)")
    p.add_argument("--workers", type=int, default=d.workers, help="DataLoader worker processes")
    p.add_argument("--skip-bad", action="store_true", help="skip and count unreadable samples instead of failing")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--stop-after", type=_positive_int, default=None, metavar="N",
                   help="leave after N steps of this invocation, checkpointed (continue with --resume)")
    dp = p.add_argument_group("differential privacy (per-example losses only; see docs/privacy.md)")
    dp.add_argument("--dp", action="store_true", help="DP-SGD training")
    dp.add_argument("--max-grad-norm", type=float, default=1.0, help="per-example clipping bound C")
    dp.add_argument("--noise-multiplier", type=float, default=None, help="Gaussian noise std / C")
    dp.add_argument("--target-epsilon", type=float, default=None, help="pick the noise for this epsilon")
    dp.add_argument("--delta", type=float, default=1e-5, help="delta of the (epsilon, delta) guarantee")


def _classifier_args(p: argparse.ArgumentParser) -> None:
    from .train.classify import ClassifyConfig
    from .models.clip.task import PRESETS

    d = ClassifyConfig()
    p.add_argument("--preset", choices=sorted(PRESETS), default=d.preset, help="CLIP preset (default: %(default)s)")
    p.add_argument("--init-from", default=None, metavar="RUN", help="start from a 'polymodal train clip' run")
    p.add_argument("--steps", type=_positive_int, default=d.steps, help="optimizer steps (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
                   help="batch size; the expected one under --dp's Poisson sampling (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default: %(default)s)")
    p.add_argument("--out", default=d.out, help="run directory (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of every random draw")
    p.add_argument("--train-size", type=_positive_int, default=d.train_size, help="training images")
    p.add_argument("--eval-size", type=_positive_int, default=d.eval_size, help="evaluation images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    dp = p.add_argument_group("differential privacy")
    dp.add_argument("--dp", action="store_true", help="DP-SGD (Poisson sampling, per-example clipping, noise)")
    dp.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="per-example clipping bound C")
    dp.add_argument("--noise-multiplier", type=float, default=None, help="Gaussian noise std / C")
    dp.add_argument("--target-epsilon", type=float, default=None, help="pick the noise for this epsilon")
    dp.add_argument("--delta", type=float, default=d.delta, help="delta of the (epsilon, delta) guarantee")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="polymodal", description="Train and use multimodal models built on polymodal's functional core.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    t = sub.add_parser("train", help="train a model", description="Train a model (CLIP on built-in or real data).")
    tsub = t.add_subparsers(dest="model", metavar="MODEL", required=True)
    c = tsub.add_parser("clip", help="contrastive image-text pretraining",
                        description="Train CLIP with a warmup+cosine schedule; writes metrics.jsonl, curves.png and "
                                    "checkpoints to --out.")
    _train_args(c)
    k = tsub.add_parser("classifier", help="fine-tune a CLIP image tower for classification, optionally with DP-SGD",
                        description="Fine-tune a CLIP image tower + linear head on the synthetic shapes "
                                    "(colour x shape labels); --dp trains with DP-SGD and logs epsilon.")
    _classifier_args(k)
    e = sub.add_parser("eval", help="evaluate a run", description="Zero-shot accuracy and retrieval recall of a run.")
    e.add_argument("--run", required=True, help="run directory written by 'polymodal train'")
    e.add_argument("--eval-size", type=_positive_int, default=None, help="pairs per split (default: the run's)")
    z = sub.add_parser("zero-shot", help="classify an image against text labels",
                       description="Rank text labels for an image with a trained CLIP run.")
    z.add_argument("--run", required=True, help="run directory written by 'polymodal train'")
    z.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    z.add_argument("--labels", required=True, help="comma-separated labels, e.g. \"a red circle,a blue square\"")
    z.add_argument("--template", default="a photo of a {}", help="prompt template (default: %(default)r)")
    return parser


def _relaunch(argv: list[str], nproc: int) -> int:
    """Re-run this command under torchrun with ``nproc`` processes (gloo on CPU, nccl on GPU)."""
    from torch.distributed.run import main as torchrun

    rest, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        rest.append(a)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    torchrun(["--standalone", f"--nproc-per-node={nproc}", "-m", "polymodal.cli", *rest])
    return 0


def _cmd_classifier(args: argparse.Namespace) -> int:
    from .train.classify import ClassifyConfig, train_classifier

    if args.dp and (args.noise_multiplier is None) == (args.target_epsilon is None):
        raise CLIError("--dp needs exactly one of --noise-multiplier S or --target-epsilon E")
    if not args.dp and (args.noise_multiplier is not None or args.target_epsilon is not None):
        raise CLIError("--noise-multiplier / --target-epsilon only apply with --dp")
    fields = {f.name for f in dataclasses.fields(ClassifyConfig)}
    cfg = ClassifyConfig(**{k: v for k, v in vars(args).items() if k in fields}, progress=not args.no_progress)
    final = train_classifier(cfg)
    print(f"\nrun directory: {cfg.out}")
    for k, v in final.items():
        print(f"  {k[5:] if k.startswith('eval/') else k:18s} {v:.4g}")
    print(f"  metrics: {os.path.join(cfg.out, 'metrics.jsonl')}   plot: {os.path.join(cfg.out, 'curves.png')}")
    return 0


def _cmd_train(args: argparse.Namespace, argv: list[str]) -> int:
    import torch.distributed as dist

    if args.model == "classifier":
        return _cmd_classifier(args)

    from .train.trainer import TrainConfig, train

    if args.dp:
        raise CLIError("--dp: CLIP's contrastive loss couples the examples of a batch, so per-example clipping does "
                       "not bound one example's influence (docs/privacy.md). DP-SGD applies to per-example losses: "
                       "'polymodal train classifier --dp --init-from RUN' fine-tunes a CLIP image tower privately.")
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _relaunch(argv, args.nproc)
    if args.shard and args.nproc == 1 and "LOCAL_RANK" not in os.environ:
        raise CLIError("--shard needs several processes: add --nproc 2 (or more)")
    out_exists = os.path.exists(os.path.join(args.out, "checkpoints", "latest.json"))
    if out_exists and not args.resume:
        raise CLIError(f"{args.out} already holds a run: pass --resume to continue it, or choose another --out")
    if args.data != "synthetic" and not os.path.exists(args.data):
        raise CLIError(f"--data: no such file {args.data!r} (expected 'synthetic' or a JSONL/CSV file)")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields}, progress=not args.no_progress)
    if "LOCAL_RANK" in os.environ and not dist.is_initialized():
        import torch

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        metrics = train(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        _summary(cfg.out, metrics)
    return 0


def _summary(out: str, metrics: dict) -> None:
    print(f"\nrun directory: {out}")
    for k, v in metrics.items():
        print(f"  {k[5:] if k.startswith('eval/') else k:24s} {v:.3f}")
    print(f"  metrics:    {os.path.join(out, 'metrics.jsonl')}")
    print(f"  plot:       {os.path.join(out, 'curves.png')}")
    print(f"  checkpoint: {os.path.join(out, 'checkpoints')}")


def _cmd_eval(args: argparse.Namespace) -> int:
    from .models.clip.task import evaluate, make_datasets
    from .train.trainer import load_run

    model, params, cfg, state = load_run(args.run)
    if cfg.get("data", "synthetic") != "synthetic":
        raise CLIError("eval: only runs on the built-in synthetic data have an eval split")
    data = make_datasets("synthetic", model.image_size, seed=cfg["seed"], train_size=1,
                         eval_size=args.eval_size or cfg["eval_size"], image_root=None, skip_bad=False)
    metrics = evaluate(model, params, data, context_length=model.context_length, state=state)
    for k, v in metrics.items():
        print(f"{k[5:]:24s} {v:.4f}")
    return 0


def _cmd_zero_shot(args: argparse.Namespace) -> int:
    import torch

    from .data import CLIPTokenizer, load_image
    from .data.transforms import CLIPImageTransform
    from .train.trainer import load_run

    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    if len(labels) < 2:
        raise CLIError(f"--labels: expected at least two comma-separated labels, got {args.labels!r}")
    if not os.path.exists(args.image):
        raise CLIError(f"--image: no such file {args.image!r}")
    try:
        image = load_image(args.image)
    except Exception as e:  # PIL raises many types for unreadable files
        raise CLIError(f"--image: cannot read {args.image!r} as an image ({e})") from None
    model, params, _, state = load_run(args.run)
    x = CLIPImageTransform(model.image_size)(image)[None]
    prompts = [args.template.format(label) if "{}" in args.template else label for label in labels]
    with torch.no_grad():
        img = model.encode_image(params, x, state=state)
        txt = model.encode_text(params, CLIPTokenizer(context_length=model.context_length)(prompts))
        probs = (params["logit_scale"].exp().clamp(max=100) * img @ txt.T).softmax(-1)[0]
    for i in probs.argsort(descending=True).tolist():
        print(f"{probs[i].item():7.2%}  {labels[i]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .data.captions import BadSampleError

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            return _cmd_train(args, argv)
        if args.command == "eval":
            return _cmd_eval(args)
        return _cmd_zero_shot(args)
    except (CLIError, FileNotFoundError, BadSampleError, FloatingPointError) as e:
        print(f"polymodal: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
