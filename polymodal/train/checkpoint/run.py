"""A run directory: numbered checkpoints, a ``latest.json`` pointer, keep-last-N.

Layout::

    run/
      ckpt-00000100.safetensors   # one verified file per saved step (see checkpoint.file)
      ckpt-00000200.safetensors
      latest.json                 # {"step": 200, "file": "ckpt-00000200.safetensors", "extra": {...}}

Every write goes to a temp file in the same directory, is fsynced and renamed; ``latest.json``
is replaced only after the checkpoint file is complete, and old files are pruned only after
that. So a crash or kill at any moment leaves ``latest.json`` naming a complete, loadable file.

>>> import tempfile, torch
>>> from polymodal.core import random
>>> run = RunDir(tempfile.mkdtemp(), keep=2)
>>> p = {"w": torch.ones(3)}
>>> for step in (10, 20, 30):
...     _ = run.save(step, p, extra={"config": {"lr": 0.1}, "rng_key": random.key(step)})
>>> run.steps(), run.latest().step, run.latest().extra["rng_key"].dtype
([20, 30], 30, torch.int64)
>>> run.load(like=p).step
30
"""

from __future__ import annotations

import json
import operator
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from polymodal.core.pytree import Params, atomic_write
from polymodal.train.checkpoint.extras import decode, encode, from_inline, inline
from polymodal.train.checkpoint.file import Checkpoint, CheckpointError, fsync_dir, load_checkpoint, save_checkpoint

__all__ = ["RunDir", "RunInfo", "CheckpointSaveError"]

_NAME = re.compile(r"^ckpt-(\d{8,})\.safetensors$")
_TMP = re.compile(r"^\.tmp-.*(ckpt-\d{8,}\.safetensors|latest\.json)(\.d)?$"  # ours (atomic_write, _save_file)
                  r"|^\.tmp[A-Za-z0-9]{6}$")  # the safetensors writer's own, left by runs before polymodal 0.2
POINTER = "latest.json"


class CheckpointSaveError(OSError):
    """Writing a checkpoint failed (disk full, quota, I/O): the message names the file and the step still intact."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class RunInfo(NamedTuple):
    """What ``latest.json`` says: the step, the checkpoint file and the extras (tensors exact)."""

    step: int
    path: Path
    extra: dict


class RunDir:
    """Checkpoints of one training run in a directory.

    Args:
        path: the directory (created on first save).
        keep: how many of the newest checkpoints to keep (``None``: all). Pruning removes
            files older than the kept ones; files of steps newer than the one just saved
            (left by an abandoned branch of the run) are left alone.
    """

    def __init__(self, path: str | os.PathLike, keep: int | None = 3):
        if keep is not None and keep < 1:
            raise ValueError(f"RunDir: keep must be >= 1 or None, got {keep}")
        self.path, self.keep = Path(path), keep

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, keep={self.keep})"

    def file(self, step: int) -> Path:
        """The checkpoint file of ``step``."""
        return self.path / f"ckpt-{int(step):08d}.safetensors"

    def steps(self) -> list[int]:
        """Steps with a checkpoint file on disk, ascending."""
        if not self.path.is_dir():
            return []
        return sorted(int(m.group(1)) for n in os.listdir(self.path) if (m := _NAME.match(n)))

    def save(self, step: int, params: Params, optimizer: torch.optim.Optimizer | None = None,
             extra: Mapping[str, Any] | None = None, *, state: Params | None = None) -> Path:
        """Write ``ckpt-{step:08d}.safetensors``, then point ``latest.json`` at it, then prune.

        Args:
            step: the training step (a non-negative int).
            params, optimizer: as for :func:`save_checkpoint`.
            extra: what resuming needs besides params (``config``, ``rng_key``, ``data_state``):
                JSON values, tuples and small tensors. Stored in the file and, inline, in
                ``latest.json``.
            state: the model state tree (batch-norm statistics), stored beside the params.

        Returns:
            The path of the checkpoint file.
        """
        step = _check_step(step)
        self.path.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps()
        extra = dict(extra or {})
        pointer = {"format": "polymodal.run/1", "step": step, "file": self.file(step).name,
                   "extra": encode(extra, inline)}  # validates extras before anything is written
        try:
            save_checkpoint(self.file(step), params, optimizer, extra=extra, step=step, state=state)
            text = json.dumps(pointer, indent=1, sort_keys=True)
            _write_pointer(self.path / POINTER, text)
        except OSError as e:  # disk full, quota, I/O error: one line saying what is still intact
            self._remove_stale_temps()
            raise CheckpointSaveError(e.errno, f"checkpoint {str(self.file(step))!r} could not be saved "
                                      f"({e.strerror or e}); {self._intact()}") from e
        self._prune(step)
        return self.file(step)

    def latest(self) -> RunInfo | None:
        """The checkpoint ``latest.json`` points to, or ``None`` if nothing was saved.

        Without a ``latest.json`` (e.g. deleted by hand) the newest complete file is used.
        """
        pointer = self.path / POINTER
        if not pointer.is_file():
            steps = self.steps()
            if not steps:
                return None
            ck = load_checkpoint(self.file(steps[-1]))
            return RunInfo(steps[-1], self.file(steps[-1]), ck.extra)
        try:
            d = json.loads(pointer.read_text())
            info = RunInfo(int(d["step"]), self.path / d["file"], decode(d["extra"], from_inline))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(pointer, f"unreadable run pointer ({type(e).__name__}: {e})") from None
        if not info.path.is_file():
            raise CheckpointError(pointer, f"points to {info.path.name}, which does not exist")
        return info

    def load(self, step: int | None = None, like: Params | None = None,
             optimizer: torch.optim.Optimizer | None = None, *, device: str | torch.device = "cpu",
             state_like: Params | None = None) -> Checkpoint:
        """Load ``step`` (default: the latest); see :func:`load_checkpoint` for ``like`` / ``optimizer`` / ``state_like``."""
        if step is None:
            info = self.latest()
            if info is None:
                raise FileNotFoundError(f"no checkpoint in run directory {str(self.path)!r}")
            path = info.path
        else:
            path = self.file(step)
            if not path.is_file():
                raise FileNotFoundError(f"no checkpoint for step {step} in {str(self.path)!r} (have {self.steps()})")
        return load_checkpoint(path, like, optimizer, device=device, state_like=state_like)

    def _prune(self, current: int) -> None:
        if self.keep is None:
            return
        older = [s for s in self.steps() if s < current]
        for s in older[: max(0, len(older) - (self.keep - 1))]:
            self.file(s).unlink(missing_ok=True)
        fsync_dir(str(self.path))

    def _intact(self) -> str:
        try:
            info = self.latest()
        except (CheckpointError, OSError):
            info = None
        if info is None:
            return f"no earlier checkpoint in {str(self.path)!r}"
        return f"step {info.step} is still intact ({info.path})"

    def _remove_stale_temps(self) -> None:
        # Temp files (and writer folders) left by a writer that was killed: never renamed, so never referenced.
        for n in os.listdir(self.path):
            if _TMP.match(n):
                if (self.path / n).is_dir():
                    shutil.rmtree(self.path / n, ignore_errors=True)
                else:
                    (self.path / n).unlink(missing_ok=True)


def _check_step(step: Any) -> int:
    try:
        value = operator.index(step)
    except TypeError:
        value = -1
    if isinstance(step, bool) or value < 0:
        raise ValueError(f"RunDir.save: step must be a non-negative int, got {step!r}")
    return value


def _write_pointer(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write)
    fsync_dir(str(path.parent))
