"""One run per folder at a time: a lock file in the run folder, held for the run's life.

The lock is an advisory ``flock`` on ``RUN/.run.lock``: the kernel releases it when its process dies, however it dies,
so a lock left by a killed run is stale by construction and the next run takes it over, naming the dead process. The
file holds the holder's pid, host and start time for the messages; it is removed when the run ends.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from contrastive.errors import ConfigError

log = logging.getLogger("contrastive")

LOCK_NAME = ".run.lock"
F = TypeVar("F", bound=Callable[..., Any])


def _holder(fd: int) -> dict[str, Any]:
    """What the lock file says about the process that wrote it (empty if nothing readable)."""
    try:
        text = os.pread(fd, 4096, 0).decode()
        record = json.loads(text) if text.strip() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def _describe(record: dict[str, Any]) -> str:
    if not record:
        return "a process that left no record"
    started = record.get("started")
    since = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, float) else ""
    return f"pid {record.get('pid')} on {record.get('host')}{since}"


def _alive(record: dict[str, Any]) -> bool:
    """Whether the recorded process still runs (only knowable on its own host)."""
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _refuse(folder: Path, record: dict[str, Any]) -> ConfigError:
    return ConfigError(
        f"the run folder {folder} is in use by another run ({_describe(record)}): wait for it to end, or start this "
        "run in a new folder (hydra.run.dir=... or output_dir=...)"
    )


def _open(path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise ConfigError(
            f"cannot write into the run folder {path.parent} ({err.strerror or err}): choose a writable run folder "
            "(hydra.run.dir=... or output_dir=...)"
        ) from None


@contextmanager
def run_lock(folder: str | Path) -> Iterator[Path]:
    """Hold ``folder``'s run lock for the ``with`` block; ``ConfigError`` (refused, exit 2) naming the holder if a
    live process holds it. A lock left by a dead process is taken over with a warning naming its pid."""
    folder = Path(folder)
    path = folder / LOCK_NAME
    while True:
        fd = _open(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            record = _holder(fd)
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _refuse(folder, record) from None
            # a file system without flock: the recorded pid is all there is to go by
            if _alive(record) and record.get("pid") != os.getpid():
                raise _refuse(folder, record) from None
            fd = _open(path)
            break
        # the holder may have ended (and removed the file) between this open and the lock: the lock must be on
        # the file that is there now, or a third run could take a new file at the same time
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    previous = _holder(fd)
    if previous:
        state = "is no longer running" if not _alive(previous) else "no longer holds it"
        log.warning("cleared a stale lock on the run folder %s: %s %s", folder, _describe(previous), state)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    try:
        yield path
    finally:
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                path.unlink()
        except FileNotFoundError:
            pass
        os.close(fd)  # releases the flock


def launched_rank() -> bool:
    """A process of a multi-process run other than the first (its ranks re-run the training entry point): the
    first process holds the folder's lock for all of them."""
    return any(int(os.environ.get(k, "0") or 0) != 0 for k in ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID"))


def locks_run_folder(folder_of: Callable[[Any], Path]) -> Callable[[F], F]:
    """Decorates ``train(cfg, ...)``: the run folder ``folder_of(cfg)`` is locked for the whole call, before the
    checks that read it (a run that already holds it) and until its summary is written."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(cfg: Any, *args: Any, **kwargs: Any) -> Any:
            if launched_rank():
                return fn(cfg, *args, **kwargs)
            with run_lock(folder_of(cfg)):
                return fn(cfg, *args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
