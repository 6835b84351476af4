"""Process helpers shared by the long-lived helpers a launcher starts (metrics exporter, warm trainer)."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
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


EXIT_GRACE_S = 10.0


def exit_even_if_threads_hang(code: int, grace_s: float | None = None) -> None:
    """End this process with `code` within `grace_s`, whatever non-daemon thread is left.

    Python waits at exit for every non-daemon thread. Flower's SuperNode runs its Runtime API server in
    one, which nothing stops when the node's main loop dies of an error: the process would stay up as a
    node that never polls again, invisible to a restart policy. A daemon timer exits hard if the normal
    exit has not finished by then (its handlers and log flushes run first)."""
    timer = threading.Timer(EXIT_GRACE_S if grace_s is None else grace_s, os._exit, args=(code,))
    timer.daemon = True
    timer.start()


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PR_SET_CHILD_SUBREAPER = 36


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` for subprocess.Popen: the child is sent `sig` when this process dies, however it
    dies (SIGKILL and OOM kills included, which no handler of ours sees). None off Linux.

    PR_SET_PDEATHSIG fires when the *thread* that forked exits, not the process, so only the main thread
    may spawn with it (checked). The setting survives exec, so it reaches nginx or flwr itself; it is not
    inherited by their own children: nginx's master stops its workers on SIGTERM, and the SuperLink its
    SuperExec. Everything the hook needs is looked up before fork: between fork and exec the child must
    not take locks other threads may hold."""
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("die_with_parent: spawn from the main thread (PDEATHSIG follows its thread)")
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()
    signum = int(sig)
    kill, getpid, getppid = os.kill, os.getpid, os.getppid

    def hook() -> None:
        if prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if getppid() != parent:  # the parent died between fork and prctl: nobody will signal us now
            kill(getpid(), signum)

    return hook


def adopt_orphans() -> bool:
    """Make this process a child subreaper (Linux): a descendant whose parent dies is reparented to us,
    not to init, so a supervisor can still stop it. False where that is not possible."""
    if not sys.platform.startswith("linux"):
        return False
    return bool(ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def process_parents() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) of every process in /proc; one that ends while read is left out."""
    table: dict[int, tuple[int, str]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm)": state, ppid, ...
        table[int(entry)] = (int(fields[1]), fields[0])
    return table


def our_children() -> set[int]:
    """The pids of this process's live children (those it started and orphans it adopted), from /proc."""
    me = os.getpid()
    return {pid for pid, (parent, state) in process_parents().items() if parent == me and state != "Z"}
