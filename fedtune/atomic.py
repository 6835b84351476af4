"""Atomic file writes, the one implementation every writer uses.

A reader sees the old file or the new one, never part of one: the bytes go to a temporary file in the same
folder, which is fsynced and renamed over the target; the folder is fsynced too, so after a crash or power
loss the rename has either happened or not. Secrets pass `mode=0o600`: the file never exists with wider
permissions, not even as the temporary."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename or creation in `folder` durable (no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike[str], data: bytes, mode: int = 0o666, fsync: bool = True) -> Path:
    """Replace `path` with `data` atomically. `mode` is filtered by the umask, as for open()."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Unique per process and thread: concurrent writers of one file never share a temporary.
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a leftover of a crashed writer with our pid
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if fsync:
        fsync_dir(target.parent)
    return target


def write_text(path: str | os.PathLike[str], text: str, mode: int = 0o666, fsync: bool = True) -> Path:
    return write_bytes(path, text.encode("utf-8"), mode, fsync)


def write_json(
    path: str | os.PathLike[str], payload: Any, indent: int | None = 2, fsync: bool = True
) -> Path:
    return write_bytes(path, (json.dumps(payload, indent=indent) + "\n").encode("utf-8"), fsync=fsync)
