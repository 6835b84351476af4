"""Helpers for tests that drive this host: commands (ip, tc, curl) and the processes a launcher leaves."""

from __future__ import annotations

import subprocess
from pathlib import Path

from fedtune.process import process_parents


def sh(*cmd: str) -> str:
    """Run a command; its stdout, or RuntimeError with its stderr."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done.stdout


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def processes_mentioning(text: str) -> list[int]:
    """Every process whose command line contains `text`."""
    return [pid for pid in process_parents() if text in cmdline(pid)]


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] != "Z"


def process_tree(pid: int) -> list[int]:
    """Every live descendant of `pid` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for child, (parent, _) in process_parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
