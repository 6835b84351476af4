"""Process helpers shared by the long-lived helpers a launcher starts (metrics exporter, warm trainer)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

log = logging.getLogger("fedtune.process")


def _exit_now() -> None:
    os._exit(0)  # a helper whose parent is gone has no one to report to: no cleanup to wait for


def exit_with_parent(parent_pid: int, on_gone: Callable[[], None] = _exit_now, interval: float = 2.0) -> None:
    """Call `on_gone` (default: exit) once this process is reparented, i.e. `parent_pid` has died.

    Helpers are started by a launcher that later exec()s into the SuperLink/SuperNode, so the pid stays
    the same for as long as the role runs. Linux's PR_SET_PDEATHSIG would fire on the death of the
    *thread* that forked, which is why a plain watcher thread is used."""

    def watch() -> None:
        stop = threading.Event()
        while not stop.wait(interval):
            if os.getppid() != parent_pid:
                log.info("parent process %d is gone: stopping", parent_pid)
                on_gone()
                return

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
