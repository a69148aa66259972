"""``polymodal`` command line: train, eval, zero-shot.

    polymodal train clip --preset tiny --steps 300 --out runs/clip
    polymodal train classifier --init-from runs/clip --dp --target-epsilon 3
    polymodal eval --run runs/clip
    polymodal zero-shot --run runs/clip --image x.png --labels "a red circle,a blue square"

``polymodal train <family>`` offers the families registered in :mod:`polymodal.registry`; each
one's flags are the loop's (:class:`polymodal.train.LoopConfig`) and its task's ``Options``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
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


# Range checks of the flags (besides ``positive=True`` options): every float must be finite.
_NON_NEGATIVE = {"lr", "min_lr", "warmup", "weight_decay", "workers", "eval_every", "save_every", "checkpointing",
                 "clip_grad", "max_grad_norm", "noise_multiplier", "target_epsilon", "delta"}
_POSITIVE = {"epochs", "clip_grad", "max_grad_norm", "target_epsilon"}


def _ranged(kind: type, name: str):
    """``kind`` parsed, then range-checked for field ``name`` (an argparse ``type=``)."""
    if kind not in (int, float):
        return kind

    def conv(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {s!r}") from None
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
        if name in _POSITIVE and v <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}")
        if name in _NON_NEGATIVE and v < 0:
            raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}")
        return v

    conv.__name__ = kind.__name__
    return conv


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``polymodal: error: ...``, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"polymodal: error: {message}\n")


def _flags(parser: argparse.ArgumentParser, p, cls: type, defaults: dict | None = None) -> None:
    """Add ``--field-name`` to ``p`` (a parser or group of ``parser``) for every
    :func:`polymodal.train.task.option` field of dataclass ``cls``; fields with a ``group`` go to
    that section of ``parser``'s help."""
    import typing

    hints = typing.get_type_hints(cls)
    groups = {g.title: g for g in parser._action_groups}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", True) or "help" not in meta:
            continue
        target = p
        if meta.get("group"):
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_argument_group(meta["group"])
            target = groups[meta["group"]]
        flag = "--" + f.name.replace("_", "-")
        default = (defaults or {}).get(f.name, f.default)
        kind = hints[f.name]
        args = typing.get_args(kind)
        if args and type(None) in args:  # X | None
            kind = next(a for a in args if a is not type(None))
        if kind is bool:  # on by default: --flag / --no-flag (a store_true flag could never turn it off)
            action = argparse.BooleanOptionalAction if default else "store_true"
            target.add_argument(flag, action=action, default=default, help=meta["help"])
            continue
        conv = _positive_int if meta.get("positive") else _ranged(kind, f.name)
        shown = "" if default is None else " (default: %(default)s)"
        target.add_argument(flag, type=conv, default=default, choices=meta.get("choices"), metavar=meta.get("metavar"),
                            help=meta["help"] + shown)


def _family_parser(tsub, name: str, fam) -> None:
    from .train.loop import LoopConfig

    cls = fam.load_task()
    presets = ", ".join(fam.presets)
    p = tsub.add_parser(name, help=fam.description, description=f"Train {name}: {fam.description}. Writes "
                        "config.json, metrics.jsonl, curves.png and checkpoints to --out.")
    p.add_argument("--preset", default=fam.default_preset, metavar="NAME",
                   help=f"model preset: {presets} (or a builder name; default: %(default)s)")
    _flags(p, p.add_argument_group(f"{name} options"), cls.Options)
    loop = p.add_argument_group("training loop")
    _flags(p, loop, LoopConfig, getattr(cls, "loop_defaults", {}))
    loop.add_argument("--nproc", type=_positive_int, default=1,
                      help="processes on this machine (relaunches itself under torchrun; several machines: run "
                           "torchrun yourself, see the README)")
    loop.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    loop.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from .registry import families

    parser = _Parser(
        prog="polymodal", description="Train and use multimodal models built on polymodal's functional core.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    trainable = {n: f for n, f in families().items() if f.task is not None}
    listing = "; ".join(f"{n} (presets: {', '.join(f.presets)})" for n, f in trainable.items())
    t = sub.add_parser("train", help="train a model", description=f"Train a model family: {listing}.")
    tsub = t.add_subparsers(dest="family", metavar="FAMILY", required=True)
    for name, fam in trainable.items():
        _family_parser(tsub, name, fam)
    e = sub.add_parser("eval", help="evaluate a run", description="Evaluate a run directory with its family's task.")
    e.add_argument("--run", required=True, help="run directory written by 'polymodal train'")
    e.add_argument("--eval-size", type=_positive_int, default=None, help="examples per split (default: the run's)")
    e.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to evaluate")
    z = sub.add_parser("zero-shot", help="classify an image against text labels",
                       description="Rank text labels for an image with a trained CLIP run.")
    z.add_argument("--run", required=True, help="run directory written by 'polymodal train'")
    z.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    z.add_argument("--labels", required=True, help="comma-separated labels, e.g. \"a red circle,a blue square\"")
    z.add_argument("--template", default="a photo of a {}", help="prompt template (default: %(default)r)")
    et = sub.add_parser("embed-text", help="sentence embeddings from a local BERT-family model folder",
                        description="Embed texts with a Hugging Face BERT / RoBERTa / DistilBERT / MiniLM folder "
                                    "(mean pooling + L2 normalisation, the sentence-transformers recipe).")
    et.add_argument("--model", required=True, help="Hugging Face model folder (config.json, weights, tokenizer files)")
    et.add_argument("texts", nargs="+", help="texts to embed")
    et.add_argument("--output", default=None, help="save the (N, D) embeddings here (.pt or .npy) instead of printing")
    et.add_argument("--no-normalize", action="store_true", help="mean pooling without L2 normalisation")
    from .models.mugen.cli import add_generate_parser
    add_generate_parser(sub)
    from .models.omnivore.cli import add_classify_parser
    add_classify_parser(sub)
    return parser


def _relaunch(argv: list[str], nproc: int) -> int:
    """Re-run this command under torchrun with ``nproc`` processes (gloo on CPU, nccl on GPU)."""
    from torch.distributed.run import main as torchrun

    rest, skip = [], False
    for a in argv:
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
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        torchrun(["--standalone", f"--nproc-per-node={nproc}", "-m", "polymodal.cli", *rest])
    except ChildFailedError as e:  # the ranks printed their own error (one line, or a traceback when unexpected)
        codes = sorted({f.exitcode for f in e.failures.values()})
        msg = f"{len(e.failures)} of {nproc} processes failed (exit status {codes}); their output is above"
        raise CLIError(msg) from None
    return 0


def _cmd_train(args: argparse.Namespace, argv: list[str]) -> int:
    import torch.distributed as dist

    from .data.stream import is_shard_pattern
    from .registry import family
    from .train.loop import LoopConfig, UsageError, init_distributed, resolve_device, train
    from .train.rundir import HELD_ENV, RunDirError, RunLock, agreed, check_out
    from .train.task import make_task

    fam = family(args.family)
    cls = fam.load_task()
    given = vars(args)
    loop_fields = {f.name for f in dataclasses.fields(LoopConfig)}
    option_fields = {f.name for f in dataclasses.fields(cls.Options)}
    try:
        options = {k: given[k] for k in option_fields if k in given}
        cls.Options(**options)  # the task's own checks, before anything starts
        fam.builder_name(args.preset)
        resolve_device(args.device)
    except ValueError as e:
        raise CLIError(str(e)) from None
    check = functools.partial(check_out, args.out, resume=args.resume, family=args.family)
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        if args.batch_size % args.nproc:
            raise CLIError(f"--nproc {args.nproc} does not divide --batch-size {args.batch_size}: each process takes "
                           f"an equal slice of the batch (try --batch-size "
                           f"{max(args.nproc, args.batch_size // args.nproc * args.nproc)})")
        lock = RunLock(args.out)
        try:  # checked and locked here, before the ranks start; they find the lock held (HELD_ENV)
            check()
            lock.acquire()
        except RunDirError as e:
            raise CLIError(str(e)) from None
        held = os.environ.get(HELD_ENV)
        os.environ[HELD_ENV] = os.path.realpath(lock.path)
        try:
            return _relaunch(argv, args.nproc)
        finally:
            lock.release()
            if held is None:
                os.environ.pop(HELD_ENV, None)
            else:
                os.environ[HELD_ENV] = held
    if args.shard and args.nproc == 1 and "LOCAL_RANK" not in os.environ:
        raise CLIError("--shard needs several processes: add --nproc 2 (or more)")
    data = getattr(args, "data", "synthetic")
    if data != "synthetic" and not os.path.exists(data) and not is_shard_pattern(data):  # shards: checked by the task
        raise CLIError(f"--data: no such file {data!r} (expected 'synthetic', a JSONL/CSV file or WebDataset shards)")
    cfg = LoopConfig(**{k: given[k] for k in loop_fields if k in given}, progress=not args.no_progress)
    if cfg.progress and int(os.environ.get("RANK", "0")) == 0:  # building the model, data (and DP noise) takes a while
        extra = ", choosing the DP noise" if getattr(args, "target_epsilon", None) is not None else ""
        print(f"preparing {args.family} ({args.preset}): model, data{extra} ...", file=sys.stderr, flush=True)
    try:
        task = make_task(args.family, args.preset, options, cfg)
    except ValueError as e:
        raise CLIError(str(e)) from None
    init_distributed(resolve_device(cfg.device))
    lock = RunLock(cfg.out)

    def check_and_lock() -> None:  # on rank 0; every rank gets its answer (agreed)
        check()
        lock.acquire()

    try:
        agreed(check_and_lock)
        metrics = train(task, cfg)
    except (UsageError, RunDirError) as e:
        raise CLIError(str(e)) from None
    finally:
        lock.release()
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        _summary(cfg.out, metrics)
    return 0


def _summary(out: str, metrics: dict) -> None:
    print(f"\nrun directory: {out}")
    for k, v in metrics.items():
        print(f"  {k.removeprefix('eval/'):24s} {v:.4g}")
    print(f"  metrics:    {os.path.join(out, 'metrics.jsonl')}")
    plot = os.path.join(out, "curves.png")
    print(f"  plot:       {plot}" if os.path.exists(plot) else "  plot:       none (matplotlib is not installed)")
    print(f"  checkpoint: {os.path.join(out, 'checkpoints')}")


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .core.pytree import tree_map
    from .train.loop import resolve_device
    from .train.runs import load_run, read_config, run_task

    cfg = read_config(args.run)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise CLIError(str(e)) from None
    overrides = {}
    if args.eval_size is not None:
        overrides["eval_size"] = args.eval_size
    from .registry import family as _family

    if cfg.get("data", "synthetic") != "synthetic" and not getattr(_family(cfg["family"]).load_task(),
                                                                 "evaluates_data_files", False):
        raise CLIError("eval: only runs on the built-in synthetic data have an eval split")
    try:
        small = {"train_size": int(cfg.get("batch_size", 1))} if cfg["family"] == "clip" else {}  # eval only
        task = run_task(args.run, **overrides, **small)
    except (ValueError, TypeError) as e:
        raise CLIError(f"eval: {e}") from None
    run = load_run(args.run)
    to = lambda t: tree_map(lambda x: x.to(device), t)  # noqa: E731
    print(f"evaluating {args.run} ({cfg['family']} {cfg.get('preset', '')}) on {device} ...", file=sys.stderr,
          flush=True)
    from .core.layers.linear_kernel import frozen_weights

    with torch.no_grad(), frozen_weights():  # each weight reordered for oneDNN once, not per batch (CPU)
        metrics = task.evaluate(to(run.params), None if run.state is None else to(run.state), device=device)
    for k, v in metrics.items():
        print(f"{k.removeprefix('eval/'):24s} {v:.4f}")
    return 0


def _check_template(template: str) -> None:
    """``--template`` must have exactly one ``{}`` where the label goes (literal braces doubled: ``{{``)."""
    import string

    try:
        fields = [f for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise CLIError(f"--template: {e} in {template!r}; expected one '{{}}' where the label goes, e.g. "
                       "'a photo of a {}' (write literal braces as '{{' and '}}')") from None
    if fields not in ([""], ["0"]):
        raise CLIError(f"--template: expected exactly one '{{}}' where the label goes, e.g. 'a photo of a {{}}', "
                       f"got {template!r}")


def _cmd_zero_shot(args: argparse.Namespace) -> int:
    import torch

    from .data import CLIPTokenizer, load_image
    from .data.transforms import CLIPImageTransform
    from .train.runs import load_run

    labels = [s.strip() for s in args.labels.split(",") if s.strip()]
    if len(labels) < 2:
        raise CLIError(f"--labels: expected at least two comma-separated labels, got {args.labels!r}")
    _check_template(args.template)
    if not os.path.exists(args.image):
        raise CLIError(f"--image: no such file {args.image!r}")
    try:
        image = load_image(args.image)
    except Exception as e:  # PIL raises many types for unreadable files
        raise CLIError(f"--image: cannot read {args.image!r} as an image ({e})") from None
    model, params, _, state = load_run(args.run)
    x = CLIPImageTransform(model.image_size)(image)[None]
    prompts = [args.template.format(label) for label in labels]
    with torch.no_grad():
        img = model.encode_image(params, x, state=state)
        txt = model.encode_text(params, CLIPTokenizer(context_length=model.context_length)(prompts))
        probs = (params["logit_scale"].exp().clamp(max=100) * img @ txt.T).softmax(-1)[0]
    for i in probs.argsort(descending=True).tolist():
        print(f"{probs[i].item():7.2%}  {labels[i]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from .data.captions import BadSampleError
    from .train.checkpoint import CheckpointError, CheckpointSaveError
    from .train.rundir import RunDirError

    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser()
    except ValueError as e:  # a family registered with a broken task
        print(f"polymodal: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return _cmd_train(args, argv)
        if args.command == "eval":
            return _cmd_eval(args)
        if args.command == "embed-text":
            from .models.bert.cli import embed_text_command
            return embed_text_command(args)
        if args.command == "generate":
            from .models.mugen.cli import generate_command
            return generate_command(args)
        if args.command == "classify":
            from .models.omnivore.cli import classify_command
            return classify_command(args)
        return _cmd_zero_shot(args)
    except (CLIError, FileNotFoundError, BadSampleError, FloatingPointError, CheckpointError, CheckpointSaveError,
            RunDirError) as e:
        print(f"polymodal: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
