"""Guarding a run directory: nothing overwritten, one run at a time, a recorded config history.

``polymodal train`` calls these on rank 0 before anything is written (before relaunching under
torchrun with ``--nproc``; under a torchrun of your own, rank 0 checks and every rank agrees on
the answer, :func:`agreed`):

- :func:`check_out`: a fresh run (no ``--resume``) needs ``--out`` to be new or empty (or to hold
  only the ``config.json`` of a start that failed before its first step); a
  directory that holds a run, or anything else, is refused (never overwritten, never deleted)
  with the way to continue it (``--resume``) or to start over (a new ``--out``). ``--resume``
  needs a run of the same family and preset with at least one checkpoint, and says what is
  missing (a typo'd path is noticed).
- :class:`RunLock`: ``out/.polymodal.lock`` holds the pid and host of the run and an exclusive
  ``fcntl.flock``; a second run on the same ``--out`` is refused naming the holder. The kernel
  drops the lock when its process dies, so a lock left by a killed run is stale and taken over
  (where ``flock`` is unsupported, the pid is checked on the same host instead).
- :func:`record_config`: ``config.json`` holds the config in force (what ``polymodal eval`` and
  ``load_run`` rebuild the task from) and ``config_history``: one entry per resume that changed a
  setting, ``{"step": s, "changed": {"lr": {"from": 0.002, "to": 0.001}}}``, so the original
  settings and every change stay on record.

>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> check_out(d, resume=False)  # an empty directory is fine
>>> with RunLock(d):
...     pass
"""

from __future__ import annotations

import errno
import json
import os
import socket
from pathlib import Path
from typing import Any, Callable

__all__ = ["RunDirError", "RunLock", "check_out", "read_json", "record_config", "agreed", "LOCK_NAME", "HELD_ENV"]

LOCK_NAME = ".polymodal.lock"
HELD_ENV = "POLYMODAL_RUN_LOCK_HELD"  # set by a process that holds the lock for the ranks it launches
OURS = ("config.json", "metrics.jsonl", "curves.png", "checkpoints")
VOLATILE = ("out", "progress", "stop_after", "resolved_device", "config_history")  # not settings of the run
_held: dict[str, int] = {}  # lock path -> depth, for re-entry within one process


class RunDirError(ValueError):
    """``--out`` cannot be used as asked (it holds another run, is in use, has no checkpoint, ...)."""


def read_json(path: str | os.PathLike, what: str = "") -> dict:
    """A JSON object from ``path``; an unreadable or malformed file is a :class:`RunDirError` naming it."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RunDirError(f"{what or 'cannot read'} {os.fspath(path)!r}: {type(e).__name__}: {e}") from None
    if not isinstance(d, dict):
        raise RunDirError(f"{what or 'cannot read'} {os.fspath(path)!r}: expected a JSON object, got "
                          f"{type(d).__name__}")
    return d


def _has_checkpoint(out: Path) -> bool:
    ck = out / "checkpoints"
    if not ck.is_dir():
        return False
    return any(n.startswith("ckpt-") and n.endswith(".safetensors") for n in os.listdir(ck)) or (
        ck / "latest.json").is_file() or (ck / "sharded").is_dir()


def check_out(out: str | os.PathLike, *, resume: bool, family: str | None = None, preset: str | None = None) -> None:
    """Refuse an ``--out`` that a fresh run would overwrite or that ``--resume`` cannot continue.

    Raises:
        RunDirError: naming the directory, what is in it, and how to continue or start over.
    """
    p, name = Path(out), os.fspath(out)
    if p.exists() and not p.is_dir():
        raise RunDirError(f"--out {name!r} is a file, expected a run directory: choose another --out")
    if resume:
        if not p.is_dir():
            raise RunDirError(f"--resume: no run directory {name!r} (is the path right? pass the --out of the run "
                              "to continue)")
        if not (p / "config.json").is_file():
            raise RunDirError(f"--resume: {name!r} holds no polymodal run (no config.json): pass the --out of the "
                              "run to continue, or start a new run without --resume")
        saved = read_json(p / "config.json", "--resume: unreadable run config")
        for k, v in (("family", family), ("preset", preset)):
            if v is not None and k in saved and saved[k] != v:
                raise RunDirError(f"--resume: {name!r} holds a {k} {saved[k]!r} run, not {v!r}: resume it as "
                                  f"{saved[k]!r}, or start the {v!r} run in a new --out")
        if not _has_checkpoint(p):
            raise RunDirError(f"--resume: no checkpoint in {os.path.join(name, 'checkpoints')!r}: the run stopped "
                              "before its first save, nothing to resume: start over in a new --out (or without "
                              "--resume when it never took a step)")
        return
    if not p.is_dir():
        return
    entries = sorted(n for n in os.listdir(p) if n != LOCK_NAME)
    ours = [n for n in entries if n in OURS]
    if ours == ["config.json"] == entries:  # a start that failed before its first step: nothing to lose
        return
    if ours:
        what = ""
        if (p / "config.json").is_file():
            try:
                saved = read_json(p / "config.json")
                what = f" {saved.get('family', '')} {saved.get('preset', '')}".rstrip()
            except RunDirError:
                pass
        raise RunDirError(f"--out {name!r} already holds a{what} run ({', '.join(ours)}): pass --resume to continue "
                          "it, or choose a new --out to start over (nothing in it is overwritten or deleted)")
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise RunDirError(f"--out {name!r} is not empty and holds no polymodal run ({shown}): choose a new or "
                          "empty --out (nothing in it is overwritten or deleted)")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory for the life of a run (a context manager; re-entrant
    within a process; a no-op in ranks whose launcher holds it, ``$POLYMODAL_RUN_LOCK_HELD``).

    Raises:
        RunDirError: on :meth:`acquire` when a live process holds the lock (its pid and host named).
    """

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self._fd: int | None = None
        self._entered = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _key(self) -> str:
        return os.path.realpath(self.path)

    def acquire(self) -> None:
        if self._entered:
            return
        key = self._key()
        if os.environ.get(HELD_ENV) == key or key in _held:
            _held[key] = _held.get(key, 0) + 1
            self._entered = True
            return
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:  # a parent that is a file, no permission, a read-only file system
            raise RunDirError(f"--out {os.fspath(self.out)!r}: cannot create the run directory "
                              f"({e.strerror or e}): choose another --out") from None
        try:
            self._lock(fd)
        except BaseException:
            os.close(fd)
            raise
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        self._fd = fd
        _held[key] = 1
        self._entered = True

    def _holder(self, fd: int) -> dict:
        try:
            d = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            return d if isinstance(d, dict) else {}
        except (ValueError, OSError):
            return {}

    def _busy(self, holder: dict) -> RunDirError:
        who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
        return RunDirError(f"--out {os.fspath(self.out)!r} is in use by another run ({who}; lock file "
                           f"{os.fspath(self.path)!r}): wait for it to finish, or choose another --out")

    def _lock(self, fd: int) -> None:
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            raise self._busy(self._holder(fd)) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
        holder = self._holder(fd)  # no flock on this file system: a live pid on this host holds it
        pid = holder.get("pid")
        if holder.get("host") == socket.gethostname() and isinstance(pid, int) and pid != os.getpid() and _alive(pid):
            raise self._busy(holder)

    def release(self) -> None:
        if not self._entered:
            return
        self._entered = False
        key = self._key()
        _held[key] = _held.get(key, 1) - 1
        if _held[key] > 0:
            return
        del _held[key]
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)  # the file stays (unlinking a flock'ed file races a waiting run)
            finally:
                os.close(self._fd)  # drops the flock
                self._fd = None


def record_config(out: str | os.PathLike, record: dict, *, resumed_at: int | None = None) -> dict:
    """Write ``config.json`` (atomically) and return what was written.

    A fresh run writes ``record``. A resumed run (``resumed_at``: the checkpoint step) keeps the saved
    ``config_history`` and appends ``{"step": resumed_at, "changed": {key: {"from", "to"}}}`` when a
    setting differs from the saved config (``out``, ``progress``, ``stop_after`` and the resolved
    device are not settings); the top level is the config in force.
    """
    path = Path(out) / "config.json"
    record = json.loads(json.dumps(record))  # as it reads back (tuples are lists)
    history: list = []
    if resumed_at is not None and path.is_file():
        saved = read_json(path, "unreadable run config")
        history = list(saved.get("config_history") or [])
        changed = {k: {"from": saved.get(k), "to": v} for k, v in record.items()
                   if k not in VOLATILE and saved.get(k, v) != v}
        changed |= {k: {"from": saved[k], "to": None} for k in saved if k not in VOLATILE and k not in record}
        if changed:
            history.append({"step": resumed_at, "changed": changed})
    full = {**record, "config_history": history} if history else dict(record)
    tmp = path.with_name(f".tmp-{os.getpid()}-config.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(full, indent=2))
    os.replace(tmp, path)
    return full


def agreed(check: Callable[[], None]) -> None:
    """Run ``check`` on rank 0 only and raise its :class:`RunDirError` on every rank (one process: just run it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        check()
        return
    msg = [None]
    if dist.get_rank() == 0:
        try:
            check()
        except RunDirError as e:
            msg = [str(e)]
    dist.broadcast_object_list(msg, src=0)
    if msg[0] is not None:
        raise RunDirError(msg[0])
