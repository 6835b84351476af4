"""Summarise a per-request trace (bench.federation --trace DIR; bench/trace/sitecustomize.py wrote it).

    python -m bench.request_trace DIR [--json OUT]

Per process role (SuperLink, ServerApp, SuperNode, ClientApp) and request: how many, the bytes they carried,
and their median, 90th-percentile and longest durations. A client request's duration includes the network,
the proxy and the server's queue; the server's handler time beside it is what the handler itself took, so
the difference is what Flower's HTTP machinery and waiting cost.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

ROLES = (  # (substring of a process's command line, role); first match wins
    ("superlink.flower_entry", "SuperLink"),
    ("flwr-serverapp", "ServerApp"),
    ("supernode.flower_entry", "SuperNode"),
    ("flwr-clientapp", "ClientApp"),
)


def role_of(argv: list[str]) -> str | None:
    line = " ".join(argv)
    return next((role for needle, role in ROLES if needle in line), None)


def read(folder: Path) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """(role, kind, name) -> the spans of every traced process of that role."""
    spans: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for path in sorted(folder.glob("*.jsonl")):
        role = None
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "argv" in record:
                role = role_of(record["argv"])
            elif role is not None:
                spans[(role, record["kind"], record["name"])].append(record)
    return spans


def summarize(folder: Path) -> list[dict[str, Any]]:
    rows = []
    for (role, kind, name), spans in sorted(read(folder).items()):
        durations = sorted(s["end"] - s["start"] for s in spans)
        rows.append({
            "role": role, "kind": kind, "name": name, "count": len(spans),
            "bytes": sum(s["bytes"] for s in spans),
            "median_s": statistics.median(durations),
            "p90_s": durations[min(len(durations) - 1, int(0.9 * len(durations)))],
            "max_s": durations[-1],
        })
    return rows


def print_summary(rows: list[dict[str, Any]]) -> None:
    print("| process | request / handler | count | MB | median s | p90 s | max s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['role']} | {r['kind']} {r['name']} | {r['count']} | {r['bytes'] / 2**20:.1f} | "
              f"{r['median_s']:.3f} | {r['p90_s']:.3f} | {r['max_s']:.3f} |")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="bench.request_trace", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        raise SystemExit(f"error: no trace folder {args.folder}")
    rows = summarize(args.folder)
    print_summary(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
