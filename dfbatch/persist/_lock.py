"""One process at a time on a folder: an exclusive ``flock`` on a lock file holding the pid.

``hold(lock, what, busy)`` takes the lock or raises ``CheckpointError``: ``what`` names the
folder in the message when it cannot be used, ``busy`` says what to do when another process
(named by the pid in the file) holds it. Closing the returned descriptor releases the lock;
so does the process's end, kill -9 included. Where there is no ``flock`` (Windows) nothing
is locked.

Examples
--------
>>> import os, tempfile
>>> from pathlib import Path
>>> folder = Path(tempfile.mkdtemp())
>>> fd = hold(folder / "lock", "demo folder", "wait for it")
>>> (folder / "lock").read_text() == str(os.getpid())
True
>>> os.close(fd)
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from dfbatch.errors import CheckpointError


def hold(lock: Path, what: str, busy: str) -> int:
    """Lock ``lock`` (creating its folder); the open descriptor (close it to unlock)."""
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        msg = f"cannot use {what}: {exc}"
        raise CheckpointError(msg) from None
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # pragma: no cover - no flock (Windows): no protection
        pass
    except OSError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        msg = f"{what} is in use by another run (process {holder} holds {str(lock)!r}): {busy}"
        raise CheckpointError(msg) from None
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    return fd
