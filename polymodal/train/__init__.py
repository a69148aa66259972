"""Training: per-sample gradients, DP-SGD and accountants, sharding, activation checkpointing, checkpoints.

The submodules hold the full APIs; the names below are the common entry points.
"""

from .checkpoint import CheckpointError, RunDir, load_checkpoint, save_checkpoint
from .checkpointing import training_policy
from .dp import DPSGD, dp_train_step
from .per_sample import per_sample_grad_norms, per_sample_grads
from .privacy import PRVAccountant, RDPAccountant, epsilon, noise_multiplier_for_epsilon
from .sampling import PoissonBatchSampler
from .sharding import MixedPrecision, gather_policy, gather_rest, shard_params

__all__ = [
    "CheckpointError", "RunDir", "load_checkpoint", "save_checkpoint", "training_policy", "DPSGD", "dp_train_step",
    "per_sample_grad_norms", "per_sample_grads", "PRVAccountant", "RDPAccountant", "epsilon",
    "noise_multiplier_for_epsilon", "PoissonBatchSampler", "MixedPrecision", "gather_policy", "gather_rest",
    "shard_params",
]
