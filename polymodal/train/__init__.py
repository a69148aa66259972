"""Training: the one loop and its Task protocol, per-sample gradients, DP-SGD and accountants, sharding,
activation checkpointing, checkpoints.

The submodules hold the full APIs; the names below are the common entry points::

    from polymodal.train import LoopConfig, make_task, train
    loop = LoopConfig(steps=300, out="runs/clip")
    train(make_task("clip", "tiny", {}, loop), loop)
"""

from .checkpoint import CheckpointError, RunDir, load_checkpoint, save_checkpoint
from .loop import LoopConfig, resolve_device, train
from .runs import Run, load_run
from .task import LossOutput, Task, make_task, option
from .policy import training_policy
from .dp import DPSGD, dp_train_step
from .dp.per_sample import per_sample_grad_norms, per_sample_grads
from .dp import PRVAccountant, RDPAccountant, epsilon, noise_multiplier_for_epsilon
from .dp.sampling import PoissonBatchSampler
from .distributed.sharding import MixedPrecision, gather_policy, gather_rest, shard_params

__all__ = [
    "LoopConfig", "train", "resolve_device", "Task", "LossOutput", "make_task", "option", "Run", "load_run",
    "CheckpointError", "RunDir", "load_checkpoint", "save_checkpoint", "training_policy", "DPSGD", "dp_train_step",
    "per_sample_grad_norms", "per_sample_grads", "PRVAccountant", "RDPAccountant", "epsilon",
    "noise_multiplier_for_epsilon", "PoissonBatchSampler", "MixedPrecision", "gather_policy", "gather_rest",
    "shard_params",
]
