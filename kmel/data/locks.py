"""One writer per output folder: ``build-records --out`` and ``train --out`` hold ``OUT/.kmel.lock`` while
they write, so a second command into the same folder stops at once, saying who holds it, instead of
racing the first (two record builds into one folder used to leave a raw path error and a 0-byte
``.tmp``). The lock is the operating system's (``flock``): a killed process releases it with its file
descriptors, so a kill -9 never leaves a folder locked."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kmel.config import ConfigError

LOCK_NAME = ".kmel.lock"


@contextmanager
def folder_lock(folder: str | Path, command: str) -> Iterator[Path]:
    """Hold ``folder``'s lock (the folder is created) for the block; exit 2 naming the holder when taken."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK_NAME, "a+")
    except OSError as exc:
        raise ConfigError(f"cannot write to {folder} ({exc.strerror or type(exc).__name__}): choose an output "
                          "folder you can write to") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ConfigError(f"{folder} is being written by {holder}: wait for it to finish, or choose another "
                              "output folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"`kmel {command}` (pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        handle.flush()
        yield folder
    finally:
        handle.close()  # releases the lock
