"""The fedtune ServerApp: federated LoRA instruction tuning with FedAvg.

Runs on the SuperLink host (a subprocess of the SuperLink), CPU only: the initial adapter is built from
the model's config on the meta device, and only adapters are aggregated and saved.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fedtune.accounting import CommLedger
from fedtune.checkpoint import load_adapter, save_adapter
from fedtune.config import FedTuneConfig
from fedtune.errors import FedTuneError
from fedtune.exporter import results_notifier
from fedtune.logs import bind_round, configure_logging
from fedtune.model import arrays_to_state, initial_adapter_state, state_to_arrays
from serverapp.results import RESULTS_FILE, RunResults, read_results
from serverapp.strategy import FedTuneAvg, RoundObserver, run_dir_for

log = logging.getLogger("fedtune.serverapp")

OUTPUT_DIR_ENV = "FEDTUNE_OUTPUT_DIR"  # the SuperLink host decides where outputs live

app = ServerApp()

# Hooks other modules register (e.g. the metrics exporter) to see every finished round.
ROUND_OBSERVERS: list[RoundObserver] = []


def _resume_point(resume_from: str) -> tuple[dict, Path]:
    """Previous run's results and its latest global adapter."""
    run_dir = Path(resume_from).expanduser()
    if run_dir.is_file():
        run_dir = run_dir.parent
    results_path = run_dir / RESULTS_FILE
    if not results_path.is_file():
        raise FedTuneError(f"resume.from: no {RESULTS_FILE} in {run_dir}")
    previous = read_results(results_path)
    latest = run_dir / "latest"
    if not previous.get("rounds") or not (latest / "adapter_model.safetensors").is_file():
        raise FedTuneError(f"resume.from: {run_dir} finished no round; start a new run instead")
    return previous, latest


@app.main()
def main(grid: Grid, context: Context) -> None:
    configure_logging(run_id=context.run_id)
    cfg = FedTuneConfig.from_run_config(context.run_config)
    run_dir = run_dir_for(cfg, context.run_id, os.environ.get(OUTPUT_DIR_ENV))
    results = RunResults(run_dir, context.run_id, cfg)
    ledger = CommLedger()
    first_round = 1

    try:
        if cfg.resume_from:
            previous, latest = _resume_point(cfg.resume_from)
            state = load_adapter(latest)
            first_round = int(previous["rounds"][-1]["round"]) + 1
            ledger.carried_bytes = int(previous.get("budget_bytes", 0))
            results.carry_over(previous)
            log.info(
                "resuming run %s at round %d (budget so far %.2f MB)",
                previous.get("run_id"), first_round, previous.get("budget_mb", 0.0),
            )
        else:
            state = initial_adapter_state(cfg.model, cfg.train.seed)
        results.write()
        remaining = cfg.num_server_rounds - first_round + 1

        observers = [*ROUND_OBSERVERS, results_notifier(results.path)]  # the metrics exporter
        strategy = bind_round(FedTuneAvg(cfg, results, first_round, ledger, observers))
        final_state = state
        if remaining > 0:
            result = strategy.start(
                grid=grid,
                initial_arrays=state_to_arrays(state, "float32"),
                num_rounds=remaining,
                timeout=cfg.strategy.round_timeout,
                train_config=ConfigRecord(),
            )
            if result.arrays is not None:
                final_state = arrays_to_state(result.arrays)
            if not any(r.get("aggregated") for r in results.payload["rounds"] if r["round"] >= first_round):
                # not a silent "completed" with the adapter we started from
                raise FedTuneError(
                    f"no update was aggregated in rounds {first_round}..{cfg.num_server_rounds}: every "
                    "reply failed or was rejected (see the round records in results.json)"
                )
        final = save_adapter(
            final_state, cfg.model, run_dir / "adapter",
            {"round": cfg.num_server_rounds, "budget_bytes": ledger.total_bytes},
        )
        results.finish("completed", final)
        log.info(
            "run %s completed: adapter %s, communication budget %.2f MB",
            context.run_id, final, results.payload["budget_mb"],
        )
    except BaseException as err:
        results.finish("failed", error=f"{type(err).__name__}: {err}")
        raise
