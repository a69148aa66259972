"""Parameter pytrees: nested ``dict``/``list`` of tensors, keyed like ``state_dict``.

A :data:`Params` tree is a nested ``dict[str, Tensor | dict | list]``. Lists hold
repeated blocks; their positions become integer segments in flat keys, so
``flatten(params)`` yields exactly the keys a torch module's ``state_dict()`` of the
same structure would.

>>> import torch
>>> p = {"blocks": [{"w": torch.zeros(2)}, {"w": torch.ones(2)}], "head": {"b": torch.zeros(1)}}
>>> sorted(flatten(p))
['blocks.0.w', 'blocks.1.w', 'head.b']
>>> unflatten(flatten(p))["blocks"][1]["w"]
tensor([1., 1.])
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Union

import torch
from torch import Tensor

Params = dict[str, Union[Tensor, "Params", list]]

__all__ = [
    "Params",
    "flatten",
    "unflatten",
    "leaves",
    "tree_map",
    "num_params",
    "num_bytes",
    "cast",
    "check_like",
    "mismatch_error",
    "save",
    "load",
    "to_numpy",
    "from_numpy",
    "to_jax",
    "from_jax",
]


def _items(tree: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            if not isinstance(k, str) or "." in k:
                raise ValueError(f"param names must be strings without '.', got {k!r} under {prefix!r}")
            yield from _items(v, f"{prefix}{k}.")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _items(v, f"{prefix}{i}.")
    elif tree is None:
        return
    else:
        yield prefix[:-1], tree


def flatten(tree: Params) -> dict[str, Tensor]:
    """Flat ``{"a.b.0.c": leaf}`` view of a tree (insertion order, ``None`` leaves skipped)."""
    return dict(_items(tree, ""))


def leaves(tree: Params) -> list[Tensor]:
    """The leaves of ``tree`` in :func:`flatten` order."""
    return [v for _, v in _items(tree, "")]


def unflatten(flat: Mapping[str, Any]) -> Params:
    """Inverse of :func:`flatten`: integer segments whose siblings are 0..n-1 become lists."""
    root: dict = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"key {key!r} nests under a leaf")
        if parts[-1] in node:
            raise ValueError(f"duplicate key {key!r}")
        node[parts[-1]] = value

    def listify(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        out = {k: listify(v) for k, v in node.items()}
        if out and all(k.isdigit() for k in out):
            idx = sorted(int(k) for k in out)
            if idx == list(range(len(idx))):
                return [out[str(i)] for i in idx]
        return out

    return listify(root)


def tree_map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """Apply ``fn`` leaf-wise over one or several trees of the same structure."""
    if isinstance(tree, Mapping):
        for r in rest:
            if not isinstance(r, Mapping) or set(r) != set(tree):
                raise ValueError(f"tree structures differ: keys {sorted(tree)} vs {sorted(r) if isinstance(r, Mapping) else type(r).__name__}")
        return {k: tree_map(fn, tree[k], *(r[k] for r in rest)) for k in tree}
    if isinstance(tree, (list, tuple)):
        for r in rest:
            if not isinstance(r, (list, tuple)) or len(r) != len(tree):
                raise ValueError(f"tree structures differ: list of {len(tree)} vs {r!r:.60}")
        return type(tree)(tree_map(fn, *xs) for xs in zip(tree, *rest))
    if tree is None:
        return None
    return fn(tree, *rest)


def num_params(tree: Params) -> int:
    """Total number of scalar parameters."""
    return sum(t.numel() for t in leaves(tree))


def num_bytes(tree: Params) -> int:
    """Total storage of the leaves in bytes."""
    return sum(t.numel() * t.element_size() for t in leaves(tree))


def cast(tree: Params, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Params:
    """Move/cast every leaf; only floating leaves change dtype (integer state keeps its type)."""

    def f(t: Tensor) -> Tensor:
        d = dtype if (dtype is not None and t.is_floating_point()) else None
        return t.to(device=device, dtype=d)

    return tree_map(f, tree)


def mismatch_error(header: str, missing: Sequence[str], unexpected: Sequence[str],
                   mismatched: Sequence[str]) -> ValueError:
    """The error of a checkpoint that does not fit: ``header``, then each non-empty list of keys."""
    lines = [header]
    for label, keys, sep in (("missing keys", missing, ", "), ("unexpected keys", unexpected, ", "),
                             ("shape mismatches", mismatched, "; ")):
        if keys:
            lines.append(f"  {label} ({len(keys)}): {sep.join(keys)}")
    return ValueError("\n".join(lines))


def check_like(flat: Mapping[str, Tensor], like: Params, what: str = "checkpoint") -> None:
    """Raise ``ValueError`` naming every missing, unexpected and shape-mismatched key."""
    expected = {k: tuple(v.shape) for k, v in flatten(like).items()}
    got = {k: tuple(v.shape) for k, v in flat.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = sorted(
        f"{k}: expected {expected[k]}, got {got[k]}" for k in set(expected) & set(got) if expected[k] != got[k]
    )
    if missing or unexpected or mismatched:
        raise mismatch_error(f"{what} does not match the expected parameters:", missing, unexpected, mismatched)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Run ``write(tmp_path)`` then atomically rename onto ``path``.

    A crash mid-write leaves whatever was at ``path`` before intact. The file gets the mode any
    newly created file gets (``0o666`` less the umask), like ``open(path, "w")``: neither
    ``tempfile.mkstemp``'s ``0o600`` nor that of a writer's own temp file (safetensors renames
    one onto ``tmp_path``) survives the rename.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    while True:
        tmp = os.path.join(directory, f".tmp-{secrets.token_hex(4)}{os.path.basename(path)}")
        try:  # created like any new file, so its mode is 0o666 less the umask (no process-wide os.umask call)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:
            continue
    try:
        mode = os.fstat(fd).st_mode & 0o777
        os.close(fd)
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(path: str | os.PathLike, params: Params, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``params`` to a single safetensors file, atomically."""
    from safetensors.torch import save_file

    flat = {k: v.detach().contiguous().cpu() for k, v in flatten(params).items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=dict(metadata) if metadata else None))


def load(path: str | os.PathLike, like: Params | None = None, device: str | torch.device = "cpu") -> Params:
    """Read a safetensors file written by :func:`save`.

    Args:
        path: the file.
        like: optional expected tree; every missing, unexpected or mis-shaped key is named
            in the ``ValueError``, and leaves are cast to the dtypes of ``like``.
        device: where to put the tensors.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path!r}")
    try:
        flat = load_file(path, device=str(device))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path!r} is not a readable safetensors file (truncated or corrupted?): {e}") from e
    if like is not None:
        check_like(flat, like, what=f"checkpoint {path!r}")
        ref = flatten(like)
        flat = {k: flat[k].to(ref[k].dtype) for k in ref}
    return unflatten(flat)


def to_numpy(tree: Params) -> Any:
    """Leaves as numpy arrays (shares memory for CPU tensors)."""
    return tree_map(lambda t: t.detach().cpu().numpy(), tree)


def from_numpy(tree: Any) -> Params:
    """numpy leaves to tensors (shares memory)."""
    return tree_map(lambda a: torch.from_numpy(a), tree)


def to_jax(tree: Params, *, copy: bool = False) -> Any:
    """Leaves as JAX arrays through DLPack (no copy where the device allows).

    .. warning::
        By default the JAX arrays **share memory** with the tensors: an in-place torch update
        (``optimizer.step()``, ``p.add_(...)``, a shell's ``load_state_dict``) changes the
        supposedly immutable JAX arrays too, and JAX may have cached computations on the old
        values. Pass ``copy=True`` for independent arrays (one copy of every leaf), or never
        modify the tensors while the JAX arrays are alive.

    64-bit leaves need ``jax.config.update("jax_enable_x64", True)``; without it JAX would
    silently narrow them, so this raises instead.

    Args:
        tree: params tree of tensors.
        copy: copy every leaf instead of sharing its memory.

    >>> import torch
    >>> t = {"w": torch.zeros(2)}
    >>> shared, own = to_jax(t), to_jax(t, copy=True)
    >>> _ = t["w"].add_(1.0)
    >>> shared["w"].tolist(), own["w"].tolist()
    ([1.0, 1.0], [0.0, 0.0])
    """
    import jax
    import jax.dlpack

    if not jax.config.jax_enable_x64:
        wide = [k for k, v in flatten(tree).items() if v.dtype in (torch.float64, torch.int64, torch.complex128)]
        if wide:
            raise TypeError(
                f"64-bit leaves {wide} would be narrowed by JAX; enable x64 "
                "(jax.config.update('jax_enable_x64', True)) or cast them first (pytree.cast)"
            )

    return tree_map(lambda t: jax.dlpack.from_dlpack(t.detach().clone() if copy else t.detach().contiguous()), tree)


def from_jax(tree: Any, *, copy: bool = False) -> Params:
    """JAX arrays back to tensors through DLPack (no copy where the device allows).

    .. warning::
        By default the tensors **share memory** with the JAX arrays: an in-place update of a
        tensor (an optimizer step on it) silently changes the JAX array, which JAX treats as
        immutable. Pass ``copy=True`` when the tensors will be modified in place.

    Args:
        tree: pytree of JAX arrays (nested dicts / lists).
        copy: copy every leaf instead of sharing its memory.
    """
    from torch.utils.dlpack import from_dlpack

    return tree_map(lambda a: from_dlpack(a).clone() if copy else from_dlpack(a), tree)
