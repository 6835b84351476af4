"""The ServerApp side of one round on the CPU: FedTuneAvg configure + aggregate of 2 InternLM3-8B-shaped
LoRA updates (19,267,584 params = 77.07 MB fp32 each), checkpoint write, accounting.

    python -m bench.server_round [--transport float32|bfloat16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, cast

import numpy as np


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.server_round")
    parser.add_argument("--transport", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    import flwr.serverapp.strategy.fedavg as fedavg
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
    from flwr.supercore.task_identity import TaskIdentity

    from bench.synthetic import INTERNLM3_8B
    from fedtune.accounting import to_mb
    from fedtune.config import FedTuneConfig
    from fedtune.model import arrays_to_state, initial_adapter_state, state_to_arrays
    from fedtune.results import ResultsFile, RunResults
    from serverapp.strategy import FedTuneAvg

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    fedavg.sample_nodes = lambda grid, min_available_nodes, sample_size: ([11, 22], [11, 22])

    class Grid:
        def get_node_ids(self):
            return [11, 22]

    with tempfile.TemporaryDirectory() as tmp:
        config_dir = Path(tmp) / "internlm3-shape"
        INTERNLM3_8B.llama_config().save_pretrained(config_dir)
        cfg = FedTuneConfig.from_run_config(
            {
                "model.name": str(config_dir),
                "model.trust-remote-code": False,
                "model.transport-dtype": args.transport,
                "strategy.fraction-train": 1.0,
                "train.save-every-round": 1,
            }
        )
        started = time.perf_counter()
        state = initial_adapter_state(cfg.model, cfg.train.seed)
        print(f"initial adapter (meta device): {time.perf_counter() - started:.2f} s")
        results = ResultsFile(Path(tmp) / "run", RunResults(run_id=1, config=cfg.to_dict()))
        strategy = FedTuneAvg(cfg, results)
        arrays = state_to_arrays(state, "float32")
        rng = np.random.default_rng(0)
        for rnd in range(1, args.rounds + 1):
            t0 = time.perf_counter()
            sent = list(strategy.configure_train(rnd, arrays, ConfigRecord(), cast(Any, Grid())))
            t_configure = time.perf_counter() - t0
            replies = []
            for i, message in enumerate(sent):
                update = OrderedDict((k, v + float(rng.normal()) * 1e-3) for k, v in state.items())
                content = RecordDict(
                    {
                        "arrays": state_to_arrays(update, args.transport),
                        "metrics": MetricRecord({"num-examples": 2600 + i, "train-loss": 1.0}),
                    }
                )
                replies.append(Message(content, reply_to=message))
            t0 = time.perf_counter()
            new_arrays, _ = strategy.aggregate_train(rnd, replies)
            t_aggregate_total = time.perf_counter() - t0
            strategy.finish()  # the checkpoint is written in the background: wait for its figure
            record = results.results.round(rnd)
            # FedAvg's weighted average alone, on the fp32 records the strategy averages
            fp32 = [
                RecordDict(
                    {
                        "arrays": state_to_arrays(
                            arrays_to_state(cast(ArrayRecord, r.content["arrays"])), "float32"
                        ),
                        "metrics": r.content["metrics"],
                    }
                )
                for r in replies
            ]
            t0 = time.perf_counter()
            aggregate_arrayrecords(fp32, "num-examples")
            t_fedavg = time.perf_counter() - t0
            assert new_arrays is not None  # the honest replies above always aggregate
            arrays = new_arrays
            print(
                f"round {rnd} ({args.transport}, {cfg.comm.transport}): "
                f"configure_train {t_configure:.2f} s | "
                f"aggregate_train {t_aggregate_total:.2f} s (its averaging {record.aggregate_seconds:.2f} s; "
                f"Flower's FedAvg alone {t_fedavg:.2f} s) | checkpoints (latest + round, background) "
                f"{record.checkpoint_seconds:.2f} s | "
                f"traffic {to_mb(record.bytes_total):.2f} MB leaderboard, "
                f"{to_mb(record.sent_bytes_down + record.sent_bytes_up):.2f} MB sent, "
                f"budget {record.budget_mb:.2f} MB"
            )
        del torch


if __name__ == "__main__":
    main()
