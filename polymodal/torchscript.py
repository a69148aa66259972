"""Read the tensors of a TorchScript archive (e.g. OpenAI's CLIP ``.pt`` files) without running its code.

OpenAI published CLIP as TorchScript archives. ``torch.jit.load`` would compile and hold the
archive's code; ``torch.load(weights_only=True)`` refuses TorchScript. This reader instead
opens the zip, unpickles ``data.pkl`` with an unpickler that resolves only three kinds of
globals — TorchScript module classes (``__torch__.*``, replaced by an inert attribute holder),
torch's tensor-rebuild functions and storage types, and ``collections.OrderedDict`` — and
reads the raw tensor bytes from ``data/``. Anything else in the pickle is an error, so no
code from the file runs. The module tree's tensor attributes come back under their
``state_dict`` names.

>>> import io, torch
>>> buf = io.BytesIO()
>>> torch.jit.save(torch.jit.trace(torch.nn.Linear(2, 3), torch.ones(1, 2)), buf)
>>> sorted(read_torchscript_tensors(io.BytesIO(buf.getvalue())))
['bias', 'weight']
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from typing import IO, Any

import torch
from torch import Tensor

__all__ = ["is_torchscript", "read_torchscript_tensors"]

_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _Module:
    """Stand-in for a TorchScript class: records the attributes the pickle sets, nothing else."""

    attrs: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:  # NEWOBJ skips __init__; BUILD calls this
        self.attrs = dict(state) if isinstance(state, dict) else {}


class _StorageType:
    def __init__(self, name: str) -> None:
        self.dtype = _DTYPES[name]


def _rebuild_tensor(storage: Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> Tensor:
    return storage.as_strided(tuple(size), tuple(stride), offset)


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(io.BytesIO(data))
        self._archive, self._prefix = archive, prefix

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return type(name, (_Module,), {})
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad, hooks: data
        if module == "torch" and name in _DTYPES:
            return _StorageType(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"TorchScript archive: refusing to load global {module}.{name} "
                                     "(only module attributes, tensors and storages are read)")

    def persistent_load(self, pid: Any) -> Tensor:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"TorchScript archive: unsupported persistent id {pid!r:.80}")
        storage_type, key, _location, numel = pid[1:5]
        raw = bytearray(self._archive.read(f"{self._prefix}data/{key}"))
        t = torch.frombuffer(raw, dtype=storage_type.dtype) if raw else torch.empty(0, dtype=storage_type.dtype)
        return t[:numel]


def _prefix(archive: zipfile.ZipFile) -> str | None:
    for name in archive.namelist():
        if name.endswith("data.pkl") and name.count("/") == 1:
            return name[: -len("data.pkl")]
    return None


def is_torchscript(f: str | os.PathLike | IO[bytes]) -> bool:
    """Whether ``f`` is a zip archive with TorchScript code (``code/`` or ``constants.pkl``)."""
    try:
        with zipfile.ZipFile(f) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    finally:
        if hasattr(f, "seek"):
            f.seek(0)
    return any(n.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for n in names)


def _walk(obj: Any, prefix: str, out: dict[str, Tensor]) -> None:
    if isinstance(obj, _Module):
        for k, v in obj.attrs.items():
            _walk(v, f"{prefix}{k}.", out)
    elif isinstance(obj, Tensor):
        out[prefix[:-1]] = obj


def read_torchscript_tensors(f: str | os.PathLike | IO[bytes]) -> dict[str, Tensor]:
    """Every tensor attribute of the archive's module tree, keyed like ``state_dict``.

    Plain tensor attributes that are not parameters or buffers (OpenAI's ``attn_mask``) are
    included too; the tensors are copies, independent of the file.
    """
    with zipfile.ZipFile(f) as archive:
        prefix = _prefix(archive)
        if prefix is None:
            raise ValueError("TorchScript archive: no data.pkl found")
        root = _Unpickler(archive.read(prefix + "data.pkl"), archive, prefix).load()
    out: dict[str, Tensor] = {}
    _walk(root, "", out)
    return {k: v.clone() for k, v in out.items()}
