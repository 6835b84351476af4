"""Where a process spends its time, from a py-spy profile: per process (py-spy `--subprocesses`), its
samples and the functions with the most samples under them (inclusive) and in them (self).

    py-spy record --subprocesses --format raw -o prof.txt -- python3 -m bench.compile_cache ...
    python -m bench.pyspy_top prof.txt [--top 25] [--min-share 0.05] [--focus load_by_key_path]

`--focus TEXT`: only the samples under the first frame containing TEXT, and only the frames below it.

Raw format: one line per distinct stack, `root;caller;...;leaf COUNT`; with `--subprocesses` a child's
stack hangs under its parent's, below a `process PID:"command line"` frame (a command line may hold a
newline): each sample counts for the innermost process only.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict
from pathlib import Path

# py-spy's frame: "function (file.py:line)"; the line is dropped so one function is one row
FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def frame_key(frame: str) -> str:
    match = FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    path = match["file"]
    short = "/".join(path.split("/")[-2:])  # package/module.py: enough to tell torch from bitsandbytes
    return f"{match['name']} ({short})"


def read(path: Path) -> dict[str, list[tuple[list[str], int]]]:
    """Stacks per process (the innermost `process ...` frame)."""
    stacks: dict[str, list[tuple[list[str], int]]] = defaultdict(list)
    pending = ""
    for line in path.read_text(errors="replace").splitlines():
        pending += line
        stack, _, count = pending.rpartition(" ")
        if not stack or not count.isdigit():
            pending += " "  # a command line's newline: the stack goes on on the next line
            continue
        pending = ""
        frames = stack.split(";")
        starts = [i for i, frame in enumerate(frames) if frame.startswith("process ")] or [0]
        stacks[frames[starts[-1]]].append((frames[starts[-1] + 1:], int(count)))
    return stacks


def focused(stacks: list[tuple[list[str], int]], text: str) -> list[tuple[list[str], int]]:
    kept = []
    for frames, n in stacks:
        at = next((i for i, frame in enumerate(frames) if text in frame), None)
        if at is not None:
            kept.append((frames[at:], n))
    return kept


def summary(path: Path, top: int, min_share: float, focus: str | None = None) -> str:
    lines = []
    per_process = read(path)
    if focus:
        per_process = {process: focused(stacks, focus) for process, stacks in per_process.items()}
    total_all = sum(n for stacks in per_process.values() for _, n in stacks)
    for process, stacks in sorted(per_process.items(), key=lambda item: -sum(n for _, n in item[1])):
        total = sum(n for _, n in stacks)
        if total == 0 or total < min_share * total_all:
            continue
        inclusive: Counter[str] = Counter()
        own: Counter[str] = Counter()
        for frames, n in stacks:
            keys = [frame_key(f) for f in frames if not f.startswith("thread ")]
            for key in set(keys):
                inclusive[key] += n
            if keys:
                own[keys[-1]] += n
        under = f" under {focus!r}" if focus else ""
        lines.append(f"== {process[:160]}: {total} samples{under}")
        lines.append("  inclusive:")
        lines += [f"    {n / total:6.1%}  {key}" for key, n in inclusive.most_common(top)]
        lines.append("  self:")
        lines += [f"    {n / total:6.1%}  {key}" for key, n in own.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--min-share", type=float, default=0.05, help="skip processes with fewer samples")
    parser.add_argument("--focus", help="only samples under the first frame containing this text")
    args = parser.parse_args(argv)
    print(summary(args.profile, args.top, args.min_share, args.focus))


if __name__ == "__main__":
    main()
