"""Checkpoints: verified single files, run directories, and sharded (DCP) checkpoints.

- :func:`save_checkpoint` / :func:`load_checkpoint`: params + ``torch.optim`` state + extras, and
  the model state (batch-norm statistics) as a tree of its own (``state=``), in one safetensors
  file with per-tensor sha256; a truncated or corrupted file raises
  :class:`CheckpointError` (a ``ValueError``) naming the file and the problem.
- :class:`RunDir`: ``ckpt-{step:08d}.safetensors`` files, a ``latest.json`` pointer, keep-last-N,
  every write atomic.
- :func:`save_sharded` / :func:`load_sharded` / :func:`consolidate`: DTensor params through
  ``torch.distributed.checkpoint``, loadable at another world size, gathered into one file.

>>> import tempfile, torch
>>> from polymodal.core.pytree import leaves
>>> p = {"w": torch.ones(2, requires_grad=True)}
>>> opt = torch.optim.AdamW(leaves(p), lr=0.1)
>>> run = RunDir(tempfile.mkdtemp())
>>> _ = run.save(1, p, opt, extra={"config": {"lr": 0.1}})
>>> opt2 = torch.optim.AdamW(leaves(p), lr=0.5)
>>> run.load(like=p, optimizer=opt2).step, opt2.param_groups[0]["lr"]
(1, 0.1)
"""

from polymodal.train.checkpoint.file import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint, verify
from polymodal.train.checkpoint.run import CheckpointSaveError, RunDir, RunInfo
from polymodal.train.checkpoint.sharded import consolidate, load_sharded, save_sharded

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointSaveError",
    "save_checkpoint",
    "load_checkpoint",
    "verify",
    "RunDir",
    "RunInfo",
    "save_sharded",
    "load_sharded",
    "consolidate",
]
