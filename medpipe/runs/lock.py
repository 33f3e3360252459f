"""One trainer per run folder: an exclusive lock on `RUN/.lock`, so a second `train-seg` or
`train-reg` on the same folder is refused with the holder's name instead of both writing
checkpoints over each other.

The lock is the kernel's (`flock`): it goes when the holding process ends, however it ends
(a SIGKILL leaves no stale lock to clean up). The file itself only says who holds it.
Within one process the lock is re-entrant (set-up and training may both ask for it).
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from pathlib import Path
from typing import IO

from medpipe.errors import MedpipeError

_HELD: dict[Path, IO[str]] = {}


def lock_run_folder(folder: Path) -> None:
    """Hold FOLDER's lock until `unlock_run_folder` or the end of the process; refused
    with a one-line error when another process holds it."""
    folder = Path(folder).resolve()
    if folder in _HELD:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / ".lock", "a+", encoding="utf-8")  # noqa: SIM115 (held open)
    except OSError as error:
        raise MedpipeError(f"cannot lock the run folder: {error.strerror or error}",
                           folder) from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise MedpipeError(f"this run folder is in use by {holder}; wait for it to end, "
                           "or stop it, before training here", folder) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handle.flush()
    _HELD[folder] = handle


def unlock_run_folder(folder: Path) -> None:
    handle = _HELD.pop(Path(folder).resolve(), None)
    if handle is not None:
        handle.close()  # closing the file releases the lock
