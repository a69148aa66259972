"""Moved to :mod:`polymodal.torchscript` (the hub reads TorchScript archives for every family)."""

from ...torchscript import is_torchscript, read_torchscript_tensors

__all__ = ["is_torchscript", "read_torchscript_tensors"]
