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

from fedtune.accounting import CommLedger, to_mb
from fedtune.checkpoint import load_adapter, read_round, resolve_checkpoint, save_adapter
from fedtune.config import FedTuneConfig
from fedtune.errors import FedTuneError
from fedtune.flower_pulls import retry_pulls_sooner
from fedtune.logs import bind_round, configure_logging
from fedtune.metrics.notify import results_notifier  # small: no prometheus_client in the ServerApp
from fedtune.model import arrays_to_state, initial_adapter_state, state_to_arrays
from fedtune.results import RESULTS_FILE, ResultsFile, RunResults
from serverapp.strategy import FedTuneAvg, run_dir_for
from serverapp.timed_grid import TimedGrid

log = logging.getLogger("fedtune.serverapp")

OUTPUT_DIR_ENV = "FEDTUNE_OUTPUT_DIR"  # the SuperLink host decides where outputs live

app = ServerApp()


def _resume_point(resume_from: str) -> tuple[RunResults, Path]:
    """Previous run's results, cut back to the round its latest complete checkpoint holds, and that
    checkpoint. (results.json may list one round more: its checkpoint is written after the record.)"""
    run_dir = Path(resume_from).expanduser()
    if run_dir.is_file():
        run_dir = run_dir.parent
    results_path = run_dir / RESULTS_FILE
    if not results_path.is_file():
        raise FedTuneError(f"resume.from: no {RESULTS_FILE} in {run_dir}")
    previous = RunResults.read(results_path)
    latest = resolve_checkpoint(run_dir / "latest")
    if not previous.rounds or latest is None:
        raise FedTuneError(f"resume.from: {run_dir} finished no round; start a new run instead")
    done = int(read_round(latest)["round"])
    previous.rounds = [r for r in previous.rounds if r.round <= done]
    if not previous.rounds or previous.rounds[-1].round != done:
        raise FedTuneError(f"resume.from: {latest} holds round {done}, which {RESULTS_FILE} does not list")
    last = previous.rounds[-1]
    previous.budget_bytes = last.budget_bytes
    previous.sent_bytes = sum(r.sent_bytes_down + r.sent_bytes_up for r in previous.rounds)
    return previous, latest


@app.main()
def main(grid: Grid, context: Context) -> None:
    configure_logging(run_id=context.run_id)
    retry_pulls_sooner()  # a reply is listed while its upload still runs
    cfg = FedTuneConfig.from_run_config(context.run_config)
    run_dir = run_dir_for(cfg, context.run_id, os.environ.get(OUTPUT_DIR_ENV))
    results = ResultsFile(
        run_dir,
        RunResults(
            run_id=context.run_id,
            config=cfg.to_dict(),
            transport=cfg.comm.transport,
            transport_dtype=cfg.model.transport_dtype,
            budget_limit_mb=cfg.budget_limit_mb,
        ),
    )
    ledger = CommLedger()
    strategy: FedTuneAvg | None = None
    first_round = 1

    try:
        if cfg.resume_from:
            previous, latest = _resume_point(cfg.resume_from)
            state = load_adapter(latest)
            first_round = previous.last_round + 1
            ledger.carried_bytes = previous.budget_bytes
            ledger.carried_sent_bytes = previous.sent_bytes
            results.carry_over(previous)
            log.info(
                "resuming run %s at round %d from %s (budget so far %.2f MB)",
                previous.run_id, first_round, latest, to_mb(previous.budget_bytes),
            )
        else:
            state = initial_adapter_state(cfg.model, cfg.train.seed)
        results.write()
        remaining = cfg.num_server_rounds - first_round + 1

        observers = [results_notifier(results.path)]  # tells the metrics exporter the file changed
        strategy = FedTuneAvg(cfg, results, first_round, ledger, observers)
        bind_round(strategy)
        final_state = state
        if remaining > 0:
            result = strategy.start(
                grid=TimedGrid(grid, on_reply=strategy.check_on_arrival),
                initial_arrays=state_to_arrays(state, "float32"),
                num_rounds=remaining,
                timeout=cfg.strategy.round_timeout,
                train_config=ConfigRecord(),
            )
            strategy.finish()  # the last round's checkpoint is on disk
            if result.arrays is not None:
                final_state = arrays_to_state(result.arrays)
            if not any(r.aggregated for r in results.results.rounds if r.round >= first_round):
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
            context.run_id, final, results.results.budget_mb,
        )
        _write_report(run_dir)
    except BaseException as err:
        if strategy is not None:
            try:  # a round's checkpoint in flight still lands, so a resume loses nothing finished
                strategy.finish()
            except Exception as write_error:  # the run's own error is the one to raise
                log.error("checkpoint write failed too: %s", write_error)
        results.finish("failed", error=f"{type(err).__name__}: {err}")
        _write_report(run_dir)
        raise


def _write_report(run_dir: Path) -> None:
    """report.html + PNGs for people (fedtune.report, owned by the console work); never changes the
    run's outcome, which results.json already holds."""
    try:
        from fedtune.report import write_report

        log.info("run report: %s", write_report(run_dir))
    except Exception as err:  # a report is a view of results.json: losing it loses nothing
        log.warning("run report not written: %s: %s", type(err).__name__, err)
