"""One live run per output folder: `OUTPUT/run.lock`, an advisory file lock that names its owner (pid and host).

Why: two runs writing into one folder interleave checkpoints and metrics, and one run's pruning of old checkpoints
deletes the checkpoint the other is about to read. The second run is refused before it writes anything.

The lock is a POSIX `flock` on `run.lock`, so the kernel releases it when its process dies, SIGKILL included: a lock
file left behind by a dead run is not held by anyone and is taken over with a note. The file records the owner for the
refusal message; `release` (also on exceptions, and when the object is garbage-collected) deletes it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from multicrafter.errors import UserError, one_line

try:
    import fcntl
except ImportError:  # Windows has no flock; there the folder is not locked
    fcntl = None

LOCK_FILE = "run.lock"


def _read_owner(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode("utf-8", errors="replace") or "{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


class RunLock:
    """`acquire()` takes OUTPUT/run.lock or raises a one-line UserError naming the job that holds it."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self._fd: int | None = None
        self._made_dir = False   # the lock created the folder: an unused one is removed again on release

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a dead run's lock file was taken over, else None."""
        if fcntl is None or self._fd is not None:
            return None
        while True:
            try:
                if not self.output_dir.exists():
                    self.output_dir.mkdir(parents=True)
                    self._made_dir = True
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise UserError(f"cannot use output dir {self.output_dir}: {one_line(exc)}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise UserError(f"output dir {self.output_dir} is used by a running job ({_describe(owner)}); stop "
                                "it or choose another --output-dir") from None
            except BaseException:
                os.close(fd)
                raise
            # The owner deletes the file before unlocking: if it did so between our open and flock, we locked a
            # deleted file and must start over on the current one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_owner(fd)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                  "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
        os.fsync(fd)
        self._fd = fd
        if previous:
            return (f"note: {self.path} was left by a run that ended without releasing it ({_describe(previous)}); "
                    "taking it over")
        return None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)   # before unlocking: see the inode check in acquire
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        if self._made_dir:   # a run refused before writing anything leaves no empty folder behind
            try:
                self.output_dir.rmdir()
            except OSError:
                pass   # not empty: the run wrote its files

    def __enter__(self) -> RunLock:
        note = self.acquire()
        if note:
            print(note)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:
        if self._fd is not None and fcntl is not None:
            self.release()


def _describe(owner: dict[str, Any]) -> str:
    pid = owner.get("pid", "unknown")
    host = owner.get("host")
    return f"pid {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


__all__ = ["LOCK_FILE", "RunLock"]
