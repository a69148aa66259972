"""Poisson sampling for DP-SGD, and padding of variable batch sizes to a few fixed buckets.

The privacy accountants (``polymodal.train.dp``) assume *Poisson
sampling*: at every step each example joins the batch independently with
probability ``sample_rate``, so batch sizes vary (Binomial). Shuffled
fixed-size batches do not satisfy that analysis. ``PoissonBatchSampler`` draws
such batches from an explicit key: step ``s`` uses ``fold_in(key, s)``, so a
run is reproducible, and resuming at step ``s`` continues the same sequence.

Varying batch sizes would make ``torch.compile`` specialise (or recompile) the
train step for many shapes. ``pad_to_bucket`` rounds a size up to one of a few
bucket sizes, and ``pad_indices`` / ``BucketCollate`` pad a batch with filler
rows and return a boolean ``mask`` (``True`` for real examples). The mask
enters the loss as a per-example weight, and the sum is divided by the
*expected* batch size (``sample_rate * num_samples``, as Opacus does under
Poisson sampling), never by the padded or the realised size::

    per_example = loss_fn(params, batch)                  # (B_bucket,)
    loss = (per_example * mask).sum() / expected_batch_size

Filler rows then have a zero loss, hence a zero per-example gradient: clipping
keeps them at zero, they add nothing to the clipped sum, and the Gaussian noise
(added once per step) is unchanged. Losses that couple examples (contrastive
softmax over the batch, batch statistics) must also drop filler rows inside,
e.g. set their logits to ``-inf``; see ``docs/privacy.md``.

>>> from polymodal.core import random as pr
>>> sampler = PoissonBatchSampler(1000, 0.05, steps=3, key=pr.key(0))
>>> [len(b) for b in sampler] == [len(b) for b in sampler]  # same key, same batches
True
>>> idx, mask = pad_indices([3, 9, 4], buckets=(4, 8))
>>> idx, mask.tolist()
([3, 9, 4, 0], [True, True, True, False])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from polymodal.core import random as pr

__all__ = ["PoissonBatchSampler", "pad_to_bucket", "pad_indices", "PaddedBatch", "BucketCollate"]

_CHUNK = 1 << 20  # examples drawn per key; bounds memory for huge data sets (part of the sampling definition)


def _check_int(value: object, name: str, where: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{where}: {name} must be >= {minimum}, got {value!r}")
    return value


class PoissonBatchSampler:
    """Batches of indices where each example is included independently with probability ``sample_rate``.

    Use as a ``torch.utils.data.DataLoader(dataset, batch_sampler=...)``; batches may be
    empty. Inclusion uses 32 random bits per example (``pr.bits(...) < round(q * 2**32)``),
    so the realised rate is ``sample_rate`` to within ``2**-33``.

    Args:
        num_samples: data set size ``N``.
        sample_rate: inclusion probability ``q`` in ``(0, 1]``; expected batch size ``q N``.
        steps: number of batches (steps) per pass of the iterator.
        key: a ``polymodal.core.random`` key; step ``s`` draws from ``fold_in(key, s)``.
        start_step: first step to yield (resume a checkpointed run at this step).

    >>> from polymodal.core import random as pr
    >>> s = PoissonBatchSampler(10, 0.5, steps=2, key=pr.key(1))
    >>> len(s), all(0 <= i < 10 for b in s for i in b)
    (2, True)
    """

    def __init__(self, num_samples: int, sample_rate: float, steps: int, *, key: Tensor, start_step: int = 0) -> None:
        where = "PoissonBatchSampler"
        self.num_samples = _check_int(num_samples, "num_samples", where, 1)
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)):
            raise TypeError(f"{where}: sample_rate must be a number, got {type(sample_rate).__name__} {sample_rate!r}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"{where}: sample_rate must be in (0, 1], got {sample_rate!r}")
        self.sample_rate = float(sample_rate)
        self.steps = _check_int(steps, "steps", where, 0)
        self.start_step = _check_int(start_step, "start_step", where, 0)
        if not isinstance(key, Tensor) or key.dtype != torch.int64 or tuple(key.shape) != (2,):
            got = f"{key.dtype} tensor of shape {tuple(key.shape)}" if isinstance(key, Tensor) else type(key).__name__
            raise TypeError(
                f"{where}: key must be a random key (int64 tensor of shape (2,), from pr.key(seed)), got {got}"
            )
        self.key = key
        self._threshold = round(self.sample_rate * 2**32)

    @property
    def expected_batch_size(self) -> float:
        """``sample_rate * num_samples``: the normaliser of the summed per-example loss."""
        return self.sample_rate * self.num_samples

    def mask(self, step: int) -> Tensor:
        """``(num_samples,)`` bool: which examples are in the batch of ``step``."""
        k = pr.fold_in(self.key, step)
        chunks = []
        for c, start in enumerate(range(0, self.num_samples, _CHUNK)):
            size = min(_CHUNK, self.num_samples - start)
            chunks.append(pr.bits(pr.fold_in(k, c), (size,)) < self._threshold)
        return torch.cat(chunks)

    def batch(self, step: int) -> list[int]:
        """The sorted indices in the batch of ``step`` (any ``step >= 0``, independent of the others)."""
        return torch.nonzero(self.mask(step)).flatten().tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.steps):
            yield self.batch(step)

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)

    def __repr__(self) -> str:
        return (
            f"PoissonBatchSampler(num_samples={self.num_samples}, sample_rate={self.sample_rate}, "
            f"steps={self.steps}, start_step={self.start_step})"
        )


def _check_buckets(buckets: Sequence[int], where: str) -> tuple[int, ...]:
    if isinstance(buckets, int) or not isinstance(buckets, Sequence) or len(buckets) == 0:
        raise ValueError(f"{where}: buckets must be a non-empty sequence of ints >= 1, got {buckets!r}")
    for b in buckets:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"{where}: buckets must be a non-empty sequence of ints >= 1, got {list(buckets)!r}")
    return tuple(sorted(set(buckets)))


def pad_to_bucket(batch_size: int, buckets: Sequence[int]) -> int:
    """The padded size of a batch: the smallest bucket ``>= batch_size``.

    A batch larger than every bucket (rare under Poisson sampling if the largest
    bucket is a few standard deviations above the mean) is rounded up to a
    multiple of the largest bucket, so the set of shapes stays small and no
    example is ever dropped.

    >>> pad_to_bucket(0, (32, 48, 64)), pad_to_bucket(33, (32, 48, 64)), pad_to_bucket(70, (32, 48, 64))
    (32, 48, 128)
    """
    batch_size = _check_int(batch_size, "batch_size", "pad_to_bucket", 0)
    sizes = _check_buckets(buckets, "pad_to_bucket")
    for b in sizes:
        if batch_size <= b:
            return b
    return sizes[-1] * math.ceil(batch_size / sizes[-1])


def pad_indices(indices: Sequence[int], buckets: Sequence[int], *, fill_index: int = 0) -> tuple[list[int], Tensor]:
    """Pad a batch of indices to its bucket size with ``fill_index``.

    Returns:
        ``(padded, mask)``: ``padded`` has length ``pad_to_bucket(len(indices), buckets)``;
        ``mask`` is a ``(len(padded),)`` bool tensor, ``True`` for the real examples (first).

    >>> pad_indices([], (2,))
    ([0, 0], tensor([False, False]))
    """
    idx = [int(i) for i in indices]
    size = pad_to_bucket(len(idx), buckets)
    mask = torch.arange(size) < len(idx)
    return idx + [fill_index] * (size - len(idx)), mask


class PaddedBatch(NamedTuple):
    """A collated batch padded to a bucket size, and which rows are real."""

    batch: Any  # the collated examples, leading dimension = bucket size
    mask: Tensor  # (bucket,) bool, True for real examples


class BucketCollate:
    """A ``collate_fn`` that pads the example list to a bucket size with copies of ``fill``.

    Args:
        buckets: the allowed batch sizes (see ``pad_to_bucket``).
        fill: the example used for padding rows, e.g. ``dataset[0]`` (its values never reach
            the loss once masked; needed because Poisson batches can be empty).
        collate_fn: collates the padded list; default ``torch.utils.data.default_collate``.

    >>> import torch
    >>> collate = BucketCollate((4,), fill=torch.zeros(2))
    >>> out = collate([torch.ones(2), torch.ones(2)])
    >>> out.batch.shape, out.mask.tolist()
    (torch.Size([4, 2]), [True, True, False, False])
    """

    def __init__(self, buckets: Sequence[int], *, fill: Any, collate_fn: Callable[[list], Any] | None = None) -> None:
        self.buckets = _check_buckets(buckets, "BucketCollate")
        self.fill = fill
        self.collate_fn = collate_fn if collate_fn is not None else torch.utils.data.default_collate

    def __call__(self, examples: Sequence[Any]) -> PaddedBatch:
        examples = list(examples)
        size = pad_to_bucket(len(examples), self.buckets)
        mask = torch.arange(size) < len(examples)
        return PaddedBatch(self.collate_fn(examples + [self.fill] * (size - len(examples))), mask)
