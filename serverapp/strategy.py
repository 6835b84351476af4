"""FedTuneAvg: Flower's FedAvg, extended with what a real federation needs around each round:
per-round learning rate, adapter transport dtype, exact byte accounting, rejection of bad updates,
checkpoints and a results file that is rewritten after every round."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtune.accounting import CommLedger, to_mb
from fedtune.checkpoint import save_adapter
from fedtune.config import FedTuneConfig
from fedtune.model import arrays_to_state, state_to_arrays
from serverapp.results import RunResults
from serverapp.validation import rejection_reason

log = logging.getLogger("fedtune.strategy")

RoundObserver = Callable[[dict[str, Any]], None]
# Per-node metrics from the reply that go into results.json (and the metrics exporter).
NODE_METRICS = (
    "num-examples", "train-loss", "train-steps", "train-seconds", "train-tokens",
    "tokens-per-second", "peak-memory-bytes", "skipped-rows", "partition-id",
)
# An update may be at most this much larger than the global adapter before it is refused.
OVERSIZE_FACTOR = 1.10


class FedTuneAvg(FedAvg):
    """FedAvg (weighted by examples) over LoRA adapters, with accounting and checkpoints."""

    def __init__(
        self,
        cfg: FedTuneConfig,
        results: RunResults,
        first_round: int = 1,
        ledger: CommLedger | None = None,
        observers: Iterable[RoundObserver] = (),
    ) -> None:
        strategy = cfg.strategy
        super().__init__(
            fraction_train=strategy.fraction_train,
            fraction_evaluate=strategy.fraction_evaluate,
            min_train_nodes=strategy.min_train_nodes,
            min_evaluate_nodes=0 if strategy.fraction_evaluate == 0 else strategy.min_train_nodes,
            min_available_nodes=strategy.min_available_nodes,
            weighted_by_key="num-examples",
        )
        self.cfg = cfg
        self.results = results
        self.ledger = ledger or CommLedger()
        self.round_offset = first_round - 1  # rounds already done before a resume
        self.observers = list(observers)
        self._global: ArrayRecord | None = None
        self._round_started: dict[int, float] = {}
        self._sampled: dict[int, list[int]] = {}

    # Flower counts rounds from 1 in every `start`; a resumed run continues the global count.
    def global_round(self, server_round: int) -> int:
        return server_round + self.round_offset

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        current = self.global_round(server_round)
        self._round_started[current] = time.monotonic()
        self._global = arrays
        config["learning-rate"] = self.cfg.learning_rate(current)
        config["transport-dtype"] = self.cfg.model.transport_dtype
        outgoing = self._for_transport(arrays)
        messages = list(super().configure_train(current, outgoing, config, grid))
        self._sampled[current] = [m.metadata.dst_node_id for m in messages]
        for message in messages:
            self.ledger.record_down(
                current, message.metadata.dst_node_id, message.content["arrays"].count_bytes()
            )
        log.info(
            "round %d: sent the global adapter to %d nodes (lr %.3g, %.2f MB each)",
            current, len(messages), config["learning-rate"],
            to_mb(outgoing.count_bytes()),
        )
        return messages

    def _for_transport(self, arrays: ArrayRecord) -> ArrayRecord:
        if self.cfg.model.transport_dtype == "float32":
            return arrays
        return state_to_arrays(arrays_to_state(arrays), self.cfg.model.transport_dtype)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        current = self.global_round(server_round)
        replies = list(replies)
        assert self._global is not None, "configure_train runs before aggregate_train"
        reference = self._for_transport(self._global)
        max_bytes = int(reference.count_bytes() * OVERSIZE_FACTOR)

        accepted: list[Message] = []
        failed: list[int] = []
        rejected: dict[int, str] = {}
        nodes: dict[int, dict[str, Any]] = {}
        sampled = self._sampled.get(current, [])
        lost_reasons: list[str] = []
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                if node_id in sampled or not sampled:
                    failed.append(node_id)
                    log.warning("round %d: node %d failed: %s", current, node_id, reply.error.reason)
                else:  # the SuperLink answers (as node 1) for a node it lost: attributed below
                    lost_reasons.append(reply.error.reason)
                continue
            if "arrays" in reply.content.array_records:
                self.ledger.record_up(current, node_id, reply.content["arrays"].count_bytes())
            reason = rejection_reason(
                reply.content, reference, self.cfg.model.transport_dtype,
                self.weighted_by_key, max_bytes,
            )
            metrics = reply.content.metric_records.get("metrics")
            nodes[node_id] = {
                k: metrics[k] for k in NODE_METRICS if metrics is not None and k in metrics
            }
            if reason is not None:
                rejected[node_id] = reason
                log.warning("round %d: rejected the update of node %d: %s", current, node_id, reason)
                continue
            if self.cfg.model.transport_dtype != "float32":
                # Aggregate in float32 whatever the wire carried.
                reply.content["arrays"] = state_to_arrays(
                    arrays_to_state(reply.content["arrays"]), "float32"
                )
            accepted.append(reply)

        # sampled nodes with no reply of their own: lost (heartbeat timeout) or silent past round-timeout
        answered = {reply.metadata.src_node_id for reply in replies}
        for node_id in sorted(set(sampled) - answered):
            failed.append(node_id)
            reason = lost_reasons.pop(0) if lost_reasons else "no reply within strategy.round-timeout"
            log.warning("round %d: node %d failed: %s", current, node_id, reason)
        if failed:  # node loss: the round goes on with what arrived
            log.warning(
                "round %d: lost %d of %d sampled nodes (%s); aggregating the %d accepted replies",
                current, len(failed), len(sampled) or len(replies),
                ", ".join(str(n) for n in sorted(failed)), len(accepted),
            )
        arrays, metrics = super().aggregate_train(current, accepted)
        if arrays is None:
            log.warning("round %d: no acceptable update; the global adapter stays as it was", current)
        self._finish_round(current, arrays, metrics, failed, rejected, nodes)
        return arrays, metrics

    def _finish_round(
        self,
        current: int,
        arrays: ArrayRecord | None,
        metrics: MetricRecord | None,
        failed: list[int],
        rejected: dict[int, str],
        nodes: dict[int, dict[str, Any]],
    ) -> None:
        traffic = self.ledger.round(current)
        for node_id, stats in nodes.items():
            stats["down-bytes"] = traffic.node(node_id).down_bytes
            stats["up-bytes"] = traffic.node(node_id).up_bytes
        for node_id in self._sampled.get(current, []):
            nodes.setdefault(node_id, {"down-bytes": traffic.node(node_id).down_bytes, "up-bytes": 0})

        global_arrays = arrays if arrays is not None else self._global
        checkpoint = None
        assert global_arrays is not None
        every = self.cfg.train.save_every_round
        state = arrays_to_state(global_arrays)
        started = time.monotonic()
        extra = {"round": current, "budget_bytes": self.ledger.cumulative_bytes(current)}
        # `latest` is rewritten every round so a resume loses at most the round in flight.
        save_adapter(state, self.cfg.model, self.results.run_dir / "latest", extra)
        if every and current % every == 0:
            checkpoint = save_adapter(
                state, self.cfg.model, self.results.checkpoint_dir(current), extra
            )
        checkpoint_seconds = time.monotonic() - started

        record = {
            "round": current,
            "learning_rate": self.cfg.learning_rate(current),
            "sampled": self._sampled.get(current, []),
            "replied": sorted(nodes.keys() - set(failed)),
            "failed": sorted(failed),
            "rejected": {str(k): v for k, v in rejected.items()},
            "aggregated": arrays is not None,
            "train_loss": float(metrics["train-loss"]) if metrics and "train-loss" in metrics else None,
            "nodes": {str(k): v for k, v in sorted(nodes.items())},
            "bytes_down": traffic.down_bytes,
            "bytes_up": traffic.up_bytes,
            "bytes_total": traffic.total_bytes,
            "mb_total": to_mb(traffic.total_bytes),
            "budget_bytes": self.ledger.cumulative_bytes(current),
            "budget_mb": to_mb(self.ledger.cumulative_bytes(current)),
            "duration_seconds": time.monotonic() - self._round_started.get(current, time.monotonic()),
            "checkpoint": str(checkpoint) if checkpoint else None,
            "checkpoint_seconds": checkpoint_seconds,
        }
        self.results.add_round(record, self.ledger)
        log.info(
            "round %d: loss %s | down %.2f MB, up %.2f MB | budget %.2f MB (limit %.0f MB)",
            current,
            f"{record['train_loss']:.4f}" if record["train_loss"] is not None else "n/a",
            to_mb(traffic.down_bytes), to_mb(traffic.up_bytes), record["budget_mb"],
            self.cfg.budget_limit_mb,
        )
        if record["budget_mb"] > self.cfg.budget_limit_mb:
            log.warning(
                "communication budget %.2f MB exceeds the limit %.0f MB",
                record["budget_mb"], self.cfg.budget_limit_mb,
            )
        for observer in self.observers:
            observer(record)


def run_dir_for(cfg: FedTuneConfig, run_id: int, output_root: str | None = None) -> Path:
    return Path(output_root or cfg.output_dir).expanduser() / str(run_id)
