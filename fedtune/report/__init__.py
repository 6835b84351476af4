"""The run report: `report.html` and its figures as PNGs in the run's output folder.

`write_report(run_dir)` is called by the ServerApp when a run ends (completed or failed) and by
`fedtune report RUN_DIR`; it reads only the folder (results.json, and eval/mmlu_results.json when
`fedtune eval` has written one), so it can be remade at any time.
"""

from __future__ import annotations

from pathlib import Path

REPORT_FILE = "report.html"

__all__ = ["REPORT_FILE", "write_report"]


def write_report(run_dir: str | Path) -> Path:
    """Write report.html and <figure>.png into `run_dir`; returns the page's path."""
    from fedtune.atomic import write_bytes, write_text
    from fedtune.report import figures, page, view

    run = view.load(run_dir)
    pngs = figures.render_all(run)
    for name, data in pngs.items():
        write_bytes(run.run_dir / f"{name}.png", data)
    target = run.run_dir / REPORT_FILE
    write_text(target, page.render(run, pngs))
    return target
