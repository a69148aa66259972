"""The one training loop: any :class:`~polymodal.train.task.Task` on one device or many ranks.

The loop owns what every family shares: the device (``auto`` picks CUDA when present; params,
model state, optimizer and batches live there), autocast (bf16, or fp16 with a
``torch.amp.GradScaler``), the seam policy (:func:`polymodal.train.policy.training_policy`:
FSDP-style sharded params gathered block by block, activation checkpointing), gradient
accumulation, global-norm clipping, warmup + cosine, ``torch.compile``, the evaluation cadence,
a tqdm bar, ``metrics.jsonl``, PNG curves, atomic checkpoints and exact resume. Several ranks
(``torchrun``, or ``polymodal train --nproc N``): each rank takes its slice of every global batch
(the task's ``train_batches(start_step, rank, world)``), gradients are averaged (replicated
params) or reduce-scattered (``shard=True``), and model state (batch-norm statistics) is
averaged over ranks after every step.

Randomness: params come from ``fold_in(key(seed), 0)``, step ``s`` gets ``fold_in(key(seed),
1_000_000 + s)`` (micro-batch ``i`` of it ``fold_in(that, i)``), so a resumed run replays the
uninterrupted one exactly.

>>> from polymodal.train.task import make_task
>>> loop = LoopConfig(steps=2, batch_size=16, out="runs/doc", progress=False)
>>> task = make_task("clip", "tiny", {"train_size": 64, "eval_size": 16}, loop)
>>> metrics = train(task, loop)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..core import pytree
from ..core import random as pr
from ..core.layers.linear_kernel import frozen_weights
from ..core.layers.seam import default_policy, use_policy
from .metrics import MetricsLog, plot_metrics, read_metrics
from .policy import training_policy
from .rundir import read_json, record_config
from .runs import Run, load_run, load_training_checkpoint
from .schedule import warmup_cosine
from .task import LossOutput, option

__all__ = ["LoopConfig", "UsageError", "train", "resolve_device", "init_distributed", "default_optimizer", "load_run", "Run",
           "DEVICES", "PRECISIONS"]

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16", "fp16")


class UsageError(ValueError):
    """A run that cannot start as asked (flags that do not fit together, another run in ``out``)."""


@dataclass
class LoopConfig:
    """The loop's knobs (every family's); saved in ``config.json`` with the task's options."""

    steps: int = option(300, "optimizer steps", positive=True)
    batch_size: int = option(128, "global batch size, split across ranks", positive=True)
    lr: float = option(2e-3, "peak learning rate")
    warmup: int | None = option(None, "linear warmup steps (default: 10%% of the steps)")
    min_lr: float = option(0.0, "learning rate at the end of the cosine")
    weight_decay: float = option(0.1, "AdamW weight decay on matrices")
    grad_accum: int = option(1, "micro-batches per step: the batch is split, gradients add up", positive=True)
    clip_grad: float | None = option(None, "clip the global gradient norm to this value", metavar="NORM")
    device: str = option("auto", "where to train: auto (CUDA when present), cpu or cuda", choices=DEVICES)
    precision: str = option("fp32", "fp32, bf16 (autocast) or fp16 (autocast + gradient scaler)", choices=PRECISIONS)
    compile: bool = option(False, "torch.compile the training loss")
    shard: bool = option(False, "FSDP-style sharded params (needs several ranks: --nproc N)")
    checkpointing: int = option(0, "activation checkpointing of every K-th block (0: off)", metavar="K")
    out: str = option("runs/run", "run directory")
    seed: int = option(0, "seed of every random draw")
    eval_every: int = option(100, "steps between evaluations (0: only at the end)")
    save_every: int = option(100, "steps between checkpoints (0: only at the end)")
    stop_after: int | None = option(None, "leave after N steps of this invocation, checkpointed (continue with "
                                    "--resume)", positive=True, metavar="N")
    progress: bool = option(True, "show a progress bar", cli=False)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cuda`` -> this rank's GPU (``LOCAL_RANK``)."""
    if name not in DEVICES:
        raise ValueError(f"--device: expected one of {list(DEVICES)}, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible (torch.cuda.is_available() is False); "
                             "expected one of ['auto', 'cpu'] on this machine")
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def init_distributed(device: torch.device) -> None:
    """Start the process group from torchrun's environment (nccl on CUDA, gloo on CPU), once."""
    if "LOCAL_RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _say(msg: str) -> None:
    if _rank_world()[0] == 0:
        print(msg, flush=True)


def _to(tree: Any, device: torch.device) -> Any:
    """Tensors of a batch / state tree (dicts, lists, tuples) on ``device``; other leaves as they are."""
    if isinstance(tree, torch.Tensor):
        return tree.to(device, non_blocking=True)
    if isinstance(tree, dict):
        return {k: _to(v, device) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(_to(v, device) for v in tree)
    return tree


def _split(batch: Any, k: int) -> list[Any]:
    """``k`` micro-batches: every tensor split along its first axis."""
    if k == 1:
        return [batch]
    if isinstance(batch, torch.Tensor):
        if batch.shape[0] < k:
            raise ValueError(f"--grad-accum {k}: a batch of {batch.shape[0]} rows cannot be split {k} ways")
        return list(batch.tensor_split(k))
    if isinstance(batch, dict):
        parts = {n: _split(v, k) for n, v in batch.items()}
        return [{n: p[i] for n, p in parts.items()} for i in range(k)]
    if isinstance(batch, (list, tuple)):
        parts = [_split(v, k) for v in batch]
        return [type(batch)(p[i] for p in parts) for i in range(k)]
    return [batch] * k


def _decay_mask(name: str, t: torch.Tensor) -> bool:
    return t.dim() >= 2 and "embed" not in name.split(".")[-1]


def default_optimizer(leaves: dict[str, torch.Tensor], cfg: LoopConfig) -> torch.optim.Optimizer:
    """AdamW as CLIP trains (betas 0.9/0.98, eps 1e-6), weight decay on matrices only."""
    decay = [t for n, t in leaves.items() if _decay_mask(n, t)]
    rest = [t for n, t in leaves.items() if not _decay_mask(n, t)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
                             fused=not cfg.shard or None)  # one fused kernel over all leaves (not for DTensors)


def _full(leaves: dict, mesh) -> dict:
    if mesh is None:
        return {k: v.detach() for k, v in leaves.items()}
    from .distributed.sharding import full_params

    return pytree.flatten(full_params(pytree.unflatten({k: v.detach() for k, v in leaves.items()})))


def _sync_state(state, world: int):
    """Detach the new model state; with several ranks, average it (each rank saw its own slice of
    the batch), so every rank evaluates and saves the same statistics."""
    state = pytree.tree_map(lambda t: t.detach(), state)
    if world > 1:
        from torch.distributed.tensor import DTensor

        for t in pytree.leaves(state):
            if t.is_floating_point() and not isinstance(t, DTensor):  # a sharded leaf: each rank's own slice
                dist.all_reduce(t, op=dist.ReduceOp.AVG)
    return state


def _full_state(state, mesh):
    """The model state with sharded (DTensor) leaves gathered (collective: every rank calls it)."""
    if mesh is None or state is None:
        return state
    from .distributed.sharding import full_params

    return full_params(state)


def _check(cfg: LoopConfig, world: int, custom_step: bool) -> None:
    if cfg.precision not in PRECISIONS:
        raise UsageError(f"precision: expected one of {list(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.shard and world == 1:
        raise UsageError("--shard needs several ranks (use --nproc N)")
    if custom_step and (cfg.grad_accum > 1 or cfg.clip_grad or cfg.precision == "fp16" or cfg.shard):
        raise UsageError("this task takes its own gradient step (DP-SGD): --grad-accum, --clip-grad, fp16 and "
                         "--shard do not apply")


def train(task: Any, cfg: LoopConfig) -> dict:
    """Run (or resume, when ``cfg.out`` holds a checkpoint) ``task``; returns the last evaluation's metrics."""
    from .checkpoint import RunDir

    rank, world = _rank_world()
    custom_step = getattr(task, "step", None)
    _check(cfg, world, custom_step is not None)
    device = resolve_device(cfg.device)
    out, steps = Path(cfg.out), task.steps
    warmup = cfg.warmup if cfg.warmup is not None else max(1, steps // 10)
    root = pr.key(cfg.seed)
    params, state = task.init(pr.fold_in(root, 0))
    params, state = _to(params, device), _to(state, device)
    runs = RunDir(out / "checkpoints", keep=2)
    latest = runs.latest()
    run_config = dict(getattr(task, "run_config", {}))
    if latest is not None and (out / "config.json").exists():
        saved = read_json(out / "config.json", "unreadable run config")
        for k in ("family", "preset"):
            if k in run_config and k in saved and saved[k] != run_config[k]:
                raise UsageError(f"{out} holds a {saved[k]!r} run; cannot resume it as {run_config[k]!r}")
    if cfg.warmup is not None and cfg.warmup > steps:
        _say(f"warning: --warmup {cfg.warmup} exceeds the run's {steps} steps: the learning rate never reaches --lr")

    mesh = None
    if cfg.shard:
        from .distributed import mesh_from_env
        from .distributed.sharding import shard_params

        mesh = mesh_from_env(device.type)
        params = shard_params(params, mesh)
    leaves = {k: v.detach().requires_grad_() if not cfg.shard else v for k, v in pytree.flatten(params).items()}
    make_opt = getattr(task, "optimizer", None)
    opt = make_opt(leaves, cfg) if make_opt is not None else default_optimizer(leaves, cfg)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    start = 0
    if latest is not None:
        start, state, extra = _resume(runs, leaves, state, opt, mesh)
        if scaler is not None and "scaler" in extra:
            scaler.load_state_dict(extra["scaler"])
        if hasattr(task, "load_state_dict") and "task" in extra:
            task.load_state_dict(extra["task"])
        _say(f"resuming {out} from step {start}")
    if rank == 0:  # once the checkpoint loaded; a resume that changes settings records them in config_history
        out.mkdir(parents=True, exist_ok=True)
        record = dataclasses.asdict(cfg) | run_config | {"steps": steps, "resolved_device": str(device)}
        record_config(out, record, resumed_at=None if latest is None else start)
    log = MetricsLog(out, truncate_after=start) if rank == 0 else None
    policy = training_policy(sharded=cfg.shard, checkpoint_every=cfg.checkpointing)
    amp = cfg.precision != "fp32"
    amp_dtype = torch.float16 if cfg.precision == "fp16" else torch.bfloat16

    def loss_fn(p, s, batch, key) -> LossOutput:
        if cfg.shard:
            from .distributed.sharding import gather_rest

            p = gather_rest(p, stacks=getattr(task, "model", None))  # the stacks the model declares stay sharded
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            return task.loss(p, s, batch, key)

    if cfg.compile:
        loss_fn = torch.compile(loss_fn)
    bar = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc=f"train {task.name}", unit="step", dynamic_ncols=True)
    title = getattr(task, "title", task.name)
    t_last, metrics = time.perf_counter(), {}
    with use_policy(policy):
        for step, batch in enumerate(task.train_batches(start, rank, world), start=start):
            if step >= steps:
                break
            lr = warmup_cosine(step, base_lr=cfg.lr, warmup=warmup, total=steps, min_lr=cfg.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            key = pr.fold_in(root, 1_000_000 + step)
            batch = _to(batch, device)
            if custom_step is not None:
                res = custom_step(pytree.unflatten(leaves), state, batch, key, step=step, optimizer=opt)
                loss, logged, state = res.loss.detach(), dict(res.metrics), res.state
            else:
                loss, logged, state = _grad_step(loss_fn, leaves, state, batch, key, opt, scaler, cfg, world)
            if state is not None:
                state = _sync_state(state, world)
            now = time.perf_counter()
            rate = cfg.batch_size / max(now - t_last, 1e-9)
            t_last = now
            value = float(loss)
            if world > 1:
                v = torch.tensor(value, device=device)
                dist.all_reduce(v, op=dist.ReduceOp.AVG)
                value = float(v)
            if not math.isfinite(value):
                raise FloatingPointError(f"loss became {value} at step {step}; lower --lr or use fp32")
            logged = {k: float(v) for k, v in logged.items()}
            if log is not None:
                log.write({"step": step + 1, "loss": value, "lr": lr, "samples_per_s": rate, **logged})
            if bar is not None:
                bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.1e}", samples_s=f"{rate:.0f}")
                bar.update(1)
            done = step + 1
            last = done == steps
            if (cfg.eval_every and done % cfg.eval_every == 0) or last:
                if last and bar is not None:
                    bar.set_description(f"evaluating {task.name}")  # the end-of-run evaluation can take a while
                metrics = _eval(task, leaves, state, mesh, device)
                if log is not None and metrics:
                    log.write({"step": done, **metrics})
                    if bar is not None:
                        bar.write(f"step {done}: " + "  ".join(f"{k.removeprefix('eval/')} {v:.3f}"
                                                               for k, v in metrics.items()))
                    plot_metrics(read_metrics(out), out / "curves.png", title=title)
            stopping = cfg.stop_after is not None and done - start >= cfg.stop_after
            if (cfg.save_every and done % cfg.save_every == 0) or last or stopping:
                extra = {"task": task.state_dict()} if hasattr(task, "state_dict") else {}
                if scaler is not None:
                    extra["scaler"] = scaler.state_dict()
                _save(runs, done, leaves, state, opt, mesh, extra | {"preset": run_config.get("preset")})
            if stopping:
                _say(f"stopping after {cfg.stop_after} steps at step {done}; continue with --resume")
                break
    if bar is not None:
        bar.close()
    if rank == 0 and log is not None and not (out / "curves.png").exists():
        plot_metrics(read_metrics(out), out / "curves.png", title=title)
    return metrics


def _grad_step(loss_fn, leaves, state, batch, key, opt, scaler, cfg: LoopConfig, world: int):
    """Forward + backward over ``cfg.grad_accum`` micro-batches, reduce, clip, optimizer step."""
    opt.zero_grad(set_to_none=True)
    k = cfg.grad_accum
    total, logged = None, {}
    for i, micro in enumerate(_split(batch, k)):
        res = loss_fn(pytree.unflatten(leaves), state, micro, key if k == 1 else pr.fold_in(key, i))
        state = res.state if res.state is None or k == 1 else pytree.tree_map(lambda t: t.detach(), res.state)
        loss = res.loss if k == 1 else res.loss / k
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total = res.loss.detach() if total is None else total + res.loss.detach()
        logged = res.metrics
    if world > 1 and not cfg.shard:
        for t in leaves.values():
            if t.grad is not None:
                dist.all_reduce(t.grad, op=dist.ReduceOp.AVG)
    if scaler is not None:
        scaler.unscale_(opt)
    if cfg.clip_grad:
        logged = {**logged, "grad_norm": torch.nn.utils.clip_grad_norm_(list(leaves.values()), cfg.clip_grad)}
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return (total if k == 1 else total / k), logged, state


def _resume(runs, leaves, state, opt, mesh):
    if mesh is not None:
        from .checkpoint import load_sharded

        ck = load_sharded(runs.path / "sharded", pytree.unflatten(leaves), opt)
        if state is not None:  # the consolidated file of the same step holds it
            like = pytree.unflatten(_full(leaves, mesh))
            state = load_training_checkpoint(runs, ck.step, like=like, state_like=state).state
        return ck.step, state, ck.extra
    ck = load_training_checkpoint(runs, like=pytree.unflatten(leaves), state_like=state, optimizer=opt)
    return ck.step, ck.state, ck.extra


def _eval(task, leaves, state, mesh, device) -> dict:
    params, state = pytree.unflatten(_full(leaves, mesh)), _full_state(state, mesh)
    if _rank_world()[0] != 0:
        return {}
    # the weights hold still over the evaluation: each is reordered for oneDNN once (CPU), not per batch
    with use_policy(default_policy), torch.no_grad(), frozen_weights():
        return task.evaluate(params, state, device=device)


def _save(runs, step, leaves, state, opt, mesh, extra: dict) -> None:
    rank, _ = _rank_world()
    if mesh is not None:
        from .checkpoint import save_sharded

        save_sharded(runs.path / "sharded", pytree.unflatten(leaves), opt, step=step, extra=extra)  # atomic swap
        full, state = _full(leaves, mesh), _full_state(state, mesh)
        if rank == 0:  # also a consolidated params + state file that eval / zero-shot read
            runs.save(step, pytree.unflatten(full), None, extra=extra, state=state)
        return
    if rank == 0:
        runs.save(step, pytree.unflatten(leaves), opt, extra=extra, state=state)
