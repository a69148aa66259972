"""Run directories of ``polymodal train``: the saved config, loading a trained run, older layouts.

Layout::

    out/
      config.json          # the loop's and the task's options, "family", "preset", "steps"
      metrics.jsonl        # one JSON object per logged step / evaluation
      curves.png
      checkpoints/         # a RunDir: ckpt-*.safetensors (params, optimizer, extras, model state)
        sharded/           # DCP checkpoint of a --shard run (params + optimizer, any world size)

Checkpoints hold params and model state (batch-norm statistics) as separate trees. Runs written
before that (polymodal <= 0.1 put the statistics into the params file under a ``bn_state``
subtree) still load and resume: :func:`load_training_checkpoint` splits them off.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, NamedTuple

from ..core.pytree import Params
from .checkpoint import Checkpoint, CheckpointError, RunDir, verify

__all__ = ["Run", "load_run", "run_task", "read_config", "load_training_checkpoint", "LEGACY_STATE"]

LEGACY_STATE = "bn_state"  # the params subtree that held batch-norm statistics in older run directories


class Run(NamedTuple):
    """A trained run: the model spec, its params, the run's config and the model state
    (batch-norm statistics of a ResNet image tower; ``None`` when stateless): pass it as ``state=``."""

    model: Any
    params: dict
    config: dict
    state: dict | None


def read_config(run: str | os.PathLike) -> dict:
    """``config.json`` of a run directory, with ``family`` filled in for runs that predate it."""
    path = Path(run) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{run} is not a polymodal run directory (no config.json); "
                                "pass the --out directory of 'polymodal train'")
    from .rundir import read_json

    cfg = read_json(path, "unreadable run config")
    cfg.setdefault("family", "classifier" if cfg.get("task") == "classifier" else "clip")
    return cfg


def run_task(run: str | os.PathLike, **overrides: Any) -> Any:
    """The task of a run directory, rebuilt from its config (``overrides``: task options to change)."""
    import dataclasses

    from ..registry import family
    from .loop import LoopConfig
    from .task import make_task

    cfg = read_config(run)
    cls = family(cfg["family"]).load_task()
    names = {f.name for f in dataclasses.fields(cls.Options)}
    loop = LoopConfig(**{f.name: cfg[f.name] for f in dataclasses.fields(LoopConfig) if f.name in cfg})
    loop.steps = cfg.get("steps", loop.steps)
    options = {k: v for k, v in cfg.items() if k in names} | overrides
    return make_task(cfg["family"], cfg["preset"], options, loop)


def _is_legacy(path: Path) -> bool:
    from .checkpoint.file import META_STATE, read_header

    header = read_header(str(path))
    return META_STATE not in (header.get("__metadata__") or {}) and any(
        k.startswith(LEGACY_STATE + ".") for k in header)


def _corrupt(path: Path) -> bool:
    try:
        verify(path)
    except (CheckpointError, FileNotFoundError):
        return True
    return False


def load_training_checkpoint(runs: RunDir, step: int | None = None, *, like: Params | None = None,
                             state_like: Params | None = None, optimizer: Any = None) -> Checkpoint:
    """``runs.load`` that also reads the older layout (state inside the params as ``bn_state``).

    Returns ``Checkpoint(step, params, extra, state)`` with params and state apart either way.
    ``step=None`` loads the latest; when that file is corrupt (fails its integrity check) and an older
    intact one exists, the older one is loaded and a warning naming both goes to stderr.
    """
    if step is None:
        info = runs.latest()
        if info is None:
            raise FileNotFoundError(f"no checkpoint in run directory {str(runs.path)!r}")
        older = [s for s in runs.steps() if s < info.step]
        try:
            return load_training_checkpoint(runs, info.step, like=like, state_like=state_like, optimizer=optimizer)
        except CheckpointError as e:
            if not older or not _corrupt(info.path):  # a mismatch with the model is no reason to go back
                raise
            bad = e  # a corrupt newest file with an intact older one: resume from that one, and say so
        for s in reversed(older):
            if _corrupt(runs.file(s)):
                continue
            print(f"polymodal: warning: {bad.path} is unreadable ({bad.problem}); using step {s} "
                  f"({runs.file(s).name}), the newest intact checkpoint", file=sys.stderr, flush=True)
            return load_training_checkpoint(runs, s, like=like, state_like=state_like, optimizer=optimizer)
        raise bad
    path = runs.file(step)
    if not path.is_file() or not _is_legacy(path):
        return runs.load(step, like=like, optimizer=optimizer, state_like=state_like)
    if like is not None and state_like is None:
        raise CheckpointError(path, f"holds model state under {LEGACY_STATE!r} (the older layout) but this model "
                              "has none; convert it with polymodal.train.runs.convert_legacy")
    full_like = None if like is None else {**like, LEGACY_STATE: state_like}
    ck = runs.load(step, like=full_like, optimizer=optimizer)
    params = dict(ck.params)
    state = params.pop(LEGACY_STATE)
    return Checkpoint(ck.step, params, ck.extra, state)


def convert_legacy(run: str | os.PathLike) -> list[Path]:
    """Rewrite a run directory's older-layout checkpoints (``bn_state`` inside the params) into the
    current one (params and state apart), in place and atomically; returns the files rewritten.

    >>> convert_legacy("runs/old")  # doctest: +SKIP
    """
    from .checkpoint.file import read_entries, write_entries
    from .checkpoint.file import META_PARAMS, META_STATE

    runs, done = RunDir(Path(run) / "checkpoints", keep=None), []
    for step in runs.steps():
        path = runs.file(step)
        if not _is_legacy(path):
            continue
        entries, meta = read_entries(path)
        moved = [k for k in json.loads(meta[META_PARAMS]) if k.startswith(LEGACY_STATE + ".")]
        for k in moved:
            entries["state." + k[len(LEGACY_STATE) + 1:]] = entries.pop(k)
        meta = {k: v for k, v in meta.items() if not k.startswith("polymodal.sha256") and k != "polymodal.format"}
        meta[META_PARAMS] = json.dumps([k for k in json.loads(meta[META_PARAMS]) if k not in moved])
        meta[META_STATE] = json.dumps([k[len(LEGACY_STATE) + 1:] for k in moved])
        write_entries(path, entries, meta)
        done.append(path)
    return done


def load_run(run: str | os.PathLike) -> Run:
    """The :class:`Run` ``(model, params, config, state)`` of a run directory's latest checkpoint."""
    cfg = read_config(run)
    task = run_task(run)
    runs = RunDir(Path(run) / "checkpoints")
    if runs.latest() is None:
        raise FileNotFoundError(f"{run} has no checkpoint yet")
    ck = load_training_checkpoint(runs)
    return Run(getattr(task, "model", None), ck.params, cfg, ck.state)
