"""Single-file checkpoints: params, optimizer state and extras in one verified safetensors file.

Layout of the file (all ordinary safetensors; the params alone load with any safetensors reader):

- ``<param key>``: every leaf of the params tree under its flat key (``"blocks.0.w"``);
- ``state.<state key>``: the model state (batch-norm statistics, ...), a tree of its own beside
  the params (``state=``), listed in ``polymodal.state``;
- ``optim.state.<param key>.<name>``: optimizer state tensors (``exp_avg``, ``step``, ...);
- ``optim.param_groups.<i>`` / ``extra.<i>``: tensors found in hyperparameters / extras;
- metadata ``polymodal.*``: format tag, step, optimizer class and param groups (JSON), extras
  (JSON), and integrity hashes: one sha256 per tensor over ``dtype``, ``shape`` and bytes, and
  one over the other metadata entries. Loading verifies all of them before anything is returned.

>>> import tempfile, os, torch
>>> p = {"w": torch.ones(2, 3), "b": torch.zeros(2)}
>>> path = os.path.join(tempfile.mkdtemp(), "ckpt.safetensors")
>>> save_checkpoint(path, p, extra={"config": {"lr": 0.1}}, step=7)
>>> ck = load_checkpoint(path, like=p)
>>> ck.step, ck.extra, ck.params["w"].shape
(7, {'config': {'lr': 0.1}}, torch.Size([2, 3]))
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from polymodal.core.pytree import Params, atomic_write, check_like, flatten, unflatten
from polymodal.train.checkpoint.extras import decode, dumps as _dumps, encode
from polymodal.train.checkpoint.optim import load_optimizer_state, optimizer_entries

__all__ = ["CheckpointError", "Checkpoint", "save_checkpoint", "load_checkpoint", "verify", "read_entries"]

FORMAT = "polymodal.checkpoint/1"
META_FORMAT, META_STEP, META_OPTIM, META_EXTRA = "polymodal.format", "polymodal.step", "polymodal.optim", "polymodal.extra"
META_HASHES, META_META_HASH = "polymodal.sha256", "polymodal.sha256.metadata"
META_PARAMS = "polymodal.params"  # JSON list of the param keys in tree order (safetensors sorts its entries)
META_STATE = "polymodal.state"  # JSON list of the model-state keys in tree order (absent: no state saved)
RESERVED = ("optim", "extra", "polymodal", "state")  # top-level param names that would collide with entries


class CheckpointError(ValueError):
    """A checkpoint file is missing pieces, truncated, corrupted or does not match what is loaded into it."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path, self.problem = os.fspath(path), problem
        super().__init__(f"checkpoint {self.path!r}: {problem}")


class Checkpoint(NamedTuple):
    """What a load returns: the step (``None`` if not saved), the params tree, the extras and the
    model state tree (``None`` when the file holds none)."""

    step: int | None
    params: Params
    extra: dict
    state: Params | None = None


# ---------------------------------------------------------------- integrity


def digest(t: Tensor) -> str:
    """sha256 over the dtype, the shape and the raw bytes of ``t``."""
    h = hashlib.sha256(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}".encode())
    if t.numel():
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _meta_digest(meta: Mapping[str, str]) -> str:
    return hashlib.sha256(_dumps({k: v for k, v in meta.items() if k != META_META_HASH}).encode()).hexdigest()


def _save_file(tensors: dict[str, Tensor], path: str, metadata: dict[str, str]) -> None:
    """safetensors' ``save_file`` into ``path``; the writer's own temp file (``.tmpXXXXXX`` beside its
    target) goes into a folder ``path + ".d"`` that we own, so a kill leaves only names we clean up."""
    import shutil

    from safetensors.torch import save_file

    folder = path + ".d"
    os.makedirs(folder, exist_ok=True)
    try:
        save_file(tensors, os.path.join(folder, "data"), metadata=metadata)
        os.replace(os.path.join(folder, "data"), path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def fsync_dir(directory: str) -> None:
    """Make a rename inside ``directory`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_entries(path: str | os.PathLike, entries: Mapping[str, Tensor], meta: Mapping[str, str]) -> None:
    """Atomically write ``entries`` + ``meta`` with integrity hashes (temp file, fsync, rename, fsync dir)."""
    path = os.fspath(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in entries.items()}
    meta = {**meta, META_FORMAT: FORMAT, META_HASHES: _dumps({k: digest(v) for k, v in tensors.items()})}
    meta[META_META_HASH] = _meta_digest(meta)
    atomic_write(path, lambda tmp: _save_file(tensors, tmp, meta))
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def read_header(path: str) -> dict:
    """Parse the safetensors header and check the file size against it (names truncation)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if size < 8:
            raise CheckpointError(path, f"truncated: {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", f.read(8))
        if 8 + n > size:
            raise CheckpointError(path, f"truncated or corrupted: header of {n} bytes but the file has {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise CheckpointError(path, f"corrupted header ({type(e).__name__}: {e})") from None
    data = max(ends, default=0)
    if 8 + n + data > size:
        raise CheckpointError(path, f"truncated: header describes {8 + n + data} bytes, the file has {size}")
    if 8 + n + data < size:
        raise CheckpointError(path, f"corrupted: {size - 8 - n - data} unexpected bytes after the tensor data")
    return header


def read_entries(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read and verify every tensor and the metadata of a checkpoint file.

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: truncated, corrupted (hash mismatch), or not a polymodal checkpoint.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path!r}")
    meta = read_header(path).get("__metadata__") or {}
    if not isinstance(meta, dict) or META_FORMAT not in meta:
        raise CheckpointError(path, "no polymodal metadata: not a polymodal checkpoint or the header is corrupted "
                              "(plain safetensors params load with polymodal.core.pytree.load)")
    if meta[META_FORMAT] != FORMAT:
        raise CheckpointError(path, f"unknown format {meta[META_FORMAT]!r}, expected {FORMAT!r}")
    if meta.get(META_META_HASH) != _meta_digest(meta):
        raise CheckpointError(path, "corrupted: the metadata does not match its sha256")
    try:
        tensors = load_file(path, device="cpu")
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(path, f"unreadable safetensors data (truncated or corrupted?): {e}") from e
    try:
        hashes = dict(json.loads(meta[META_HASHES]))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(path, f"malformed integrity metadata ({type(e).__name__}: {e})") from None
    if set(hashes) != set(tensors):
        missing, unexpected = sorted(set(hashes) - set(tensors)), sorted(set(tensors) - set(hashes))
        raise CheckpointError(path, f"corrupted: entries missing {missing}, unexpected {unexpected}")
    bad = sorted(k for k, t in tensors.items() if digest(t) != hashes[k])
    if bad:
        raise CheckpointError(path, f"corrupted: sha256 mismatch in {len(bad)} tensor(s): {', '.join(bad[:10])}")
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, meta


def verify(path: str | os.PathLike) -> None:
    """Check a checkpoint file's integrity; raise :class:`CheckpointError` naming the problem.

    >>> verify("/nonexistent.safetensors")
    Traceback (most recent call last):
    FileNotFoundError: no checkpoint file at '/nonexistent.safetensors'
    """
    read_entries(path)


# ---------------------------------------------------------------- collect / restore


def collect(params: Params, optimizer: torch.optim.Optimizer | None = None, extra: Mapping[str, Any] | None = None,
            step: int | None = None, state: Params | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The entries and string metadata of a checkpoint (shared by the single-file and sharded writers)."""
    flat = flatten(params)
    clash = sorted(k for k in flat if k.split(".")[0] in RESERVED)
    if clash:
        raise ValueError(f"param names {clash[:5]} collide with the checkpoint's reserved top-level names {RESERVED}")
    entries: dict[str, Tensor] = dict(flat)
    meta: dict[str, str] = {META_PARAMS: _dumps(list(flat))}
    if step is not None:
        meta[META_STEP] = str(int(step))
    if state is not None:
        flat_state = flatten(state)
        entries.update({f"state.{k}": v for k, v in flat_state.items()})
        meta[META_STATE] = _dumps(list(flat_state))
    if optimizer is not None:
        tensors, info = optimizer_entries(optimizer, params)
        entries.update(tensors)
        meta[META_OPTIM] = _dumps(info)
    if extra:
        names: list[str] = []

        def put(t: Tensor) -> str:
            names.append(f"extra.{len(names)}")
            entries[names[-1]] = t
            return names[-1]

        meta[META_EXTRA] = _dumps(encode(dict(extra), put))
    return entries, meta


def check_params(path: str, flat: Mapping[str, Tensor], like: Params) -> None:
    """:func:`check_like` as a :class:`CheckpointError` naming the file."""
    try:
        check_like(flat, like, what="the saved tree")
    except ValueError as e:
        raise CheckpointError(path, str(e)) from None


def _restore_state(path: str, entries: dict[str, Tensor], meta: Mapping[str, str],
                   state_like: Params | None) -> Params | None:
    """The ``state.*`` entries as a tree (checked against ``state_like`` and placed like it when given)."""
    if META_STATE not in meta:
        return None
    try:
        order = json.loads(meta[META_STATE])
        flat = {k: entries[f"state.{k}"] for k in order}
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(path, f"malformed polymodal state metadata ({type(e).__name__}: {e})") from None
    if state_like is None:
        return unflatten(flat) if flat else {}
    try:
        check_like(flat, state_like, what="the saved state")
    except ValueError as e:
        raise CheckpointError(path, str(e)) from None
    return unflatten({k: flat[k].to(device=ref.device, dtype=ref.dtype) for k, ref in flatten(state_like).items()})


def restore(path: str, entries: dict[str, Tensor], meta: Mapping[str, str], like: Params | None,
            optimizer: torch.optim.Optimizer | None, state_like: Params | None = None) -> Checkpoint:
    """Check ``entries`` against ``like`` / ``optimizer`` / ``state_like`` and build the
    :class:`Checkpoint` (shared by loaders)."""
    flat = {k: v for k, v in entries.items() if k.split(".")[0] not in RESERVED}
    model_state = _restore_state(path, entries, meta, state_like)
    try:  # hashed, so only a file written by something else can fail here
        order = json.loads(meta.get(META_PARAMS, "[]"))
        extra = decode(json.loads(meta[META_EXTRA]), lambda name: entries[name]) if META_EXTRA in meta else {}
        step = int(meta[META_STEP]) if META_STEP in meta else None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(path, f"malformed polymodal metadata ({type(e).__name__}: {e})") from None
    if set(order) == set(flat):
        flat = {k: flat[k] for k in order}
    if like is not None:
        check_params(path, flat, like)
    if optimizer is None:
        if like is None:
            return Checkpoint(step, unflatten(flat), extra, model_state)
        out = {}
        for k, ref in flatten(like).items():
            t = flat[k].to(device=ref.device, dtype=ref.dtype)
            out[k] = t.requires_grad_(ref.requires_grad) if t.is_floating_point() or t.is_complex() else t
        return Checkpoint(step, unflatten(out), extra, model_state)
    if like is None:
        raise ValueError("loading optimizer state needs like=<the params tree the optimizer was built over>")
    if META_OPTIM not in meta:
        raise CheckpointError(path, "has no optimizer state (it was saved without optimizer=)")
    state = {k: v for k, v in entries.items() if k.startswith("optim.")}
    try:
        load_optimizer_state(optimizer, like, state, json.loads(meta[META_OPTIM]))
    except ValueError as e:
        raise CheckpointError(path, str(e)) from None
    with torch.no_grad():  # the optimizer holds like's leaves: the loaded values go into them
        for k, ref in flatten(like).items():
            if flat[k] is not ref:
                ref.copy_(flat[k])
    return Checkpoint(step, like, extra, model_state)


def save_checkpoint(path: str | os.PathLike, params: Params, optimizer: torch.optim.Optimizer | None = None, *,
                    extra: Mapping[str, Any] | None = None, step: int | None = None,
                    state: Params | None = None) -> None:
    """Write params (and optimizer state, extras, step) to one safetensors file, atomically.

    Args:
        path: the file; written as a temp file in the same directory, fsynced, then renamed.
        params: the params tree.
        optimizer: a ``torch.optim`` optimizer built over leaves of ``params`` (e.g.
            ``AdamW(leaves(params))``); its state is stored per param key, so it loads back into
            an optimizer whose params come in any order.
        extra: JSON values, tuples and tensors (config, random key, data position, ...).
        step: the training step, returned by :func:`load_checkpoint`.
        state: the model state (batch-norm statistics, ...): a tree stored beside the params,
            never mixed into them, and not touched by the optimizer.
    """
    write_entries(path, *collect(params, optimizer, extra, step, state))


def load_checkpoint(path: str | os.PathLike, like: Params | None = None, optimizer: torch.optim.Optimizer | None = None,
                    *, device: str | torch.device = "cpu", state_like: Params | None = None) -> Checkpoint:
    """Read a file written by :func:`save_checkpoint`, verifying every hash first.

    Args:
        path: the file.
        like: the expected tree: missing, unexpected and mis-shaped keys are named in a
            :class:`CheckpointError`; leaves take ``like``'s dtype, device and ``requires_grad``.
        optimizer: restore its state too. It must be built over the leaves of ``like``; the
            loaded values are then copied *into* ``like``'s leaves (as ``load_state_dict`` does)
            so the optimizer keeps driving them, and ``like`` itself is returned as ``params``.
        device: where tensors go when ``like`` is not given.
        state_like: the expected model-state tree (checked and placed like ``like``).

    Returns:
        ``Checkpoint(step, params, extra, state)``. Nothing is modified unless every check passed.
    """
    path = os.fspath(path)
    entries, meta = read_entries(path, device=device if like is None else "cpu")
    return restore(path, entries, meta, like, optimizer, state_like)
