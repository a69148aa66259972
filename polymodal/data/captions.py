"""Real image-text pairs: an image folder with a JSONL / CSV annotation file, and WebDataset shards.

Both sources yield ``(transform(image), caption)``, or ``pair_transform(image, caption)``
for a joint callable such as ``CLIPTransform``. A bad sample (malformed annotation line,
missing file, unreadable image, shard member without image or caption) raises one
``BadSampleError`` naming the file / line and the problem; with ``skip_bad=True`` it is
skipped, logged and counted in ``num_skipped`` (also across ``DataLoader`` worker processes).

>>> import tempfile, pathlib
>>> from PIL import Image
>>> root = pathlib.Path(tempfile.mkdtemp())
>>> Image.new("RGB", (8, 6), "red").save(root / "a.png")
>>> _ = (root / "ann.jsonl").write_text('{"image": "a.png", "caption": "a red square"}\\n')
>>> ds = ImageTextFolder(root, "ann.jsonl", transform=lambda im: im.size)
>>> ds[0]
((8, 6), 'a red square')
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from polymodal.data.images import to_rgb

try:  # optional dependency (the "data" extra)
    import webdataset as wds

    _PipelineBase = wds.DataPipeline
except ImportError:  # pragma: no cover
    wds, _PipelineBase = None, IterableDataset

__all__ = ["BadSampleError", "ImageTextFolder", "CaptionPipeline", "webdataset_pipeline", "load_image"]

logger = logging.getLogger(__name__)
_MAX_LISTED = 10  # bad samples spelled out in one error / summary


class BadSampleError(ValueError):
    """A sample that cannot be read: the message names the file (and line) and the problem."""


class _Entry(NamedTuple):
    line: int  # line of the annotation file
    image: str  # path as written in the annotation file
    caption: str


def load_image(source: str | os.PathLike | bytes, name: str | None = None) -> Image.Image:
    """Decode an image file (a path or its bytes) fully, as 8-bit RGB; ``BadSampleError`` if it cannot be read.

    16-bit greys are scaled to 8 bits and transparent images composited on white
    (:func:`polymodal.data.images.to_rgb`), not clipped / stripped of alpha by ``convert("RGB")``."""
    name = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            im.load()  # decode all pixels here, so truncated files fail inside this try
            out = to_rgb(im)
            return out if out is not im else im.copy()  # the copy outlives the closed file
    except FileNotFoundError:
        raise BadSampleError(f"{name}: missing image file") from None
    except Exception as e:  # noqa: BLE001 - whatever the decoder trips on, the file is unreadable
        raise BadSampleError(f"{name}: cannot read image: {type(e).__name__}: {e}") from None


def apply_transforms(image: Image.Image, caption: str, transform: Callable | None, pair_transform: Callable | None) -> Any:
    if pair_transform is not None:
        return pair_transform(image, caption)
    return (image if transform is None else transform(image)), caption


def check_transforms(owner: str, transform: object, pair_transform: object) -> None:
    for name, f in (("transform", transform), ("pair_transform", pair_transform)):
        if f is not None and not callable(f):
            raise TypeError(f"{owner}: {name}: expected a callable or None, got {type(f).__name__}")
    if transform is not None and pair_transform is not None:
        raise ValueError(f"{owner}: expected transform (image only) or pair_transform (image, caption), got both")


def _entry(record: dict, line: int, image_key: str, caption_key: str) -> list[_Entry] | str:
    """The samples of one annotation record, or the reason it is malformed."""
    missing = [k for k in (image_key, caption_key) if record.get(k) is None]
    if missing:
        return f"missing {' and '.join(map(repr, missing))} (got keys {sorted(k for k in record if k is not None)})"
    image, caption = record[image_key], record[caption_key]
    if not isinstance(image, str) or not image.strip():
        return f"expected {image_key!r} to be a non-empty path, got {image!r}"
    captions = caption if isinstance(caption, list) else [caption]  # several captions: one sample each
    if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
        return f"expected {caption_key!r} to be a non-empty string (or a list of them), got {caption!r}"
    return [_Entry(line, image.strip(), c.strip()) for c in captions]


def _read_jsonl(path: Path, image_key: str, caption_key: str):
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                yield line, f"malformed JSON: {e.msg} at column {e.colno}"
                continue
            if not isinstance(record, dict):
                yield line, f"expected a JSON object, got {type(record).__name__}"
                continue
            yield line, _entry(record, line, image_key, caption_key)


def _read_csv(path: Path, image_key: str, caption_key: str, delimiter: str):
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = reader.fieldnames or []
        if image_key not in header or caption_key not in header:
            raise ValueError(f"{path}: header: expected columns {image_key!r} and {caption_key!r}, got {header}")
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield reader.line_num, f"malformed CSV: {e}"
                continue
            if None in row or None in row.values():
                got = len(header) + len(row.get(None, [])) - sum(v is None for v in row.values())
                yield reader.line_num, f"expected {len(header)} fields, got {got}"
                continue
            yield reader.line_num, _entry(row, reader.line_num, image_key, caption_key)


class ImageTextFolder(Dataset):
    """(image, caption) pairs listed in a JSONL or CSV file, image paths relative to ``root``.

    Args:
        root: folder the image paths are relative to (absolute paths are used as they are).
        annotations: the annotation file; a relative path is looked up under ``root`` first.
            ``.jsonl`` lines are objects ``{"image": path, "caption": text}`` (the caption may be a
            list: one sample per caption); ``.csv`` / ``.tsv`` files have a header row.
        transform: callable on the PIL image (RGB); items are ``(transform(image), caption)``.
        pair_transform: callable ``(image, caption) -> item`` instead (e.g. a ``CLIPTransform``).
        image_key, caption_key: field / column names.
        format: ``"jsonl"`` or ``"csv"``; default from the file suffix.
        delimiter: CSV delimiter; default ``","`` (``"\\t"`` for ``.tsv``).
        check_files: look for every image file when the dataset is built (one ``stat`` each);
            with ``False`` a missing file is found when it is loaded, like an unreadable image.
        skip_bad: skip malformed lines and missing files (found when the dataset is built) and
            unreadable images (found when loaded; the next good sample is returned instead),
            counting them in ``num_skipped``; otherwise raise ``BadSampleError``.

    >>> ImageTextFolder("/nonexistent", "ann.jsonl")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: ImageTextFolder: annotations: no such file: ...ann.jsonl
    """

    def __init__(
        self,
        root: str | os.PathLike,
        annotations: str | os.PathLike,
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        pair_transform: Callable[[Image.Image, str], Any] | None = None,
        image_key: str = "image",
        caption_key: str = "caption",
        format: str | None = None,
        delimiter: str | None = None,
        check_files: bool = True,
        skip_bad: bool = False,
    ) -> None:
        check_transforms("ImageTextFolder", transform, pair_transform)
        self.root = Path(root)
        path = Path(annotations)
        if not path.is_absolute() and (self.root / path).is_file():
            path = self.root / path
        if not path.is_file():
            raise FileNotFoundError(f"ImageTextFolder: annotations: no such file: {path}")
        suffix = path.suffix.lower().lstrip(".")
        format = format or {"jsonl": "jsonl", "csv": "csv", "tsv": "csv"}.get(suffix)
        if format not in ("jsonl", "csv"):
            raise ValueError(f"ImageTextFolder: format: expected 'jsonl' or 'csv' (or a .jsonl/.csv/.tsv file), got {format or path.name!r}")
        self.annotations, self.transform, self.pair_transform, self.skip_bad = path, transform, pair_transform, skip_bad
        if format == "jsonl":
            records = _read_jsonl(path, image_key, caption_key)
        else:
            records = _read_csv(path, image_key, caption_key, delimiter or ("\t" if suffix == "tsv" else ","))
        self.samples: list[_Entry] = []
        self.bad: list[str] = []  # "line N: problem" for every sample skipped while building
        try:
            for line, got in records:
                if isinstance(got, str):
                    self.bad.append(f"line {line}: {got}")
                    continue
                missing = [e for e in got if check_files and not self._path(e).is_file()]
                if missing:
                    self.bad.append(f"line {line}: missing image file {str(self._path(missing[0]))!r}")
                else:
                    self.samples.extend(got)
        except UnicodeDecodeError as e:
            raise ValueError(f"ImageTextFolder: {path}: expected UTF-8 text, got {e}") from None
        if self.bad and not skip_bad:
            raise BadSampleError(self._report(f"{len(self.bad)} bad sample(s)", self.bad) + "\n(pass skip_bad=True to skip them)")
        # Unreadable images found while loading, flagged in shared memory so that DataLoader
        # worker processes report them to the parent.
        self._failed = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()
        if self.bad:
            logger.warning("%s", self.summary())

    def _path(self, e: _Entry) -> Path:
        return self.root / e.image

    def _report(self, head: str, problems: list[str]) -> str:
        listed = "\n".join(f"  {p}" for p in problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        return f"ImageTextFolder: {self.annotations}: {head}:\n{listed}{more}"

    @property
    def num_skipped(self) -> int:
        """Samples skipped so far: bad annotation lines / missing files, plus unreadable images met."""
        return len(self.bad) + int(self._failed.sum())

    def summary(self) -> str:
        """A readable account of every skipped sample."""
        failed = [f"line {self.samples[i].line}: cannot load image {str(self._path(self.samples[i]))!r}" for i in self._failed.nonzero().flatten().tolist()]
        return self._report(f"skipped {self.num_skipped} of {len(self.samples) + len(self.bad)} samples", self.bad + failed)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Any:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"ImageTextFolder: index {index} out of range for {n} samples")
        index %= n
        for attempt in range(n):
            i = (index + attempt) % n
            e = self.samples[i]
            try:
                image = load_image(self._path(e), f"{self._path(e)} (line {e.line} of {self.annotations})")
            except BadSampleError as err:
                if not self.skip_bad:
                    raise
                if not self._failed[i]:
                    self._failed[i] = True
                    logger.warning("ImageTextFolder: skipped %s", err)
                continue
            return apply_transforms(image, e.caption, self.transform, self.pair_transform)
        raise BadSampleError(self.summary() + "\nno readable image left")

    def __repr__(self) -> str:
        return f"ImageTextFolder(root={str(self.root)!r}, annotations={str(self.annotations)!r}, samples={len(self)}, skipped={self.num_skipped})"


# ---------------------------------------------------------------------------------- WebDataset


class _Skipper:
    """A webdataset exception handler: raise, or count (per worker slot, in shared memory) and go on."""

    def __init__(self, skip_bad: bool, counts: torch.Tensor) -> None:
        self.skip_bad, self.counts = skip_bad, counts

    def __call__(self, exn: Exception) -> bool:
        if not isinstance(exn, BadSampleError):  # tar / stream errors: webdataset appends the shard to args
            where = next((a for a in reversed(exn.args) if isinstance(a, str)), "?")
            exn = BadSampleError(f"{where}: cannot read shard: {type(exn).__name__}: {exn.args[0] if exn.args else exn}")
        if not self.skip_bad:
            raise exn
        info = get_worker_info()
        slot = 0 if info is None else 1 + info.id % (len(self.counts) - 1)
        self.counts[slot] += 1
        logger.warning("webdataset_pipeline: skipped %s", exn)
        return True


class _Decode:
    """Shard sample dict -> (PIL image, caption); ``BadSampleError`` naming shard and key."""

    def __init__(self, image_keys: tuple[str, ...], caption_key: str) -> None:
        self.image_keys, self.caption_key = image_keys, caption_key

    def __call__(self, sample: dict) -> tuple[Image.Image, str]:
        where = f"{sample.get('__url__', '?')}: sample {sample.get('__key__')!r}"
        got = sorted(k for k in sample if not k.startswith("__"))
        ext = next((k for k in self.image_keys if k in sample), None)
        if ext is None:
            raise BadSampleError(f"{where}: no image: expected one of {self.image_keys}, got {got}")
        if self.caption_key not in sample:
            raise BadSampleError(f"{where}: no caption: expected {self.caption_key!r}, got {got}")
        try:
            caption = sample[self.caption_key].decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise BadSampleError(f"{where}: caption {self.caption_key!r}: expected UTF-8 text, got {e}") from None
        return load_image(sample[ext], f"{where}: {ext}"), caption


class _Transform:
    def __init__(self, transform: Callable | None, pair_transform: Callable | None) -> None:
        self.transform, self.pair_transform = transform, pair_transform

    def __call__(self, pair: tuple[Image.Image, str]) -> Any:
        return apply_transforms(*pair, self.transform, self.pair_transform)


def webdataset_pipeline(
    urls: str | Sequence[str],
    transform: Callable[[Image.Image], Any] | None = None,
    *,
    pair_transform: Callable[[Image.Image, str], Any] | None = None,
    image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
    caption_key: str = "txt",
    shuffle: int = 0,
    seed: int | None = None,
    resampled: bool = False,
    batch_size: int | None = None,
    skip_bad: bool = False,
):
    """Stream (image, caption) pairs from WebDataset tar shards (``key.jpg`` / ``key.png`` + ``key.txt``).

    Shards are split over distributed ranks and ``DataLoader`` worker processes, so wrap it in
    ``DataLoader(pipeline, batch_size=..., num_workers=...)`` (or pass ``batch_size`` here and
    ``batch_size=None`` to the loader). It reads any URL webdataset can (``pipe:``, ``http://``) but
    cannot resume mid-epoch; for training runs that stop and resume, read local shards with
    :class:`polymodal.data.ShardStream` (what ``polymodal train clip --data 'shards/{...}.tar'`` uses).

    Args:
        urls: shard paths / URLs, a list or a brace pattern (``"data/shard-{000..009}.tar"``).
        transform, pair_transform: as in ``ImageTextFolder``.
        image_keys: member extensions tried in order for the image; caption_key: the caption's.
        shuffle: buffer size of the sample shuffle (0: shards and samples in order).
        seed: seed of the shard and sample shuffles (``None``: new order each pass).
        resampled: sample shards with replacement forever (for ``with_epoch``-style training).
        batch_size: batch inside the pipeline (default collation) instead of in the loader.
        skip_bad: skip samples without image / caption, undecodable images and unreadable shards,
            counting them in ``pipeline.num_skipped`` (a broken shard counts once); otherwise
            the first one raises ``BadSampleError``.

    Returns:
        an ``IterableDataset`` (a ``webdataset.DataPipeline``) with a ``num_skipped`` property.

    >>> p = webdataset_pipeline(["a.tar", "b.tar"], transform=lambda im: im.size, skip_bad=True)
    >>> p.num_skipped
    0
    """
    if wds is None:  # pragma: no cover
        raise ImportError("webdataset_pipeline needs the webdataset package: pip install 'polymodal[data]'")
    check_transforms("webdataset_pipeline", transform, pair_transform)
    if isinstance(urls, os.PathLike):
        urls = os.fspath(urls)
    urls = urls if isinstance(urls, str) else [os.fspath(u) for u in urls]
    if not urls:
        raise ValueError("webdataset_pipeline: urls: expected at least one shard, got none")
    counts = torch.zeros(257, dtype=torch.int64).share_memory_()  # slot 0: main process, 1+: workers
    handler = _Skipper(skip_bad, counts)
    if resampled:
        shards = [wds.ResampledShards(urls, seed=seed or 0, deterministic=seed is not None)]
    else:
        shards = [wds.SimpleShardList(urls, seed=(True if seed is None else seed) if shuffle else None), wds.split_by_node, wds.split_by_worker]
    stages = [
        *shards,
        wds.tarfile_to_samples(handler=handler),
        wds.shuffle(shuffle, seed=seed) if shuffle else None,
        wds.map(_Decode(tuple(image_keys), caption_key), handler=handler),
        wds.map(_Transform(transform, pair_transform)),
        wds.batched(batch_size, partial=True) if batch_size else None,
    ]
    pipeline = CaptionPipeline(*stages)
    pipeline._counts = counts
    return pipeline


class CaptionPipeline(_PipelineBase):
    """A ``webdataset.DataPipeline`` that counts the samples it skipped (see ``webdataset_pipeline``)."""

    _counts: torch.Tensor

    @property
    def num_skipped(self) -> int:
        """Samples (or whole shards) skipped so far, over all worker processes and passes."""
        return int(self._counts.sum())
