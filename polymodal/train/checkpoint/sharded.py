"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP), for DTensor params.

Each rank writes its own shards; loading reshards to whatever placement and world size the
``like`` tree has (a 2-rank checkpoint loads into 1 process with plain tensors, or into 4
ranks with another sharding). The entries are the same as in a single-file checkpoint
(``<param key>``, ``optim.state.<key>.<name>``, ...), plus ``polymodal.meta``: the metadata
JSON as a uint8 tensor, so nothing in the payload needs pickle. DCP's own index
(``.metadata``) is a pickle: it is read with :class:`~polymodal.train.checkpoint.dcp_metadata.SafeFileSystemReader`,
which admits only DCP's metadata types, so a crafted checkpoint cannot run code on load
(:class:`~polymodal.train.checkpoint.dcp_metadata.UnsafeMetadataError`). Without an initialised
process group everything runs in the one process.

The save goes to ``<dir>.partial`` and is renamed to ``<dir>`` once DCP has written its
``.metadata`` (the last file of a complete checkpoint); an older ``<dir>`` is moved aside
to ``<dir>.old`` during the swap, and loading falls back to it if a crash hit in between.

>>> import tempfile, os, torch
>>> d = os.path.join(tempfile.mkdtemp(), "sharded")
>>> p = {"w": torch.arange(6.0).reshape(3, 2)}
>>> save_sharded(d, p, extra={"epoch": 1})
>>> ck = load_sharded(d, like={"w": torch.zeros(3, 2)})
>>> ck.params["w"][2].tolist(), ck.extra
([4.0, 5.0], {'epoch': 1})
>>> consolidate(d, d + ".safetensors")
>>> from polymodal.train.checkpoint import load_checkpoint
>>> load_checkpoint(d + ".safetensors").params["w"].shape
torch.Size([3, 2])
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from polymodal.core.pytree import Params, flatten
from polymodal.train.checkpoint.file import (
    RESERVED, Checkpoint, CheckpointError, check_params, collect, fsync_dir, restore, write_entries,
)
from polymodal.train.checkpoint.dcp_metadata import SafeFileSystemReader

__all__ = ["save_sharded", "load_sharded", "consolidate"]

_META = "polymodal.meta"


def _dist() -> tuple[bool, int]:
    import torch.distributed as dist

    on = dist.is_available() and dist.is_initialized()
    return on, (dist.get_rank() if on else 0)


@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    # DCP warns on every single-process save/load; running without a process group is intended here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    import torch.distributed as dist

    if _dist()[0]:
        dist.barrier()


def save_sharded(path: str | os.PathLike, params: Params, optimizer: torch.optim.Optimizer | None = None, *,
                 extra: Mapping[str, Any] | None = None, step: int | None = None) -> None:
    """Save a (possibly DTensor-sharded) params tree and optimizer state with DCP; collective.

    Args:
        path: the checkpoint directory (on a filesystem every rank sees).
        params: leaves are tensors or DTensors; plain tensors count as replicated.
        optimizer, extra, step: as for :func:`save_checkpoint`; extras are JSON and tensors.
    """
    import torch.distributed.checkpoint as dcp

    path = os.fspath(path)
    on, rank = _dist()
    entries, meta = collect(params, optimizer, extra, step)
    entries[_META] = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
    partial, old = path + ".partial", path + ".old"
    if rank == 0 and os.path.exists(partial):
        shutil.rmtree(partial)
    _barrier()
    with _single_process_ok():
        dcp.save(entries, storage_writer=dcp.FileSystemWriter(partial), no_dist=not on)
    if rank == 0:
        if os.path.exists(path):
            if os.path.exists(old):
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(partial, path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
        shutil.rmtree(old, ignore_errors=True)
    _barrier()


def _checkpoint_dir(path: str) -> str:
    if not os.path.isfile(os.path.join(path, ".metadata")) and os.path.isfile(os.path.join(path + ".old", ".metadata")):
        return path + ".old"  # a crash hit between moving the old checkpoint aside and renaming the new one
    if not os.path.isdir(path):
        raise FileNotFoundError(f"no sharded checkpoint at {path!r}")
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise CheckpointError(path, "incomplete sharded checkpoint: no .metadata (the save did not finish)")
    return path


def _tensor_metadata(path: str) -> dict[str, Any]:
    from torch.distributed.checkpoint import TensorStorageMetadata

    try:
        md = SafeFileSystemReader(path).read_metadata().state_dict_metadata
    except (pickle.UnpicklingError, EOFError, AttributeError, KeyError, TypeError) as e:
        raise CheckpointError(path, f"unreadable or unsafe .metadata: {e}") from None
    if _META not in md:
        raise CheckpointError(path, f"not a polymodal sharded checkpoint (no {_META!r} entry)")
    return {k: m for k, m in md.items() if isinstance(m, TensorStorageMetadata)}


def _read_meta(path: str, md: dict[str, Any], no_dist: bool) -> dict[str, str]:
    import torch.distributed.checkpoint as dcp

    sd = {_META: torch.empty(tuple(md[_META].size), dtype=torch.uint8)}
    with _single_process_ok():
        dcp.load(sd, storage_reader=SafeFileSystemReader(path), no_dist=no_dist)
    return json.loads(bytes(sd[_META].numpy()).decode())


def load_sharded(path: str | os.PathLike, like: Params, optimizer: torch.optim.Optimizer | None = None) -> Checkpoint:
    """Load a :func:`save_sharded` checkpoint into the layout of ``like``; collective.

    Args:
        path: the checkpoint directory.
        like: the expected tree, tensors or DTensors placed as wanted (any world size); its
            keys and global shapes are checked first, every problem named.
        optimizer: restore its state too (built over ``like``'s leaves, which receive the loaded
            values in place once every check has passed). State tensors shaped like their param
            (``exp_avg``) are placed like the param; others (``step``) are plain tensors.

    Returns:
        ``Checkpoint(step, params, extra)``.
    """
    import torch.distributed.checkpoint as dcp

    path = _checkpoint_dir(os.fspath(path))
    md = _tensor_metadata(path)
    meta = _read_meta(path, md, no_dist=not _dist()[0])
    ref = flatten(like)
    saved = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype, device="meta") for k, m in md.items()}
    check_params(path, {k: v for k, v in saved.items() if k.split(".")[0] not in RESERVED}, like)
    targets: dict[str, Tensor] = {}
    for k, m in md.items():
        if k in ref:
            targets[k] = torch.empty_like(ref[k], dtype=m.properties.dtype)
        elif k.startswith("optim.state.") and optimizer is not None:
            pkey, name = k[len("optim.state."):].rsplit(".", 1)
            p = ref.get(pkey)
            if p is not None and name != "step" and tuple(m.size) == tuple(p.shape):
                targets[k] = torch.empty_like(p, dtype=m.properties.dtype)
            else:
                targets[k] = torch.empty(tuple(m.size), dtype=m.properties.dtype)
        elif (k.startswith("optim.other.") and optimizer is not None) or k.startswith("extra."):
            targets[k] = torch.empty(tuple(m.size), dtype=m.properties.dtype)
    with torch.no_grad(), _single_process_ok():
        dcp.load(targets, storage_reader=SafeFileSystemReader(path), no_dist=not _dist()[0])
    return restore(path, targets, meta, like, optimizer)


def consolidate(sharded_dir: str | os.PathLike, out_file: str | os.PathLike) -> None:
    """Gather a sharded checkpoint into one verified safetensors file (run it on one rank).

    The result is what :func:`save_checkpoint` would have written for the unsharded tree, so
    :func:`load_checkpoint` reads it, optimizer state included.
    """
    import torch.distributed.checkpoint as dcp

    path = _checkpoint_dir(os.fspath(sharded_dir))
    md = _tensor_metadata(path)
    sd = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in md.items()}
    with _single_process_ok():
        dcp.load(sd, storage_reader=SafeFileSystemReader(path), no_dist=True)
    meta = json.loads(bytes(sd.pop(_META).numpy()).decode())
    write_entries(out_file, sd, {k: v for k, v in meta.items() if not k.startswith("polymodal.sha256")})
