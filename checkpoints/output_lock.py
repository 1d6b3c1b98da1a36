"""One writer per output folder, and the leftovers of writers that died.

A writer holds an exclusive lock on ``.OUT.mergescope-lock`` beside the output folder ``OUT`` from before it
creates its temporary folder until the folder is renamed into place or removed. A second writer for the same
output fails at once with one line naming the process that holds the lock, so two merges racing for one folder
never both complete and never mix. The lock is an ``flock``: the kernel drops it when its process dies, even
by SIGKILL, so a dead writer never blocks the next one.

Holding the lock, a writer knows that no other writer of ``OUT`` is alive, so every temporary folder of
``OUT`` it finds (``.OUT.XXXXXXXX.partial``, ``.OUT.replaced-PID``) was left by a killed process, and is
removed.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from .errors import CheckpointError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock, and so no clean-up of leftovers either
    fcntl = None

#: how a writer names its temporary folder: ``prefix`` + 8 random characters (tempfile's) + ``suffix``
PARTIAL_SUFFIX = ".partial"


def partial_prefix(out: Path) -> str:
    return f".{out.name}."


def lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.mergescope-lock")


def leftovers(out: Path) -> list[Path]:
    """The temporary folders a writer of ``out`` makes (its partial folder, a replaced output on its way to
    removal), found beside ``out``; only those of exactly this output name."""
    ours = r"([a-z0-9_]{8}" + re.escape(PARTIAL_SUFFIX) + r"|replaced-\d+)"
    pattern = re.compile(re.escape(partial_prefix(out)) + ours)
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return []
    return sorted(p for p in entries if pattern.fullmatch(p.name) and not p.is_symlink() and p.is_dir())


class OutputLock:
    """The exclusive lock of output folder ``out``; :meth:`release` also removes the lock file."""

    def __init__(self, out: Path):
        self.out = out
        self.path = lock_path(out)
        self._fd: int | None = None
        while self._fd is None:
            self._fd = self._try_acquire()

    def _try_acquire(self) -> int | None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            raise CheckpointError(
                f"{self.out}: cannot create the lock {self.path.name}: {exc.strerror or exc}"
            ) from None
        if fcntl is None:  # pragma: no cover - Windows
            return fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(
                f"{self.out}: another mergescope process (pid {holder}) is writing this folder; wait for it to "
                "finish or choose another output folder"
            ) from None
        try:  # the holder we waited on may have removed the file: lock the file that is there now, not the old one
            same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            return None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    def remove_leftovers(self) -> list[Path]:
        """Remove the temporary folders of dead writers of this output (see the module docstring)."""
        if fcntl is None:  # pragma: no cover - Windows: without a lock, another writer may be alive
            return []
        found = leftovers(self.out)
        for folder in found:
            shutil.rmtree(folder, ignore_errors=True)
        return found

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None
