"""Distribution: process groups and meshes (``ranks``), FSDP-style sharding over pytrees
(``sharding``) and ``fully_shard`` over shells (``fsdp``)."""

from .ranks import free_port, is_distributed, mean_over_ranks, mesh_from_env, run_ranks

__all__ = ["mesh_from_env", "free_port", "run_ranks", "is_distributed", "mean_over_ranks"]
