"""One writer per run folder: an exclusive OS file lock held for the run's life.

A second process on the same folder fails at once with the holder's pid and host. The lock is the
kernel's (``fcntl.flock``), so it dies with its process: a run killed by SIGKILL or a crashed node
leaves the lock file behind but never a held lock, and a resume takes it again. On network
filesystems without flock support the lock cannot be taken and the run says so instead of
pretending.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".ivpt.lock"


try:
    import fcntl

    def _lock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
except ImportError:  # Windows: a byte-range lock on the lock file's first byte
    import msvcrt

    def _lock(fd: int) -> None:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


class RunLockedError(OSError):
    """Another live process holds the run folder."""


class RunLock:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock(fd)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLockedError(errno.EBUSY, f"{self.folder} is in use by another ivpt process "
                                     f"({self.holder()}); wait for it to end or choose another output") from None
            raise OSError(err.errno, f"cannot lock {self.path} ({err.strerror}): this filesystem may not "
                                     "support file locks; use a local or lock-capable folder") from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        except OSError:  # e.g. a full disk: never keep a lock nobody can name
            _unlock(fd)
            os.close(fd)
            raise
        self.fd = fd
        return self

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
            return f"pid {info['pid']} on {info['host']}, since {info['since']}"
        except (OSError, ValueError, KeyError):
            return "holder unknown"

    def release(self) -> None:
        if self.fd is not None:
            _unlock(self.fd)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
