"""Process groups and device meshes: from torchrun's environment, or spawned locally.

Training code is the same on one CPU, on several gloo ranks and on several GPUs under
``torchrun``: :func:`mesh_from_env` starts the process group from the environment that
``torchrun`` sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``), picking gloo on CPU and nccl on GPU, and returns a 1-D
:class:`~torch.distributed.device_mesh.DeviceMesh` over all ranks. :func:`run_ranks` spawns
``N`` local processes with exactly that environment (for tests and benchmarks) and returns
what each rank's function returned.

>>> import torch
>>> def world(mesh):
...     return mesh.size(), torch.distributed.get_rank()
>>> run_ranks(world, 2)  # doctest: +SKIP
[(2, 0), (2, 1)]
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["mesh_from_env", "free_port", "run_ranks", "is_distributed", "mean_over_ranks"]

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def is_distributed() -> bool:
    """Whether a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def _device_type_of_backend(backend: str) -> str:
    return "cuda" if "nccl" in backend else "cpu"


def mesh_from_env(
    device_type: str | None = None,
    backend: str | None = None,
    timeout: datetime.timedelta | None = None,
) -> DeviceMesh:
    """A 1-D mesh over every rank, starting the process group from torchrun's env if needed.

    Args:
        device_type: ``"cpu"`` or ``"cuda"``; default: ``"cuda"`` when a GPU is visible, else ``"cpu"``
            (for an already started group: the device its backend drives).
        backend: process-group backend; default ``"nccl"`` for cuda, ``"gloo"`` for cpu.
        timeout: collective timeout for a group started here.

    Raises:
        RuntimeError: no process group and the torchrun variables are missing.
    """
    if not is_distributed():
        missing = [v for v in _ENV if v not in os.environ]
        if missing:
            raise RuntimeError(
                f"mesh_from_env: expected torchrun's environment ({', '.join(_ENV)}), missing {missing}; "
                "launch with `torchrun --nproc-per-node=N ...` or call torch.distributed.init_process_group first"
            )
        if device_type is None:
            device_type = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() > 0 else "cpu"
        backend = backend or ("nccl" if device_type == "cuda" else "gloo")
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        kwargs = {} if timeout is None else {"timeout": timeout}
        dist.init_process_group(backend, **kwargs)
    elif device_type is None:
        device_type = _device_type_of_backend(str(dist.get_backend()))
    return init_device_mesh(device_type, (dist.get_world_size(),))


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over all ranks (``x`` itself without a process group); not differentiable."""
    if not is_distributed():
        return x.detach()
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / dist.get_world_size()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, fn: Callable, world_size: int, port: int, out_dir: str, threads: int, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    mesh = mesh_from_env("cpu", timeout=datetime.timedelta(seconds=300))
    try:
        result = fn(mesh, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int = 2, *args: Any, threads: int = 1) -> list[Any]:
    """Run ``fn(mesh, *args)`` on ``world_size`` spawned CPU ranks over gloo; their return values in rank order.

    Each rank gets torchrun's environment with a free ``MASTER_PORT`` on 127.0.0.1 and builds
    its mesh through :func:`mesh_from_env`. ``fn`` must be importable (module level) and return
    something ``torch.save`` can write. A failing rank raises here with its traceback.
    """
    import torch.multiprocessing as mp

    if world_size < 1:
        raise ValueError(f"run_ranks: expected world_size >= 1, got {world_size}")
    with tempfile.TemporaryDirectory(prefix="polymodal-ranks-") as out_dir:
        mp.spawn(_rank_main, args=(fn, world_size, free_port(), out_dir, threads, args), nprocs=world_size)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world_size)]
