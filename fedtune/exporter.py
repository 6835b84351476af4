"""`fedtune.exporter`, kept for `python -m fedtune.exporter` and old imports: the exporter lives in the
fedtune.metrics wing (see its __init__ for the rooms). Names resolve lazily, so importing the notifier from
here still does not load prometheus_client."""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "main": "fedtune.metrics.cli",
    "notify_url": "fedtune.metrics.notify",
    "results_notifier": "fedtune.metrics.notify",
    "Exporter": "fedtune.metrics.service",
    "sidecar_command": "fedtune.metrics.sidecar",
    "start_sidecar": "fedtune.metrics.sidecar",
    "State": "fedtune.metrics.state",
    "Traffic": "fedtune.metrics.state",
    "run_status": "fedtune.metrics.state",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'fedtune.exporter' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)


if __name__ == "__main__":
    from fedtune.metrics.cli import main

    main()
