"""The ``Task`` protocol: what a model family hands the one training loop (:mod:`polymodal.train.loop`).

A task owns the model, the data and the loss; the loop owns everything else (device, precision,
sharding, optimizer, schedule, accumulation, clipping, checkpoints, metrics, resume). A family
registers its task class with :func:`polymodal.registry.register_family` (``task="module:Class"``);
``polymodal train <family>`` builds it as ``Class(preset, options, loop)`` where ``options`` is an
instance of ``Class.Options``, a dataclass whose fields (made with :func:`option`) become the
command's extra flags. ``Class.loop_defaults`` overrides :class:`~polymodal.train.loop.LoopConfig`'s
defaults for that family (``{"steps": 100, "out": "runs/classifier"}``).

Required (the :class:`Task` protocol)::

    name: str                                 # "clip-tiny": progress bar and plot title
    steps: int                                # optimizer steps of the whole run
    init(key) -> (params, state)              # state: None for a stateless model
    loss(params, state, batch, key) -> LossOutput(loss, metrics, new_state)
    train_batches(start_step, rank, world) -> Iterable[batch]   # this rank's batches from start_step on
    evaluate(params, state, *, device) -> dict[str, float]      # called on rank 0 with the full params

Optional hooks (looked up with ``getattr``):

- ``step(params, state, batch, key, *, step, optimizer) -> LossOutput``: the task takes the whole
  gradient step itself (DP-SGD: per-example clipping and noise); the loop then skips backward,
  accumulation, clipping and ``optimizer.step()``.
- ``optimizer(leaves: dict[str, Tensor], loop) -> torch.optim.Optimizer`` (default: AdamW with
  weight decay on matrices, CLIP's betas).
- ``state_dict() -> dict`` / ``load_state_dict(d)``: the task's own resumable state (a privacy
  accountant), stored in the checkpoint's extras (JSON values and tensors).
- ``model``: the model spec (``polymodal.train.loop.load_run`` returns it).
- ``title``: the plot title.
- ``trainable_presets``: the presets this task can train (default: all of the family's).

Batches live on the CPU (the loop moves them to the device); ``key`` is the step's random key.

>>> import torch
>>> from polymodal.core import random as pr
>>> class Mean:
...     name, steps = "mean", 3
...     def init(self, key): return {"w": torch.zeros(2)}, None
...     def loss(self, p, s, b, key): return LossOutput(((p["w"] - b) ** 2).mean(), {}, None)
...     def train_batches(self, start, rank, world): return (torch.ones(2) for _ in range(start, 3))
...     def evaluate(self, p, s, *, device): return {"eval/w": float(p["w"][0])}
>>> isinstance(Mean(), Task)
True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, NamedTuple, Protocol, runtime_checkable

from torch import Tensor

from ..core.pytree import Params

__all__ = ["Task", "LossOutput", "option", "make_task", "eval_progress"]


class LossOutput(NamedTuple):
    """What ``Task.loss`` (and ``Task.step``) return."""

    loss: Tensor  # scalar; differentiable for ``loss``, detached for ``step``
    metrics: dict  # floats (or 0-d tensors) logged beside the loss, e.g. {"epsilon": 1.2}
    state: Params | None  # the new model state (batch-norm statistics); None when stateless


@runtime_checkable
class Task(Protocol):
    """See the module docstring."""

    name: str
    steps: int

    def init(self, key: Tensor) -> tuple[Params, Params | None]: ...

    def loss(self, params: Params, state: Params | None, batch: Any, key: Tensor) -> LossOutput: ...

    def train_batches(self, start_step: int, rank: int, world: int) -> Iterable[Any]: ...

    def evaluate(self, params: Params, state: Params | None, *, device: Any) -> dict: ...


def eval_progress(batches: Iterable, desc: str) -> Iterable:
    """``batches`` behind a progress bar for a task's ``evaluate`` (``polymodal eval`` and the loop's
    evaluations): shown on a terminal, silent in logs and tests (tqdm's ``disable=None``)."""
    from tqdm.auto import tqdm

    return tqdm(batches, desc=desc, unit="batch", leave=False, disable=None, dynamic_ncols=True)


def option(default: Any, help: str, *, positive: bool = False, choices: Iterable[str] | None = None,
           metavar: str | None = None, group: str | None = None, cli: bool = True) -> Any:
    """A config dataclass field that the command line turns into ``--field-name``.

    Args:
        default: the default value (``None`` for optional values).
        help: one line for ``--help``.
        positive: an int flag that must be > 0.
        choices: allowed values of a string flag.
        metavar, group: argparse's metavar and the ``--help`` section.
        cli: ``False``: not a flag (set by the command itself).
    """
    meta = {"help": help, "positive": positive, "choices": tuple(choices) if choices else None,
            "metavar": metavar, "group": group, "cli": cli}
    return dataclasses.field(default=default, metadata=meta)


def make_task(family: str, preset: str, options: dict | None = None, loop: Any = None) -> Any:
    """Build a registered family's task: ``Task(preset, Task.Options(**options), loop)``.

    Unknown option names, an unknown preset or a preset the task cannot train raise
    ``ValueError`` naming the valid ones. The task gets ``run_config``: what ``config.json``
    records so that the run can be rebuilt (family, preset, options).
    """
    from ..registry import family as get_family
    from .loop import LoopConfig

    fam = get_family(family)
    cls = fam.load_task()
    fam.builder_name(preset)  # unknown preset: names the valid ones
    allowed = getattr(cls, "trainable_presets", None)
    if allowed is not None and preset not in allowed:
        raise ValueError(f"the {family} task cannot train preset {preset!r}; expected one of {sorted(allowed)}")
    options = dict(options or {})
    names = {f.name for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise ValueError(f"{family}: unknown options {unknown}; expected some of {sorted(names)}")
    opts = cls.Options(**options)
    loop = loop if loop is not None else LoopConfig(**getattr(cls, "loop_defaults", {}))
    task = cls(preset, opts, loop)
    task.run_config = {"family": family, "preset": getattr(task, "preset", preset), **dataclasses.asdict(opts)}
    return task
