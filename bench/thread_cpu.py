"""Per-thread CPU of one running process, sampled from /proc: is the SuperLink's event loop a full core?

    python -m bench.thread_cpu --match superlink.flower_entry [--interval 0.2] [--out FILE.jsonl]
    python -m bench.thread_cpu --summarize FILE.jsonl --rounds FEDERATION.json   # per round, afterwards

Waits for a process whose command line contains `--match`, then every `--interval` seconds reads each of
its threads' user+system CPU ticks (/proc/PID/task/*/stat) until the process ends (or `--seconds` pass),
writing one JSON line per sample (epoch seconds, {thread id: [name, CPU seconds so far]}). On exit it prints,
per thread name, its CPU seconds and its busiest 1-second window (1.00 = one full core), and for the whole
process the busiest second: a thread at ~1.00 while the process sums to ~1 core is one thread's limit (the
event loop); the process summing to ~1 core over many threads is the GIL's. Linux only; a bench tool, not
shipped.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from pathlib import Path

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def find_pid(match: str, timeout_s: float) -> int | None:
    deadline = time.monotonic() + timeout_s
    me = os.getpid()
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if match in cmdline and "bench.thread_cpu" not in cmdline:
                return int(entry.name)
        time.sleep(0.5)
    return None


def process_time(pid: int) -> float:
    """The process's CPU seconds so far, its ended threads' included."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S


def thread_times(pid: int) -> dict[int, tuple[str, float]]:
    """thread id -> (name, CPU seconds so far)."""
    out: dict[int, tuple[str, float]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) * TICK_S)
    return out


def busiest_second(samples: list[tuple[float, float]]) -> float:
    """The most CPU seconds spent in any 1 s window of a cumulative (time, cpu) series."""
    best, start = 0.0, 0
    for end in range(len(samples)):
        while samples[end][0] - samples[start][0] > 1.0:
            start += 1
        span = samples[end][0] - samples[start][0]
        if span >= 0.5:
            best = max(best, (samples[end][1] - samples[start][1]) / span)
    return best


def summarize(lines: list[dict]) -> str:
    per_thread: dict[str, list[tuple[float, float]]] = {}
    process: list[tuple[float, float]] = []
    for line in lines:
        now = line["t"]
        for tid, (name, cpu) in line["threads"].items():
            per_thread.setdefault(f"{name} ({tid})", []).append((now, cpu))
        process.append((now, line["process"]))
    rows = []
    for key, series in per_thread.items():
        used = series[-1][1] - series[0][1]
        if used < 0.05:
            continue
        rows.append((used, key, busiest_second(series)))
    rows.sort(reverse=True)
    text = ["| thread | CPU s | busiest second (cores) |", "|---|---|---|"]
    text += [f"| {key} | {used:.2f} | {peak:.2f} |" for used, key, peak in rows[:15]]
    if process:
        used = process[-1][1] - process[0][1]
        text.append(f"| whole process | {used:.2f} | {busiest_second(process):.2f} |")
    return "\n".join(text)


def in_rounds(lines: list[dict], federation_json: Path) -> str:
    """The samples cut to each round's window (bench.federation's JSON: started_at + wall), summed up."""
    report = json.loads(federation_json.read_text())
    out = []
    for run in report["runs"]:
        for record in run["rounds"]:
            start = record["started_at"]
            window = [line for line in lines if start <= line["t"] <= start + record["wall_seconds"]]
            if len(window) < 3:
                continue
            out.append(f"\n{run['profile']} round {record['round']} ({record['wall_seconds']:.2f} s, "
                       f"non-training {record['non_training_seconds']:.2f} s):")
            out.append(summarize(window))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.thread_cpu")
    parser.add_argument("--match", help="text in the process's command line")
    parser.add_argument("--summarize", type=Path, help="a JSONL file this tool wrote")
    parser.add_argument("--rounds", type=Path, help="with --summarize: bench.federation's JSON")
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--seconds", type=float, default=3600.0)
    parser.add_argument("--wait", type=float, default=600.0, help="how long to wait for the process")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.summarize:
        opener = gzip.open if args.summarize.suffix == ".gz" else open
        with opener(args.summarize, "rt") as saved_lines:
            saved = [json.loads(line) for line in saved_lines if line.strip()]
        print(in_rounds(saved, args.rounds) if args.rounds else summarize(saved))
        return
    if not args.match:
        parser.error("--match or --summarize")
    pid = find_pid(args.match, args.wait)
    if pid is None:
        raise SystemExit(f"error: no process matching {args.match!r} within {args.wait:.0f} s")
    lines: list[dict] = []
    sink = args.out.open("w") if args.out else None
    end = time.monotonic() + args.seconds
    try:
        while time.monotonic() < end and Path(f"/proc/{pid}").exists():
            try:
                line = {"t": time.time(), "process": process_time(pid), "threads": thread_times(pid)}
            except OSError:  # the process ended between the check and the read
                break
            lines.append(line)
            if sink:
                sink.write(json.dumps(line) + "\n")
            time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    finally:
        if sink:
            sink.close()
    print(f"pid {pid} ({args.match}), {len(lines)} samples every {args.interval} s")
    print(summarize(lines))


if __name__ == "__main__":
    main()
