"""`fedtune report RUN_DIR`: (re)make a run's report.html and PNGs from its folder and print the
round table."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run's output folder (it holds results.json)")
    parser.add_argument("--no-table", action="store_true", help="only write the report")


def run(args: argparse.Namespace) -> int:
    from fedtune.report import write_report
    from fedtune.report.table import round_table
    from fedtune.report.view import load

    path = write_report(args.run_dir)
    if not args.no_table:
        view = load(args.run_dir)
        print(round_table(view))
        print(f"status: {view.status}" + (f" ({view.error})" if view.error else ""))
        if view.final_adapter:
            print(f"global adapter: {view.final_adapter}")
    print(f"report: {path}")
    return 0
