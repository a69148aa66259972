"""Downloads (sha256, cache, mirrors, progress, atomic writes) and reading weight files.

* :func:`fetch` returns a file from the cache, downloading it there first when missing: each
  URL is tried in order (mirrors from ``$POLYMODAL_HUB_MIRROR`` first), a download is written
  to a temporary file beside its destination and renamed into place only once complete and
  its sha256 verified, so an interrupted or corrupt download never leaves a file behind.
  Offline, the error names the file, every URL tried and where to put the file by hand.
* :func:`cache_dir`: ``$POLYMODAL_CACHE``, else ``$XDG_CACHE_HOME/polymodal``, else
  ``~/.cache/polymodal``.
* :func:`read_state_dict`: a flat ``{name: tensor}`` from a safetensors file, a ``torch.save``
  file (``weights_only=True``) or a TorchScript archive (:mod:`polymodal.torchscript`); no code
  from the file ever runs.

``$POLYMODAL_HUB_MIRROR`` holds base URLs (``https://...``, ``file:///...``), separated by
spaces or commas; ``<base>/<file name>`` is tried before the published URLs. The sha256
check makes any source safe to use.

>>> import hashlib, pathlib, tempfile
>>> src = pathlib.Path(tempfile.mkdtemp()) / "w.bin"
>>> _ = src.write_bytes(b"weights")
>>> sha = hashlib.sha256(b"weights").hexdigest()
>>> fetch("w.bin", [src.as_uri()], sha, cache=src.parent / "cache", progress=False).read_bytes()
b'weights'
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .torchscript import is_torchscript, read_torchscript_tensors

__all__ = ["CACHE_ENV", "MIRROR_ENV", "cache_dir", "mirror_urls", "sha256_of", "hash_prefix", "download", "fetch",
           "read_state_dict"]

CACHE_ENV = "POLYMODAL_CACHE"
MIRROR_ENV = "POLYMODAL_HUB_MIRROR"
_CHUNK = 1 << 20


def cache_dir() -> Path:
    """Where downloads go: ``$POLYMODAL_CACHE``, else ``$XDG_CACHE_HOME/polymodal``, else ``~/.cache/polymodal``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "polymodal"


def mirror_urls(filename: str, urls: str | Sequence[str]) -> list[str]:
    """The URLs to try for ``filename``: each ``$POLYMODAL_HUB_MIRROR`` base first, then ``urls``."""
    urls = [urls] if isinstance(urls, str) else list(urls)
    bases = [b for b in re.split(r"[\s,]+", os.environ.get(MIRROR_ENV, "")) if b]
    return [f"{b.rstrip('/')}/{filename}" for b in bases] + urls


def sha256_of(path: str | os.PathLike) -> str:
    """The file's sha256 (hex), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


_NAME_HASH = re.compile(r"-([0-9a-f]{8,64})\.\w+$")
_HEX = re.compile(r"[0-9a-f]{8,64}")


def hash_prefix(filename: str) -> str | None:
    """The leading sha256 hex digits a published file name carries (torch.hub's convention:
    ``<name>-<at least 8 hex digits>.<ext>``), or None.

    >>> hash_prefix("omnivore_swin_t_encoder-b7e39400.pth"), hash_prefix("flava.pt")
    ('b7e39400', None)
    """
    m = _NAME_HASH.search(os.path.basename(str(filename)))
    return m[1] if m else None


def _expected(sha256: str | None) -> str | None:
    """A full sha256 or a prefix of it (at least 8 hex digits), lower-cased; anything else is an error."""
    if sha256 is None:
        return None
    want = sha256.lower()
    if not _HEX.fullmatch(want):
        raise ValueError(f"sha256: expected 8 to 64 hex digits (a digest or its prefix), got {sha256!r}")
    return want


def _fetch_one(url: str, dest: Path, sha256: str | None, progress: bool, timeout: float) -> None:
    """``url`` -> ``dest`` through a temporary file in ``dest``'s folder; removed on any failure."""
    from tqdm.auto import tqdm

    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as r:
            headers = getattr(r, "headers", None)
            total = int(headers.get("Content-Length") or 0) if headers is not None else 0
            with tqdm(total=total or None, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                      disable=not progress) as bar:
                got = 0
                for chunk in iter(lambda: r.read(_CHUNK), b""):
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        if total and got != total:  # http.client returns short reads silently when a connection drops
            raise OSError(f"incomplete download: got {got} of {total} bytes")
        if sha256 is not None and not (digest := sha256_of(tmp)).startswith(sha256):
            raise ValueError(f"sha256 mismatch for {url}: expected {sha256}{'' if len(sha256) == 64 else '...'}, got "
                             f"{digest} (corrupt or wrong file)")
        os.replace(tmp, dest)
    finally:  # also on KeyboardInterrupt: never leave a partial file
        if os.path.exists(tmp):
            os.remove(tmp)


def download(urls: str | Sequence[str], dest: str | os.PathLike, sha256: str | None = None, *, progress: bool = True,
             timeout: float = 60, hint: str = "") -> Path:
    """Download to ``dest`` from the first of ``urls`` that works (mirrors first), atomically.

    Args:
        urls: one URL or several, tried in order; ``$POLYMODAL_HUB_MIRROR`` bases go first.
        dest: the final path; nothing exists there unless the download completed (and matched).
        sha256: the expected hex digest, or a prefix of it (at least 8 digits); a source whose bytes differ
            is skipped.
        progress: show a tqdm bar. timeout: seconds per connection attempt.
        hint: appended to the offline error (e.g. ``"or pass path=..."``).

    Raises:
        ValueError: every source that answered gave bytes with the wrong sha256.
        RuntimeError: no source could be reached; names the file, the URLs and ``dest``.
    """
    dest = Path(dest)
    sha256 = _expected(sha256)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tried = mirror_urls(dest.name, urls)
    errors, bad = [], []
    for url in tried:
        try:
            _fetch_one(url, dest, sha256, progress, timeout)
            return dest
        except ValueError as e:
            bad.append(str(e))
        except OSError as e:  # URLError, HTTPError, timeouts, refused connections, missing file:// paths
            errors.append(f"{url}: {e}")
    if bad and not errors:
        raise ValueError("; ".join(bad))
    sha = "" if not sha256 else f" (sha256 {sha256})" if len(sha256) == 64 else f" (sha256 starting {sha256})"
    raise RuntimeError(
        f"could not download '{dest.name}'; tried {len(tried)} URL(s):\n  " + "\n  ".join(errors + bad)
        + f"\nWithout network access, download it elsewhere{sha} and put it at '{dest}'"
        + (f", {hint}" if hint else "") + f" (or set {MIRROR_ENV} to a mirror holding '{dest.name}')."
    )


def fetch(filename: str, urls: str | Sequence[str], sha256: str | None = None, *,
          cache: str | os.PathLike | None = None, progress: bool = True, hint: str = "",
          check_hash: bool = False) -> Path:
    """The cached ``cache/filename`` (default :func:`cache_dir`), downloaded first when missing.

    ``sha256`` is a full digest or its first 8+ hex digits. ``check_hash=True`` (torch.hub's
    ``check_hash``) takes the prefix from the file name (:func:`hash_prefix`) when ``sha256`` is not
    given; a name without one is then an error. A cached file with the wrong sha256 is an error
    (delete it to download again), checked on every call; a ``filename`` may contain a sub-folder
    (``"clip/ViT-B-32.pt"``).
    """
    if check_hash and sha256 is None:
        sha256 = hash_prefix(filename)
        if sha256 is None:
            raise ValueError(f"fetch: check_hash=True, but '{filename}' carries no sha256 prefix "
                             "('<name>-<8+ hex digits>.<ext>'); pass sha256= instead")
    sha256 = _expected(sha256)
    path = Path(cache if cache is not None else cache_dir()) / filename
    if path.is_file():
        if sha256 is not None and not (got := sha256_of(path)).startswith(sha256):
            raise ValueError(f"cached '{path}' has the wrong sha256 (expected {sha256}{'' if len(sha256) == 64 else '...'}, "
                             f"got {got}); delete it to "
                             "download it again")
        return path
    return download(urls, path, sha256, progress=progress, hint=hint)


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """A flat ``{name: tensor}`` from a safetensors file, a ``torch.save`` file (``weights_only``)
    or a TorchScript archive; never unpickles arbitrary objects.

    A ``{"state_dict": ...}`` training checkpoint is unwrapped and DDP's ``module.`` prefix
    stripped; non-tensor entries are left out.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at '{path}'")
    with open(path, "rb") as f:
        head = f.read(9)  # safetensors: u64 header length, then the JSON header's "{"
    if path.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{"):
        from safetensors.torch import load_file

        return load_file(str(path))
    if is_torchscript(path):
        return read_torchscript_tensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors and plain containers
        raise ValueError(f"'{path}' is not a safetensors, TorchScript or weights-only torch file: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"'{path}': expected a state dict (name -> tensor), got {type(obj).__name__}")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items() if isinstance(v, Tensor)}
