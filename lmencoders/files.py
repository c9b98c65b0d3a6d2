"""Writing files so that an interrupted write never leaves a file that looks complete, and
holding a file so that two processes do not do the same work at once.

A temporary file carries the host and process that write it, so a later process can tell an
orphan (its writer is gone: killed, out of memory) from a write still in progress.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "hold_file", "remove_orphaned_temporaries"]

_umask = os.umask(0)
os.umask(_umask)
_FILE_MODE = 0o666 & ~_umask  # what open() would give; mkstemp's files are private (0600)
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
_TEMPORARY = re.compile(r"^.+\.(?P<host>[A-Za-z0-9_-]+)~(?P<pid>\d+)\.[^.]+\.tmp$")
_FOREIGN_AGE = 24 * 3600.0  # another host's temporary this old is an orphan


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f"{path.name}.{_HOST}~{os.getpid()}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_orphaned_temporaries(folder: str | Path) -> list[Path]:
    """Delete temporary files in ``folder`` whose writer is gone: this host's files whose
    process no longer runs, and other hosts' files older than a day. Returns what went."""
    removed = []
    now = time.time()
    for path in Path(folder).glob("*.tmp"):
        match = _TEMPORARY.match(path.name)
        try:
            if match is None or match["host"] != _HOST:
                orphan = now - path.stat().st_mtime > _FOREIGN_AGE
            else:
                orphan = not _alive(int(match["pid"]))
            if orphan:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:  # its writer renamed or removed it meanwhile
            continue
    return removed


@contextlib.contextmanager
def hold_file(path: str | Path, *, shared: bool = False, wait: bool = True) -> Iterator[bool]:
    """Hold an advisory lock on ``path`` (made empty, with its folder, if missing) while the
    block runs.

    Yields True once held; with ``wait=False`` it yields False at once, holding nothing, where
    another process holds it. ``shared``: many holders at once, none while one holds it
    exclusively. The operating system drops the hold when its process dies, so a killed
    process never leaves work held. Where ``fcntl`` is missing (Windows) every file is free.
    """
    try:
        import fcntl
    except ImportError:
        yield True
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, mode)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
