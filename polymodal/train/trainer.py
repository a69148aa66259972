"""The CLIP training loop behind ``polymodal train clip``.

One process or several (``torchrun`` / ``--nproc``): each rank takes its slice of every global
batch (a pure function of the seed and the step, so resuming replays the same data), the
contrastive loss gathers embeddings across ranks, and gradients are averaged (replicated
params) or reduce-scattered (``shard=True``: params are DTensors gathered block by block at the
seam). Activation checkpointing is a seam policy. Checkpoints, ``metrics.jsonl`` and a PNG plot
go to the run directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ..core import pytree
from ..core import random as pr
from ..core.layers.seam import checkpoint_policy, compose, default_policy, use_policy
from ..models.clip.task import Collate, StepBatches, build_model, clip_loss, evaluate, make_datasets
from .metrics import MetricsLog, plot_metrics, read_metrics
from .schedule import warmup_cosine

__all__ = ["TrainConfig", "train", "load_run", "Run", "BN_STATE"]

BN_STATE = "bn_state"  # top-level key of a checkpoint's batch-norm statistics (ResNet image towers)


@dataclass
class TrainConfig:
    """Every knob of a run; saved as ``config.json`` in the run directory."""

    preset: str = "tiny"  # tiny | small | vit-b32 | vit-b16
    data: str = "synthetic"  # "synthetic" or a JSONL/CSV of (image, caption)
    image_root: str | None = None  # folder the image paths are relative to (default: the file's folder)
    steps: int = 300  # optimizer steps (overridden by epochs when given)
    epochs: float | None = None  # passes over the training set
    batch_size: int = 128  # global batch size (split across ranks)
    lr: float = 2e-3  # peak learning rate
    warmup: int = 30  # linear warmup steps
    min_lr: float = 0.0  # learning rate at the end of the cosine
    weight_decay: float = 0.1  # AdamW decay on matrices (not on norms, biases, embeddings' scale)
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    compile: bool = False  # torch.compile the loss
    shard: bool = False  # FSDP-style sharded params (needs several ranks)
    checkpointing: int = 0  # activation checkpointing every k-th block (0: off)
    out: str = "runs/clip"  # run directory
    seed: int = 0  # everything random derives from it
    train_size: int = 20_000  # synthetic training pairs
    eval_size: int = 512  # synthetic eval / held-out pairs
    eval_every: int = 100  # steps between evaluations (0: only at the end)
    save_every: int = 100  # steps between checkpoints (0: only at the end)
    workers: int = 0  # DataLoader worker processes
    skip_bad: bool = False  # skip unreadable samples in real data instead of failing
    progress: bool = True  # show a progress bar
    stop_after: int | None = None  # leave after this many steps of this invocation (time-sliced jobs; resume later)


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _decay_mask(name: str, t: torch.Tensor) -> bool:
    return t.dim() >= 2 and "embed" not in name.split(".")[-1]


def _optimizer(leaves: dict[str, torch.Tensor], cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [t for n, t in leaves.items() if _decay_mask(n, t)]
    rest = [t for n, t in leaves.items() if not _decay_mask(n, t)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
                             fused=not cfg.shard or None)  # one fused kernel over all leaves (not for DTensors)


def _say(msg: str) -> None:
    if _rank_world()[0] == 0:
        print(msg, flush=True)


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) a CLIP training run; returns the final metrics."""
    from .checkpoint import RunDir

    rank, world = _rank_world()
    if cfg.shard and world == 1:
        raise ValueError("--shard needs several ranks (use --nproc N)")
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got {cfg.precision!r}")
    out = Path(cfg.out)
    model = build_model(cfg.preset)
    ctx = model.context_length
    data = make_datasets(cfg.data, model.image_size, seed=cfg.seed, train_size=cfg.train_size,
                         eval_size=cfg.eval_size, image_root=cfg.image_root, skip_bad=cfg.skip_bad)
    steps = cfg.steps if cfg.epochs is None else max(1, math.ceil(cfg.epochs * len(data.train) / cfg.batch_size))
    root = pr.key(cfg.seed)
    params = model.init(key=pr.fold_in(root, 0))
    state = model.init_state()  # batch-norm statistics of a ResNet image tower; None for a ViT
    runs = RunDir(out / "checkpoints", keep=2)
    start = 0
    latest = runs.latest()
    if latest is not None:
        saved = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
        if saved and saved.get("preset") != cfg.preset:
            raise ValueError(f"{out} holds a {saved.get('preset')!r} run; cannot resume it as {cfg.preset!r}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg) | {"steps": steps}, indent=2))

    mesh = None
    if cfg.shard:
        from .distributed import mesh_from_env
        from .distributed.sharding import shard_params

        mesh = mesh_from_env()
        params = shard_params(params, mesh)
    leaves = {k: v.detach().requires_grad_() if not cfg.shard else v for k, v in pytree.flatten(params).items()}
    opt = _optimizer(leaves, cfg)
    if latest is not None:
        if cfg.shard:
            from .checkpoint import load_sharded

            start = load_sharded(runs.path / "sharded", pytree.unflatten(leaves), opt).step
            if state is not None:  # the consolidated file of the same step holds them
                state = runs.load(start, like=_saved_tree(pytree.unflatten(_full(leaves, mesh)), state)).params[BN_STATE]
        else:
            ck = runs.load(like=_saved_tree(pytree.unflatten(leaves), state), optimizer=opt)
            start, state = ck.step, ck.params.get(BN_STATE)
        _say(f"resuming {out} from step {start}")
    log = MetricsLog(out, truncate_after=start) if rank == 0 else None

    policy = default_policy
    if cfg.shard:
        from .distributed.sharding import gather_policy, gather_rest

        policy = gather_policy()
    if cfg.checkpointing:
        policy = compose(checkpoint_policy(every=cfg.checkpointing), policy) if cfg.shard else checkpoint_policy(
            every=cfg.checkpointing)

    def loss_fn(p, batch, key, state):
        if cfg.shard:
            p = gather_rest(p, stacks=model)  # the stacks CLIP declares stay sharded for the seam
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            return clip_loss(model, p, batch, key, state=state, backprop_type="global" if world > 1 else "none")

    if cfg.compile:
        loss_fn = torch.compile(loss_fn)
    sampler = StepBatches(len(data.train), cfg.batch_size, steps, key=pr.fold_in(root, 1), start_step=start,
                          rank=rank, world=world)
    loader = DataLoader(data.train, batch_sampler=sampler, collate_fn=Collate(ctx), num_workers=cfg.workers,
                        persistent_workers=cfg.workers > 0)
    bar = None
    if cfg.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, desc=f"train clip-{cfg.preset}", unit="step", dynamic_ncols=True)
    t_last, step, metrics = time.perf_counter(), start, {}
    with use_policy(policy):
        for step, batch in enumerate(loader, start=start):
            lr = warmup_cosine(step, base_lr=cfg.lr, warmup=cfg.warmup, total=steps, min_lr=cfg.min_lr)
            for g in opt.param_groups:
                g["lr"] = lr
            loss, state = loss_fn(pytree.unflatten(leaves), batch, pr.fold_in(root, 1_000_000 + step), state)
            if state is not None:
                state = _sync_state(state, world)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1 and not cfg.shard:
                for t in leaves.values():
                    if t.grad is not None:
                        dist.all_reduce(t.grad, op=dist.ReduceOp.AVG)
            opt.step()
            now = time.perf_counter()
            rate = cfg.batch_size / max(now - t_last, 1e-9)
            t_last = now
            value = float(loss.detach())
            if world > 1:
                v = torch.tensor(value)
                dist.all_reduce(v, op=dist.ReduceOp.AVG)
                value = float(v)
            if not math.isfinite(value):
                raise FloatingPointError(f"loss became {value} at step {step}; lower --lr or use fp32")
            if log is not None:
                log.write({"step": step + 1, "loss": value, "lr": lr, "samples_per_s": rate})
            if bar is not None:
                bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.1e}", samples_s=f"{rate:.0f}")
                bar.update(1)
            done = step + 1
            last = done == steps
            if (cfg.eval_every and done % cfg.eval_every == 0) or last:
                metrics = _eval(model, leaves, state, data, cfg, ctx, mesh)
                if log is not None and metrics:
                    log.write({"step": done, **metrics})
                    if bar is not None:
                        bar.write(f"step {done}: " + "  ".join(f"{k[5:]} {v:.3f}" for k, v in metrics.items()))
                    plot_metrics(read_metrics(out), out / "curves.png", title=f"CLIP {cfg.preset} on {cfg.data}")
            stopping = cfg.stop_after is not None and done - start >= cfg.stop_after
            if (cfg.save_every and done % cfg.save_every == 0) or last or stopping:
                _save(runs, done, leaves, state, opt, cfg, mesh)
            if stopping:
                _say(f"stopping after {cfg.stop_after} steps at step {done}; continue with --resume")
                break
    if bar is not None:
        bar.close()
    if rank == 0 and log is not None and not (out / "curves.png").exists():
        plot_metrics(read_metrics(out), out / "curves.png", title=f"CLIP {cfg.preset} on {cfg.data}")
    return metrics


def _full(leaves: dict, mesh) -> dict:
    if mesh is None:
        return {k: v.detach() for k, v in leaves.items()}
    from .distributed.sharding import full_params

    return pytree.flatten(full_params(pytree.unflatten({k: v.detach() for k, v in leaves.items()})))


def _sync_state(state, world: int):
    """Detach the new batch-norm statistics; with several ranks, average them (each rank saw its
    own slice of the batch), so every rank evaluates and saves the same statistics."""
    state = pytree.tree_map(lambda t: t.detach(), state)
    if world > 1:
        for t in pytree.leaves(state):
            if t.is_floating_point():
                dist.all_reduce(t, op=dist.ReduceOp.AVG)
    return state


def _saved_tree(params, state):
    """What a checkpoint file holds: the params, plus the batch-norm statistics of a ResNet tower
    under ``BN_STATE`` (not trained by the optimizer, but needed to use the model)."""
    return params if state is None else {**params, BN_STATE: state}


def _eval(model, leaves, state, data, cfg, ctx, mesh) -> dict:
    params = pytree.unflatten(_full(leaves, mesh))
    if _rank_world()[0] != 0:
        return {}
    with use_policy(default_policy):
        return evaluate(model, params, data, context_length=ctx, state=state)


def _save(runs, step, leaves, state, opt, cfg, mesh) -> None:
    rank, _ = _rank_world()
    if mesh is not None:
        from .checkpoint import save_sharded

        save_sharded(runs.path / "sharded", pytree.unflatten(leaves), opt, step=step)  # swapped in atomically
        full = _full(leaves, mesh)
        if rank == 0:  # also a consolidated params file that eval / zero-shot read
            runs.save(step, _saved_tree(pytree.unflatten(full), state), None, extra={"preset": cfg.preset})
        return
    if rank == 0:
        runs.save(step, _saved_tree(pytree.unflatten(leaves), state), opt, extra={"preset": cfg.preset})


class Run(NamedTuple):
    """A trained run: the CLIP spec, its params, the run's config and the batch-norm statistics
    of a ResNet image tower (``None`` for a ViT); pass them on as ``state=``."""

    model: Any
    params: dict
    config: dict
    state: dict | None


def load_run(run: str | os.PathLike) -> Run:
    """The :class:`Run` ``(model, params, config, state)`` of a run directory's latest checkpoint."""
    from .checkpoint import RunDir

    run = Path(run)
    if not (run / "config.json").exists():
        raise FileNotFoundError(f"{run} is not a polymodal run directory (no config.json); "
                                "pass the --out directory of 'polymodal train'")
    cfg = json.loads((run / "config.json").read_text())
    model = build_model(cfg["preset"])
    runs = RunDir(run / "checkpoints")
    if runs.latest() is None:
        raise FileNotFoundError(f"{run} has no checkpoint yet")
    state = model.init_state()
    params = runs.load(like=_saved_tree(model.init(key=pr.key(0)), state)).params
    if state is not None:
        params = dict(params)
        state = params.pop(BN_STATE)
    return Run(model, params, cfg, state)
