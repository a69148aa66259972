"""Reading a ``torch.distributed.checkpoint`` directory without running code from it.

DCP stores a checkpoint's index in ``.metadata`` as a plain pickle, and its
``FileSystemReader.read_metadata`` calls ``pickle.load`` on it: a crafted ``.metadata`` in a
run directory would run arbitrary code on load. :class:`SafeFileSystemReader` is that reader
with ``read_metadata`` replaced by a restricted unpickler that resolves only the globals a real
DCP index references (the dataclasses of ``torch.distributed.checkpoint.metadata``, DCP's
``_StorageInfo``, ``torch.Size``, dtypes, layouts, paths). Anything else raises
:class:`UnsafeMetadataError` naming the global, before any object is built from it. The
tensor payload itself is read by DCP with ``torch.load(weights_only=True)``.

The list was taken from the globals a 2-rank gloo checkpoint of DTensors, plain tensors and
AdamW state references (``pickletools``); see ``tests/train/test_checkpoint_security.py``.

>>> import tempfile, os, torch
>>> import torch.distributed.checkpoint as dcp
>>> d = tempfile.mkdtemp()
>>> _ = dcp.save({"w": torch.ones(2)}, storage_writer=dcp.FileSystemWriter(d), no_dist=True)
>>> sorted(SafeFileSystemReader(d).read_metadata().state_dict_metadata)
['w']
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

__all__ = ["SafeFileSystemReader", "UnsafeMetadataError", "load_metadata"]

_DCP_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[str, frozenset[str]] = {
    _DCP_METADATA: frozenset({
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING",
    }),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),  # maps "torch.strided" to the layout, nothing else
    "torch": frozenset({"Size"}),
    "pathlib": frozenset({"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}),
    "collections": frozenset({"OrderedDict"}),
}


class UnsafeMetadataError(pickle.UnpicklingError):
    """A DCP ``.metadata`` file references something other than checkpoint metadata types."""


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: str):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise UnsafeMetadataError(
            f"{self._path!r}: refusing to load global {module}.{name}: a DCP .metadata file may only "
            f"reference checkpoint metadata types ({_DCP_METADATA}.*, torch.Size, dtypes, paths); "
            "this file was not written by torch.distributed.checkpoint (or was tampered with)")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeMetadataError(f"{self._path!r}: unexpected persistent id {pid!r:.80} in a DCP .metadata file")


def load_metadata(path: str | os.PathLike) -> Metadata:
    """Unpickle one DCP ``.metadata`` file, admitting only the checkpoint metadata types.

    Raises:
        UnsafeMetadataError: the pickle references any other global, or is not a ``Metadata``,
            or a storage entry points outside the checkpoint directory.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        md = _Unpickler(f, path).load()
    if not isinstance(md, Metadata):
        raise UnsafeMetadataError(f"{path!r}: expected a torch.distributed.checkpoint Metadata, got {type(md).__name__}")
    for info in (md.storage_data or {}).values():  # shard files must be plain names inside the directory
        rel = getattr(info, "relative_path", "")
        if not isinstance(rel, str) or os.path.basename(rel) != rel or rel in ("", ".", ".."):
            raise UnsafeMetadataError(f"{path!r}: storage file {rel!r} is not a file name inside the checkpoint directory")
    return md


class SafeFileSystemReader(FileSystemReader):
    """``FileSystemReader`` whose ``read_metadata`` never runs code from the checkpoint (see module doc)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        md = load_metadata(self._get_metadata_path(kwargs.get("rank")))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md
