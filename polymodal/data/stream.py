"""A resumable stream of training batches from WebDataset tar shards.

The batches of a run are a pure function of ``(key, step)``, whatever the number of ranks and
``DataLoader`` workers, so a run stopped at step ``k`` and restarted with ``start_step=k`` sees
exactly the batches an uninterrupted run would have seen.

The order. ``num_samples`` (open_clip's ``--train-num-samples``) is the length of an epoch:
``steps_per_epoch = num_samples // batch_size`` steps (the remainder is dropped, as with
``drop_last``). Epoch ``e`` reads the concatenation of all shards in the order
``permutation(fold_in(fold_in(fold_in(key, e), 0), 0))``, each shard's samples in the order
``permutation(fold_in(fold_in(fold_in(key, e), 0), 1 + shard))`` (``shuffle_in_shard``; else
as stored). If the epoch needs more samples than the shards hold, it goes on with a second pass
(``fold_in(key, e), 1``) and so on. Epoch sample ``q`` belongs to step ``q // batch_size`` of
the epoch; within a step, rank ``r`` of ``world`` takes samples ``[r * b, (r + 1) * b)`` with
``b = batch_size // world``; within a rank, ``DataLoader`` worker ``w`` of ``W`` makes the
batches of steps ``start_step + w, start_step + w + W, ...``, which ``DataLoader`` returns in
step order. So within an epoch every sample of the shards appears at most once (exactly once
when ``num_samples`` is the number of samples and ``batch_size`` divides it).

The cost of this freedom. Every (rank, worker) reads the tar headers of the shards up to the
positions it needs (:func:`polymodal.data.tarindex.index_tar`: one 512-byte header and one seek
per member, ~30 µs, so ~1 s per rank and worker for a 10,000-sample shard; a ``sizes.json`` beside the
shards, ``{"shard-000000.tar": 10000, ...}`` as open_clip writes it, spares the shards it skips
whole) and then reads and decodes only its own samples, seeking to them. So the data is read
once in all, but the headers ``world * workers`` times; resuming deep into an epoch first scans
the headers of the shards before the resume point. Shards must therefore be seekable local files
(or a mounted file system), not ``pipe:`` / ``http://`` URLs: stream those with
``polymodal.data.webdataset_pipeline``, which is not resumable.

>>> import tempfile, webdataset as wds
>>> from PIL import Image
>>> d = tempfile.mkdtemp()
>>> for s in range(2):
...     with wds.TarWriter(f"{d}/shard-{s}.tar") as w:
...         for i in range(4):
...             _ = w.write({"__key__": f"{s}{i}", "png": Image.new("RGB", (4, 4)), "txt": f"caption {s}{i}"})
>>> stream = ShardStream(d + "/shard-{0..1}.tar", batch_size=4, num_samples=8, key=0, stop_step=3)
>>> [len(b) for b in stream], stream.steps_per_epoch
([4, 4, 4], 2)
>>> sorted(k for s in range(2) for _, k in stream.sample_ids(s)) == sorted(f"{s}{i}" for s in "01" for i in range(4))
True
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..core import random as pr
from .captions import BadSampleError, apply_transforms, check_transforms, load_image
from .tarindex import Member, TarIndex, index_tar, read_member

__all__ = ["ShardStream", "expand_shards", "is_shard_pattern"]

logger = logging.getLogger(__name__)
_MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key.ext split (first dot of the name)
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # pipe:, http://, s3://, ... (not a Windows drive: 2+ letters)


def is_shard_pattern(data: str) -> bool:
    """Whether a ``--data`` value names WebDataset shards: ``*.tar`` files or a brace pattern."""
    return any(p.strip().endswith(".tar") or "{" in p for p in str(data).split("::"))


def expand_shards(urls: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard paths from a brace pattern (``"d/shard-{000000..000099}.tar"``; several joined by ``::``
    as in open_clip) or a list; every shard must exist.

    >>> expand_shards("/nonexistent/s-{0..1}.tar")
    Traceback (most recent call last):
    ...
    FileNotFoundError: ShardStream: no shard matches '/nonexistent/s-{0..1}.tar' (2 paths expanded, none exists)
    """
    if isinstance(urls, (str, os.PathLike)):
        try:
            from braceexpand import braceexpand  # comes with webdataset (the "data" extra)
        except ImportError:  # pragma: no cover
            raise ImportError("ShardStream needs the braceexpand package: pip install 'polymodal[data]'") from None
        pattern = os.fspath(urls)
        paths = [p for part in pattern.split("::") for p in braceexpand(part.strip())]
    else:
        pattern = ", ".join(map(os.fspath, urls))
        paths = [os.fspath(u) for u in urls]
    if not paths or not pattern.strip():
        raise ValueError("ShardStream: urls: expected a shard pattern or a list of shards, got none")
    remote = [p for p in paths if _URL.match(p) and not re.match(r"^[a-zA-Z]:[\\/]", p)]
    if remote:
        raise ValueError(f"ShardStream: expected local (seekable) tar files, got {remote[0]!r}; stream remote "
                         "shards with polymodal.data.webdataset_pipeline (not resumable) or mount them")
    missing = [p for p in paths if not os.path.isfile(p)]
    if len(missing) == len(paths):
        raise FileNotFoundError(f"ShardStream: no shard matches {pattern!r} ({len(paths)} path"
                                f"{'s' if len(paths) != 1 else ''} expanded, none exists)")
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(f"ShardStream: {len(missing)} of the {len(paths)} shards of {pattern!r} do not exist: "
                                f"{shown}")
    return paths


def _sizes_json(paths: list[str]) -> dict[str, int]:
    """Sample counts from ``sizes.json`` files beside the shards (open_clip's convention)."""
    out: dict[str, int] = {}
    for folder in dict.fromkeys(os.path.dirname(p) for p in paths):
        f = Path(folder or ".") / "sizes.json"
        if f.is_file():
            sizes = json.loads(f.read_text())
            out |= {os.path.join(folder, name): int(n) for name, n in sizes.items()}
    return out


class _Shard:
    """One open shard: its samples (``ext -> Member``) in stored order, read by seeking."""

    def __init__(self, path: str) -> None:
        self.path, self.error, self.file = path, None, None
        self.keys: list[str] = []
        self.members: list[dict[str, Member]] = []
        try:
            index = index_tar(path)
        except OSError as e:
            index = TarIndex([], f"cannot read it: {type(e).__name__}: {e}", None)
        for m in index.members:
            match = _MEMBER.match(m.name)
            if match is None:
                continue
            key, ext = match.group(1), match.group(2).lower()
            if not self.keys or self.keys[-1] != key:  # a sample is a run of members sharing a key
                self.keys.append(key)
                self.members.append({})
            self.members[-1][ext] = m
        if index.problem:  # the last sample may have lost members: dropped unless the damage is after it
            cut = _MEMBER.match(index.cut or "")
            if self.keys and (cut is None or cut.group(1) == self.keys[-1]):
                self.keys, self.members = self.keys[:-1], self.members[:-1]
            self.error = (f"{path}: truncated or corrupt shard: reading its first {len(self.keys)} samples only "
                          f"({index.problem})")

    def read(self, i: int) -> dict[str, Any]:
        if self.file is None:
            self.file = open(self.path, "rb")  # noqa: SIM115 - kept open while the shard is read
        out: dict[str, Any] = {"__key__": self.keys[i], "__url__": self.path}
        for ext, m in self.members[i].items():
            out[ext] = read_member(self.file, m)
            if len(out[ext]) != m.size:
                raise BadSampleError(f"{self.path}: sample {self.keys[i]!r}: {ext}: truncated shard: expected "
                                     f"{m.size} bytes, got {len(out[ext])}")
        return out

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class ShardStream(IterableDataset):
    """Batches of (image, caption) items from WebDataset shards for steps ``[start_step, stop_step)``.

    Each item of the stream is one rank's batch of one step: a list of ``batch_size // world``
    items ``(transform(image), caption)`` (or ``pair_transform(image, caption)``). Use it as
    ``DataLoader(stream, batch_size=None, collate_fn=<batch collate>, num_workers=W)``: with
    ``batch_size=None`` the loader hands each list to ``collate_fn`` whole.

    Args:
        urls: a brace pattern (``"shards/{000000..000099}.tar"``), several joined by ``::``, or a list.
        batch_size: the global batch size (all ranks together).
        num_samples: samples per epoch (``--train-num-samples``); ``None`` takes the total from
            ``sizes.json`` beside the shards, and is an error without one.
        key: a random key (``polymodal.core.random``) or an int seed.
        start_step, stop_step: the steps to make (``stop_step=None``: without end).
        rank, world: this process's rank and the number of ranks; ``batch_size % world == 0``.
        transform, pair_transform: as in ``ImageTextFolder``.
        image_keys: member extensions tried in order for the image.
        caption_keys: tried in order for the caption: ``txt`` (UTF-8 text) or ``json`` (an object
            with a ``"caption"`` or ``"text"`` string).
        shuffle_in_shard: visit each shard's samples in a random order (else as stored).
        seeded_transforms: run each sample's transform with torch's RNG seeded from ``(key, epoch,
            position)`` (and restored after), so its random draws (``CLIPImageTransform``'s crops)
            are reproducible on resume too, whatever the workers; ``False``: the worker's RNG.
        skip_bad: a sample without image or caption, with an undecodable image, or lost in a
            truncated shard is counted in ``num_skipped`` (over all workers; a truncated shard
            counts once, its lost samples are not known) and replaced by the
            next good sample of the same rank batch, so batches keep their size (cross-rank
            gathers need equal sizes); otherwise it raises ``BadSampleError``.
    """

    def __init__(self, urls: str | Sequence[str], *, batch_size: int, num_samples: int | None,
                 key: torch.Tensor | int = 0, start_step: int = 0, stop_step: int | None = None, rank: int = 0,
                 world: int = 1, transform: Callable | None = None, pair_transform: Callable | None = None,
                 image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
                 caption_keys: Sequence[str] = ("txt", "json"),
                 shuffle_in_shard: bool = True, seeded_transforms: bool = True, skip_bad: bool = False) -> None:
        check_transforms("ShardStream", transform, pair_transform)
        self.paths = expand_shards(urls)
        self.pattern = urls if isinstance(urls, str) else None
        self._known = _sizes_json(self.paths)  # path -> sample count from sizes.json
        self.sizes = {i: self._known[p] for i, p in enumerate(self.paths) if p in self._known}  # shard -> count
        if num_samples is None:
            if len(self.sizes) < len(self.paths):
                raise ValueError(f"ShardStream: {urls!r}: the number of samples per epoch is unknown: pass "
                                 "--train-num-samples N (num_samples=N), or put a sizes.json beside the shards")
            num_samples = sum(self.sizes.values())
        for name, v, low in (("batch_size", batch_size, 1), ("num_samples", num_samples, batch_size),
                             ("world", world, 1), ("start_step", start_step, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"ShardStream: {name}: expected an int >= {low}, got {v!r}")
        if batch_size % world:
            raise ValueError(f"ShardStream: batch_size: expected a multiple of the {world} ranks, got {batch_size}")
        if not 0 <= rank < world:
            raise ValueError(f"ShardStream: rank: expected 0 <= rank < {world}, got {rank}")
        self.batch_size, self.num_samples, self.rank, self.world = batch_size, num_samples, rank, world
        self.steps_per_epoch = num_samples // batch_size
        self.key = pr.key(key) if isinstance(key, int) else key
        self.start_step, self.stop_step = start_step, stop_step
        self.transform, self.pair_transform = transform, pair_transform
        self.image_keys, self.caption_keys = tuple(image_keys), tuple(caption_keys)
        self.shuffle_in_shard, self.seeded_transforms, self.skip_bad = shuffle_in_shard, seeded_transforms, skip_bad
        self._counts = torch.zeros(257, dtype=torch.int64).share_memory_()  # skips; slot 0: main, 1+: workers
        self._broken = torch.zeros(len(self.paths), dtype=torch.bool).share_memory_()  # truncated / corrupt shards
        self._reset()

    def _reset(self) -> None:
        self._shard: _Shard | None = None  # the open shard (one per process)
        self._epoch: int | None = None
        self._starts: list[int] = []  # epoch position where each entry of _order starts
        self._order: list[tuple[int, int]] = []  # (pass, shard) in the epoch's reading order
        self._perm: tuple[tuple, list[int]] | None = None
        self._words: tuple[int | None, list[int]] = (None, [])  # (epoch, its key's words) for _seed

    def __getstate__(self) -> dict:  # DataLoader workers get a copy without open files
        state = self.__dict__.copy()
        state["_shard"] = None
        return state

    # ------------------------------------------------------------------ order (no decoding)

    def _size(self, i: int) -> int:
        if i not in self.sizes:
            self.sizes[i] = len(self._open(i).keys)
        return self.sizes[i]

    def _open(self, i: int) -> _Shard:
        if self._shard is None or self._shard.path != self.paths[i]:
            if self._shard is not None:
                self._shard.close()
            self._shard = _Shard(self.paths[i])
            if self._shard.error:
                if not self.skip_bad:
                    raise BadSampleError(self._shard.error)
                if not self._broken[i]:
                    self._broken[i] = True
                    logger.warning("ShardStream: %s", self._shard.error)
            known = self._known.get(self.paths[i])
            if known is not None and known != len(self._shard.keys) and not self._shard.error:
                raise ValueError(f"ShardStream: sizes.json says {self.paths[i]} holds {known} samples, got "
                                 f"{len(self._shard.keys)}: fix or remove sizes.json")
        return self._shard

    def _pass_key(self, epoch: int, p: int) -> torch.Tensor:
        return pr.fold_in(pr.fold_in(self.key, epoch), p)

    def locate(self, epoch: int, q: int) -> tuple[int, int, int]:
        """``(pass, shard, index in the shard's order)`` of sample ``q`` of ``epoch``."""
        if self._epoch != epoch:
            self._epoch, self._starts, self._order = epoch, [], []
        n_shards = len(self.paths)
        while not self._starts or q >= self._end():
            n = len(self._starts)
            if n == len(self._order):  # the next pass over the shards
                p = n // n_shards
                if p and self._end() == self._starts[n - n_shards]:
                    raise ValueError(f"ShardStream: the shards of {self.pattern or self.paths[0]!r} hold no samples")
                order = pr.permutation(pr.fold_in(self._pass_key(epoch, p), 0), n_shards).tolist()
                self._order += [(p, s) for s in order]
            self._starts.append(self._end() if n else 0)
        n = bisect.bisect_right(self._starts, q) - 1  # the last entry whose start <= q (never an empty shard)
        p, s = self._order[n]
        return p, s, q - self._starts[n]

    def _end(self) -> int:
        return self._starts[-1] + self._size(self._order[len(self._starts) - 1][1])

    def _stored_index(self, epoch: int, p: int, s: int, k: int) -> int:
        if not self.shuffle_in_shard:
            return k
        tag = (epoch, p, s)
        if self._perm is None or self._perm[0] != tag:
            key = pr.fold_in(self._pass_key(epoch, p), 1 + s)
            self._perm = (tag, pr.permutation(key, self._size(s)).tolist())
        return self._perm[1][k]

    def positions(self, step: int) -> tuple[int, range]:
        """``(epoch, positions in the epoch)`` of this rank's samples at ``step``."""
        epoch, i = divmod(step, self.steps_per_epoch)
        b = self.batch_size // self.world
        start = i * self.batch_size + self.rank * b
        return epoch, range(start, start + b)

    def sample_ids(self, step: int) -> list[tuple[str, str]]:
        """``(shard path, sample key)`` of this rank's samples at ``step``, without decoding them."""
        epoch, qs = self.positions(step)
        out = []
        for q in qs:
            p, s, k = self.locate(epoch, q)
            out.append((self.paths[s], self._open(s).keys[self._stored_index(epoch, p, s, k)]))
        return out

    # ------------------------------------------------------------------ decoding

    def _decode(self, sample: dict, seed: int | None = None) -> Any:
        where = f"{sample['__url__']}: sample {sample['__key__']!r}"
        got = sorted(k for k in sample if not k.startswith("__"))
        ext = next((k for k in self.image_keys if k in sample), None)
        if ext is None:
            raise BadSampleError(f"{where}: no image: expected one of {self.image_keys}, got {got}")
        cap = next((k for k in self.caption_keys if k in sample), None)
        if cap is None:
            raise BadSampleError(f"{where}: no caption: expected one of {self.caption_keys}, got {got}")
        try:
            text = sample[cap].decode("utf-8")
            if cap == "json":
                obj = json.loads(text)
                fields = [obj.get(f) for f in ("caption", "text")] if isinstance(obj, dict) else []
                text = next((t for t in fields if isinstance(t, str)), None)
                if text is None:
                    raise BadSampleError(f"{where}: json: expected an object with a 'caption' or 'text' string, "
                                         f"got {str(obj)[:80]}")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            what = "UTF-8 text" + (" holding JSON" if cap == "json" else "")
            raise BadSampleError(f"{where}: {cap}: expected {what}, got {e}") from None
        image = load_image(sample[ext], f"{where}: {ext}")
        if seed is None:
            return apply_transforms(image, text.strip(), self.transform, self.pair_transform)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # the CPU generator only: torch.manual_seed costs ~2 ms
            return apply_transforms(image, text.strip(), self.transform, self.pair_transform)

    def _item(self, epoch: int, q: int) -> Any:
        p, s, k = self.locate(epoch, q)
        shard = self._open(s)
        i = self._stored_index(epoch, p, s, k)
        try:
            if i >= len(shard.keys):  # sizes.json counted samples a truncated shard lost
                raise BadSampleError(f"{shard.error or shard.path}: sample {i} is missing")
            return self._decode(shard.read(i), self._seed(epoch, q) if self.seeded_transforms else None)
        except BadSampleError as e:
            if not self.skip_bad:
                raise
            info = get_worker_info()
            self._counts[0 if info is None else 1 + info.id % 256] += 1
            logger.warning("ShardStream: skipped %s", e)
            return e

    def _seed(self, epoch: int, q: int) -> int:
        if self._words[0] != epoch:
            self._words = (epoch, pr.fold_in(self.key, epoch).tolist())
        a, b = self._words[1]  # 32-bit words
        return ((a << 32 | b) ^ ((q + 1) * 0x9E3779B97F4A7C15)) & ((1 << 63) - 1)

    def batch(self, step: int) -> list:
        """This rank's items at ``step``."""
        epoch, qs = self.positions(step)
        items = [self._item(epoch, q) for q in qs]
        good = [i for i, it in enumerate(items) if not isinstance(it, BadSampleError)]
        if not good:
            raise BadSampleError(f"ShardStream: step {step}, rank {self.rank}: every sample is unreadable, "
                                 f"the last: {items[-1]}")
        return [it if not isinstance(it, BadSampleError) else items[good[bisect.bisect_left(good, i) % len(good)]]
                for i, it in enumerate(items)]

    @property
    def num_skipped(self) -> int:
        """Bad samples met so far, in every worker process, plus truncated / corrupt shards (once each)."""
        return int(self._counts.sum()) + int(self._broken.sum())

    def __iter__(self) -> Iterator[list]:
        info = get_worker_info()
        w, nw = (0, 1) if info is None else (info.id, info.num_workers)
        step = self.start_step + w
        while self.stop_step is None or step < self.stop_step:
            yield self.batch(step)
            step += nw

    def __len__(self) -> int:
        if self.stop_step is None:
            raise TypeError("ShardStream without stop_step has no length")
        return max(0, self.stop_step - self.start_step)
