"""results.json of a run: configuration, one record per round, the communication budget, status.

Rewritten atomically after every round, so it is complete up to the last finished round whatever
happens to the ServerApp process."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fedtune.accounting import REFERENCE_BUDGET_MB, CommLedger, to_mb
from fedtune.checkpoint import write_json_atomic
from fedtune.config import FedTuneConfig

RESULTS_FILE = "results.json"


class RunResults:
    def __init__(self, run_dir: Path, run_id: int, cfg: FedTuneConfig) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / RESULTS_FILE
        self.payload: dict[str, Any] = {
            "run_id": run_id,
            "status": "running",
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "config": cfg.to_dict(),
            "rounds": [],
            "budget_bytes": 0,
            "budget_mb": 0.0,
            "budget_limit_mb": cfg.budget_limit_mb,
            "reference_budget_mb": REFERENCE_BUDGET_MB,
            "final_adapter": None,
        }

    def checkpoint_dir(self, server_round: int) -> Path:
        return self.run_dir / "checkpoints" / f"round-{server_round:04d}"

    def carry_over(self, previous: dict[str, Any]) -> None:
        """A resumed run starts with the rounds its predecessor finished."""
        self.payload["rounds"] = list(previous.get("rounds", []))
        self.payload["resumed_from"] = previous.get("run_id")
        self.payload["budget_bytes"] = previous.get("budget_bytes", 0)
        self.payload["budget_mb"] = previous.get("budget_mb", 0.0)

    def add_round(self, record: dict[str, Any], ledger: CommLedger) -> None:
        self.payload["rounds"].append(record)
        self.payload["budget_bytes"] = ledger.total_bytes
        self.payload["budget_mb"] = to_mb(ledger.total_bytes)
        self.write()

    def finish(self, status: str, final_adapter: Path | None = None, error: str | None = None) -> None:
        self.payload["status"] = status
        self.payload["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if final_adapter is not None:
            self.payload["final_adapter"] = str(final_adapter)
        if error:
            self.payload["error"] = error
        self.write()

    def write(self) -> None:
        write_json_atomic(self.path, self.payload)


def read_results(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
