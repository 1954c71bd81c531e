"""An inter-process lock that leaves no file behind (the lock that writers of one profile hold).

On POSIX it is an `flock` on a lock file that exists only while the lock is held: the holder removes it before it
lets go, so no empty `.lock` files pile up beside the profiles. Removing a lock file is safe only with a check on
the taking side: a waiter may have opened the file just before the holder removed it, and would then lock an inode
that no one else will ever open again. So a process that gets the lock checks that the path still names the inode
it locked; if not, it lets go and tries again with whatever file the path names now. Only a holder removes the file,
and a holder always holds the inode the path names, so at most one process at a time holds the lock.

Without `flock` (Windows, some network file systems) it is `filelock.FileLock`, which removes its file itself
where it safely can (Windows refuses to remove a file that another process has open).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

logger = logging.getLogger(__name__)

# How often a waiting process tries again (a profile write holds the lock for milliseconds).
POLL_INTERVAL_S = 0.01
_CONTENDED = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES}
_UNSUPPORTED = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP}


@contextlib.contextmanager
def file_lock(path: Path, timeout: float) -> Iterator[None]:
    """Holds the inter-process lock named by `path` for the `with` block; the file is gone once it is released.

    Raises:
        `TimeoutError`: when another process held it for `timeout` seconds.
    """
    path = Path(path)
    descriptor = _acquire(path, timeout) if fcntl is not None else None
    if descriptor is None:  # no flock here
        from filelock import FileLock

        with FileLock(path, timeout=timeout):
            yield
        return
    try:
        yield
    finally:
        _release(path, descriptor)


def _acquire(path: Path, timeout: float) -> int | None:
    """An open descriptor of the file at `path`, locked, that `path` still names; `None` where flock is missing."""
    deadline = time.monotonic() + timeout
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(descriptor)
            if error.errno in _UNSUPPORTED:
                logger.debug("no flock for %s (%s): using filelock", path, error)
                return None
            if error.errno not in _CONTENDED:
                raise
            if time.monotonic() > deadline:
                raise TimeoutError(f"another process held the lock {path} for {timeout:g} s") from None
            time.sleep(POLL_INTERVAL_S)
            continue
        if _names(path, descriptor):
            return descriptor
        os.close(descriptor)  # the holder removed this file after it was opened: lock the path's current one


def _release(path: Path, descriptor: int) -> None:
    """Removes the lock file while still holding it (waiters on it then see it is gone), then lets go."""
    try:
        if _names(path, descriptor):
            with contextlib.suppress(OSError):  # a file left behind costs nothing: the next holder removes it
                path.unlink()
    finally:
        os.close(descriptor)  # releases the flock


def _names(path: Path, descriptor: int) -> bool:
    """Whether `path` names the file open as `descriptor`."""
    try:
        linked = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(descriptor)
    return (linked.st_dev, linked.st_ino) == (opened.st_dev, opened.st_ino)
