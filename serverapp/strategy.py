"""FedTuneAvg: Flower's FedAvg, extended with what a real federation needs around each round:
per-round learning rate, the packed transport, exact byte accounting, rejection of bad updates,
checkpoints written in the background and a results file rewritten after every round.

A round: configure_train (encode + pack the global once for every node) -> Flower pushes and pulls
(serverapp/timed_grid.py stamps both; `check_on_arrival` unpacks and validates each reply on its real data
in the thread that pulled it, while other replies are still on their way) -> aggregate_train (the replies'
checks, the average of the accepted ones in float32 in place, a check that the result is finite) ->
results.json -> the checkpoint writer thread saves `latest/` (and every N rounds a numbered copy) while the
next round runs.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedtune import adapter_math, packing
from fedtune.accounting import CommLedger, to_mb
from fedtune.checkpoint import CheckpointJob, CheckpointWriter
from fedtune.codecs import server as codecs
from fedtune.config import FedTuneConfig
from fedtune.results import NodeRecord, ResultsFile, RoundRecord, RoundTimeline, RunResults
from fedtune.round_config import REPLY_TRAIN_METRICS, RoundConfig
from serverapp.timed_grid import Exchange
from serverapp.validation import (
    WEIGHT_KEY,
    Checked,
    Expected,
    aggregate_is_finite,
    check_reply,
    weight_outliers,
)

log = logging.getLogger("fedtune.strategy")

RoundObserver = Callable[[RoundRecord], None]
State = dict[str, np.ndarray]
# reply metric -> NodeRecord field
_NODE_FIELDS = {key: key.replace("-", "_") for key in REPLY_TRAIN_METRICS}
_INT_FIELDS = {"partition_id", "train_steps", "train_tokens", "peak_memory_bytes", "skipped_rows"}
_STAMPS = {
    "at-clientapp-started": "clientapp_started",
    "at-adapter-in": "adapter_in",
    "at-trained": "trained",
    "at-replied": "clientapp_replied",
}
# averaged (weighted by examples) into the round's train metrics; num-examples is summed
_AVERAGED = tuple(k for k in REPLY_TRAIN_METRICS if k not in (WEIGHT_KEY, "partition-id"))


class FedTuneAvg(FedAvg):
    """FedAvg (weighted by examples) over LoRA adapters, with accounting and checkpoints."""

    def __init__(
        self,
        cfg: FedTuneConfig,
        results: ResultsFile,
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
            weighted_by_key=WEIGHT_KEY,
        )
        self.cfg = cfg
        self.results = results
        self.ledger = ledger or CommLedger()
        self.round_offset = first_round - 1  # rounds already done before a resume
        self.observers = list(observers)
        self.writer = CheckpointWriter(cfg.model, self._checkpoint_written)
        self._last: tuple[ArrayRecord, State] | None = None  # the record we returned, and its arrays
        self._global: State = {}
        self._expected: Expected | None = None
        self._grid: Grid | None = None
        self._started: dict[int, tuple[float, float]] = {}  # round -> (time.time(), monotonic)
        self._sampled: dict[int, list[int]] = {}
        # message a reply answers -> (that reply, its check), from check_on_arrival
        self._checked_on_arrival: dict[str, tuple[Message, Checked]] = {}

    # Flower counts rounds from 1 in every `start`; a resumed run continues the global count.
    def global_round(self, server_round: int) -> int:
        return server_round + self.round_offset

    # ---- out -------------------------------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        current = self.global_round(server_round)
        self._started[current] = (time.time(), time.monotonic())
        self._grid = grid
        self._global = self._state_of(arrays)
        self._checked_on_arrival.clear()
        transport, dtype = self.cfg.comm.transport, self.cfg.model.transport_dtype
        wire = adapter_math.encode(self._global, dtype)  # float32: the same arrays, no copy
        codec, reply_wire = self.cfg.comm.spec(), wire
        codec_config: dict[str, Any] = {}
        if codec.active:  # issue 18: the download codec; replies come in the upload codec's layout
            wire, codec_config = codecs.encode_global_state(self._global, codec)
            reply_wire = codecs.upload_template(self._global, codec)
        leaderboard = packing.leaderboard_bytes(packing.specs_of(wire))
        # our last aggregate is already the packed float32 record: sent as is, not serialised twice
        reuse = self._last is not None and arrays is self._last[0] and not codec.active
        reuse = reuse and transport == "packed" and dtype == "float32"
        outgoing = arrays if reuse else packing.to_record(wire, transport)
        sent = outgoing.count_bytes()
        # the reply may come packed or per-tensor: the oversize bound of each form needs the packed size
        same = transport == "packed" and reply_wire is wire
        packed_bytes = sent if same else packing.pack(reply_wire).count_bytes()
        self._expected = Expected.for_round(
            self._global, reply_wire, packed_bytes,
            self.cfg.strategy.max_num_examples, self.cfg.strategy.max_update_ratio,
            codec if codec.active else None,
        )
        round_config = RoundConfig(
            server_round=current,
            learning_rate=self.cfg.learning_rate(current),
            transport_dtype=dtype,
            transport=transport,
            codec=codec_config,
            sent_at=time.time(),
        )
        content = ConfigRecord({**dict(config), **round_config.to_dict()})
        messages = list(super().configure_train(current, outgoing, content, grid))
        self._sampled[current] = [m.metadata.dst_node_id for m in messages]
        for message in messages:
            self.ledger.record_down(current, message.metadata.dst_node_id, leaderboard, sent)
        log.info(
            "round %d: sending the global adapter to %d nodes (lr %.3g, %s: %d arrays, %.2f MB sent, "
            "%.2f MB leaderboard each)",
            current, len(messages), round_config.learning_rate, transport, len(outgoing),
            to_mb(sent), to_mb(leaderboard),
        )
        return messages

    def _state_of(self, arrays: ArrayRecord) -> State:
        """The global adapter as float32 arrays: ours from the last aggregation, or decoded."""
        if self._last is not None and arrays is self._last[0]:
            return self._last[1]
        # copies (the arrays are views into a received buffer), in one buffer for adapter_math
        return adapter_math.owned_float32(packing.decode(packing.unpack(arrays).arrays))

    # ---- in ---------------------------------------------------------------------------------------------

    def check_on_arrival(self, reply: Message) -> None:
        """TimedGrid's hook, in the thread that pulled `reply`: its own checks, done while the round's other
        replies are still on their way (numpy lets the threads run side by side). aggregate_train uses the
        result, or checks the reply itself if this did not finish."""
        if reply.has_error() or self._expected is None:
            return
        try:
            checked = check_reply(reply.content, self._expected)
            self._checked_on_arrival[reply.metadata.reply_to_message_id] = (reply, checked)
        except Exception as err:  # aggregate_train checks it again and raises there, in the round
            log.warning("checking a reply on arrival failed (checked again): %s: %s", type(err).__name__, err)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        current = self.global_round(server_round)
        replies = list(replies)
        got_all = time.time()
        assert self._expected is not None, "configure_train runs before aggregate_train"
        exchange = getattr(self._grid, "last_exchange", None) or Exchange()
        sampled = self._sampled.get(current, [])

        checked: dict[int, Checked] = {}
        failed: list[int] = []
        lost_reasons: list[str] = []
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                if node_id in sampled or not sampled:
                    failed.append(node_id)
                    log.warning("round %d: node %d failed: %s", current, node_id, reply.error.reason)
                else:  # the SuperLink answers (as node 1) for a node it lost: attributed below
                    lost_reasons.append(str(reply.error.reason))
                continue
            arrived, early = self._checked_on_arrival.pop(reply.metadata.reply_to_message_id, (None, None))
            if arrived is not reply or early is None:
                early = check_reply(reply.content, self._expected)
            result = checked[node_id] = early
            arrays = reply.content.array_records.get("arrays")
            self.ledger.record_up(
                current, node_id, result.leaderboard_bytes, arrays.count_bytes() if arrays else 0
            )
        weights = {n: c.num_examples for n, c in checked.items() if c.reason is None}
        for node_id, reason in weight_outliers(weights).items():
            checked[node_id].reason = reason
        rejected = {n: c.reason for n, c in checked.items() if c.reason is not None}
        for node_id, reason in rejected.items():
            log.warning("round %d: rejected the update of node %d: %s", current, node_id, reason)

        # sampled nodes with no reply of their own: lost (heartbeat timeout) or silent past round-timeout
        for node_id in sorted(set(sampled) - {r.metadata.src_node_id for r in replies}):
            failed.append(node_id)
            reason = lost_reasons.pop(0) if lost_reasons else "no reply within strategy.round-timeout"
            log.warning("round %d: node %d failed: %s", current, node_id, reason)
        accepted = {n: c for n, c in checked.items() if c.reason is None}
        if failed:  # node loss: the round goes on with what arrived
            log.warning(
                "round %d: lost %d of %d sampled nodes (%s); aggregating the %d accepted replies",
                current, len(failed), len(sampled) or len(replies),
                ", ".join(str(n) for n in sorted(failed)), len(accepted),
            )

        started = time.perf_counter()
        new_state = adapter_math.weighted_average(
            {n: c.arrays for n, c in accepted.items() if c.arrays is not None},
            {n: c.num_examples for n, c in accepted.items()},
        )
        aggregate_rejection = None
        if new_state is not None and not aggregate_is_finite(new_state):
            aggregate_rejection = "aggregate-non-finite"
            log.warning("round %d: the average is not finite; the global adapter stays as it was", current)
            new_state = None
        elif new_state is None:
            log.warning("round %d: no acceptable update; the global adapter stays as it was", current)
        arrays_out, metrics = None, None
        if new_state is not None:
            arrays_out = packing.pack(new_state)  # float32; the next round sends it as is when it can
            self._last = (arrays_out, new_state)
            metrics = train_metrics(accepted)
        aggregate_seconds = time.perf_counter() - started

        record = self._round_record(
            current, checked, failed, rejected, metrics, exchange, got_all, aggregate_seconds
        )
        record.aggregated = new_state is not None
        record.aggregate_rejection = aggregate_rejection
        self._finish_round(record, new_state if new_state is not None else self._global)
        return arrays_out, metrics

    # ---- bookkeeping -------------------------------------------------------------------------------------

    def _round_record(
        self,
        current: int,
        checked: Mapping[int, Checked],
        failed: list[int],
        rejected: Mapping[int, str],
        metrics: MetricRecord | None,
        exchange: Exchange,
        got_all: float,
        aggregate_seconds: float,
    ) -> RoundRecord:
        traffic = self.ledger.round(current)
        nodes: dict[str, NodeRecord] = {}
        for node_id in sorted(set(checked) | set(self._sampled.get(current, [])) | set(failed)):
            node = node_record(node_id, checked.get(node_id))
            if node_id in failed:
                node.status = "failed"
            node.down_bytes = traffic.node(node_id).down_bytes
            node.up_bytes = traffic.node(node_id).up_bytes
            node.down_sent_bytes = traffic.node(node_id).down_sent_bytes
            node.up_sent_bytes = traffic.node(node_id).up_sent_bytes
            node.timeline.server_sent = exchange.pushed_at
            node.timeline.server_received = exchange.received_at.get(node_id)
            nodes[str(node_id)] = node
        budget = self.ledger.cumulative_bytes(current)
        return RoundRecord(
            round=current,
            learning_rate=self.cfg.learning_rate(current),
            sampled=self._sampled.get(current, []),
            replied=sorted(checked),
            failed=sorted(failed),
            rejected={str(k): v for k, v in sorted(rejected.items())},
            rejections=dict(Counter(rejected.values())),
            train_loss=_scalar(metrics.get("train-loss")) if metrics else None,
            bytes_down=traffic.down_bytes,
            bytes_up=traffic.up_bytes,
            bytes_total=traffic.total_bytes,
            mb_total=to_mb(traffic.total_bytes),
            sent_bytes_down=traffic.sent_down_bytes,
            sent_bytes_up=traffic.sent_up_bytes,
            budget_bytes=budget,
            budget_mb=to_mb(budget),
            aggregate_seconds=aggregate_seconds,
            timeline=RoundTimeline(
                started=self._started.get(current, (None, None))[0],
                sent=exchange.pushed_at,
                all_replies=exchange.finished_at or got_all,
                aggregated=time.time(),
            ),
            nodes=nodes,
        )

    def _finish_round(self, record: RoundRecord, state: State) -> None:
        current = record.round
        every = self.cfg.train.save_every_round
        targets = [self.results.run_dir / "latest"]
        if every and current % every == 0:
            targets.append(self.results.checkpoint_dir(current))
            record.checkpoint = str(targets[-1])
        extra = {"round": current, "budget_bytes": record.budget_bytes}
        record.duration_seconds = time.monotonic() - self._started.get(current, (0.0, time.monotonic()))[1]
        # the record first: the writer thread stamps it when the checkpoint is on disk
        self.results.add_round(record, self.ledger.total_bytes, self.ledger.total_sent_bytes)
        # waits for the previous round's write (normally long done), then writes while the next round runs
        self.writer.submit(CheckpointJob(current, state, targets, extra))
        log.info(
            "round %d: loss %s | down %.2f MB, up %.2f MB (sent %.2f / %.2f MB) | budget %.2f MB "
            "(limit %.0f MB) | %.1f s",
            current, f"{record.train_loss:.4f}" if record.train_loss is not None else "n/a",
            to_mb(record.bytes_down), to_mb(record.bytes_up), to_mb(record.sent_bytes_down),
            to_mb(record.sent_bytes_up), record.budget_mb, self.cfg.budget_limit_mb, record.duration_seconds,
        )
        if record.budget_mb > self.cfg.budget_limit_mb:
            log.warning(
                "communication budget %.2f MB exceeds the limit %.0f MB",
                record.budget_mb, self.cfg.budget_limit_mb,
            )
        self._notify(record)

    def _checkpoint_written(self, job: CheckpointJob, seconds: float, written_at: float) -> None:
        def stamp(results: RunResults) -> None:
            record = results.round(job.server_round)
            record.checkpoint_seconds = seconds
            record.checkpoint_written_at = written_at
            record.timeline.checkpoint_written = written_at

        self.results.update(stamp)
        self._notify(self.results.results.round(job.server_round))

    def _notify(self, record: RoundRecord) -> None:
        for observer in self.observers:
            observer(record)

    def finish(self) -> None:
        """Wait for the last checkpoint (raises if it failed): call before reporting the run done."""
        self.writer.wait()


# ---- averaging -----------------------------------------------------------------------------------------


def train_metrics(accepted: Mapping[int, Checked]) -> MetricRecord:
    """FedAvg's train metrics: each metric averaged by examples; num-examples summed."""
    total = sum(c.num_examples for c in accepted.values())
    out: dict[str, int | float | list[int] | list[float]] = {WEIGHT_KEY: total}
    for key in _AVERAGED:
        if all(key in c.metrics for c in accepted.values()):
            out[key] = sum(c.metrics[key] * c.num_examples for c in accepted.values()) / total
    return MetricRecord(out)


def _scalar(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


def node_record(node_id: int, checked: Checked | None) -> NodeRecord:
    node = NodeRecord(node_id=node_id)
    if checked is None:
        return node
    node.status = "accepted" if checked.reason is None else "rejected"
    node.rejection = checked.reason
    for key, value in checked.metrics.items():
        if key in _NODE_FIELDS:
            name = _NODE_FIELDS[key]
            setattr(node, name, int(value) if name in _INT_FIELDS else value)
        elif key.startswith("time-"):
            node.stage_seconds[key[len("time-") :].replace("-", "_")] = value
        elif key in _STAMPS:
            setattr(node.timeline, _STAMPS[key], value)
    return node


def run_dir_for(cfg: FedTuneConfig, run_id: int, output_root: str | None = None) -> Path:
    return Path(output_root or cfg.output_dir).expanduser() / str(run_id)

