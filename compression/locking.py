"""One writer per directory: an exclusive, non-blocking lock on a ``.lock`` file inside it.

The lock belongs to the open file, so the operating system drops it when the process ends, however
it ends: a killed run never leaves a directory locked. Two processes that claim one directory at
the same moment cannot both win.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

if os.name == "nt":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(handle: IO[bytes]) -> bool:
        try:
            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
else:
    import fcntl

    def _try_lock(handle: IO[bytes]) -> bool:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

__all__ = ["DirectoryLocked", "DirectoryLock"]

LOCK_NAME = ".lock"


class DirectoryLocked(RuntimeError):
    """Another process holds the directory."""


class DirectoryLock:
    """``DirectoryLock(path).acquire()`` creates ``path`` if needed and locks it, or raises
    ``DirectoryLocked``; ``release()`` (or the end of a ``with`` block, or of the process) unlocks it."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._handle: IO[bytes] | None = None

    @property
    def held(self) -> bool:
        return self._handle is not None

    def acquire(self) -> DirectoryLock:
        if self._handle is not None:
            return self
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / LOCK_NAME, "a+b")  # noqa: SIM115 - held open as long as the lock
        if not _try_lock(handle):
            handle.close()
            raise DirectoryLocked(f"{self.path} is in use by another process")
        self._handle = handle
        return self

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing the file drops its lock
            self._handle = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
