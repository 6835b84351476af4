"""results.json: the typed record of a run, written by the ServerApp, read by the exporter, the demo, the
report, eval and the benchmarks. Defined once here; every key is snake_case.

Layout (`RunResults.to_json()`):

    run_id, status ("running" | "completed" | "failed"), started_at, finished_at (ISO-8601 UTC),
    config (FedTuneConfig.to_dict()), transport ("packed" | "per-tensor"), transport_dtype,
    budget_bytes / budget_mb     the leaderboard's figure: Σ ArrayRecord.count_bytes() of the per-tensor
                                 form of every adapter message, both directions, every round so far
    sent_bytes / sent_mb         Σ count_bytes() of the records actually sent (packed: few arrays + manifest)
    budget_limit_mb, reference_budget_mb, final_adapter, resumed_from, error,
    rejections                   {reason: count} of rejected replies over the run (serverapp/validation.py)
    rounds: [RoundRecord]

RoundRecord: round, learning_rate, sampled / replied / failed (node ids), rejected ({node id: reason}),
rejections ({reason: count}), aggregated, aggregate_rejection, train_loss,
bytes_down / bytes_up / bytes_total / mb_total (leaderboard bytes of this round),
sent_bytes_down / sent_bytes_up (bytes actually sent), budget_bytes / budget_mb (cumulative),
duration_seconds (round start to results written; the checkpoint is written in the background and is not
part of it), aggregate_seconds, checkpoint (folder of the every-N-rounds checkpoint or null),
checkpoint_seconds (time the writer thread took for `latest/` and that checkpoint), checkpoint_written_at
(epoch seconds, null until the writer finished), timeline, nodes ({node id: NodeRecord}).

RoundTimeline (ServerApp wall clock, `time.time()` epoch seconds; null = not reached):
    started        configure_train entered
    sent           the ServerApp finished pushing every message to the SuperLink
    all_replies    the ServerApp has every reply (the last one pulled, or the round timeout)
    aggregated     the new global adapter exists (validated, averaged, checked finite)
    checkpoint_written  the background writer finished `latest/` (and the numbered checkpoint)

NodeTimeline (epoch seconds; server_* on the ServerApp's clock, the others on the node's clock):
    server_sent         the message to this node was pushed (= RoundTimeline.sent)
    supernode_received  the SuperNode had the message (from the SuperNode's log: bench/federation.py)
    clientapp_started   the ClientApp's train() began (reply metric `at-clientapp-started`)
    adapter_in          the trainer had the global adapter loaded in the model (`at-adapter-in`)
    trained             training finished (`at-trained`)
    clientapp_replied   the ClientApp built its reply (`at-replied`)
    supernode_sent      the SuperNode finished uploading the reply (SuperNode's log: bench/federation.py)
    server_received     the ServerApp pulled this node's reply

NodeRecord: node_id, status ("accepted" | "rejected" | "failed"), rejection (reason or null), the reply's
metrics in snake_case (partition_id, num_examples, train_loss, train_steps, train_seconds, train_tokens,
tokens_per_second, peak_memory_bytes, skipped_rows), down_bytes / up_bytes (leaderboard bytes),
down_sent_bytes / up_sent_bytes (actually sent), stage_seconds ({stage: seconds} from the reply's `time-*`
metrics: data, model_load, adapter_in, trainer_setup, train, adapter_out), timeline.

Older files (kebab-case node keys) still load: `from_json` maps `-` to `_`.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.accounting import REFERENCE_BUDGET_MB, to_mb
from fedtune.atomic import write_text

RESULTS_FILE = "results.json"
SCHEMA_VERSION = 2


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class NodeTimeline:
    server_sent: float | None = None
    supernode_received: float | None = None
    clientapp_started: float | None = None
    adapter_in: float | None = None
    trained: float | None = None
    clientapp_replied: float | None = None
    supernode_sent: float | None = None
    server_received: float | None = None


@dataclass
class RoundTimeline:
    started: float | None = None
    sent: float | None = None
    all_replies: float | None = None
    aggregated: float | None = None
    checkpoint_written: float | None = None


@dataclass
class NodeRecord:
    node_id: int
    status: str = "accepted"  # accepted | rejected | failed
    rejection: str | None = None
    partition_id: int | None = None
    num_examples: float | None = None
    train_loss: float | None = None
    train_steps: int | None = None
    train_seconds: float | None = None
    train_tokens: int | None = None
    tokens_per_second: float | None = None
    peak_memory_bytes: int | None = None
    skipped_rows: int | None = None
    down_bytes: int = 0
    up_bytes: int = 0
    down_sent_bytes: int = 0
    up_sent_bytes: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    timeline: NodeTimeline = field(default_factory=NodeTimeline)


@dataclass
class RoundRecord:
    round: int
    learning_rate: float
    sampled: list[int] = field(default_factory=list)
    replied: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)  # node id -> reason
    rejections: dict[str, int] = field(default_factory=dict)  # reason -> count
    aggregated: bool = False
    aggregate_rejection: str | None = None  # "aggregate-non-finite": the average was refused
    train_loss: float | None = None
    bytes_down: int = 0
    bytes_up: int = 0
    bytes_total: int = 0
    mb_total: float = 0.0
    sent_bytes_down: int = 0
    sent_bytes_up: int = 0
    budget_bytes: int = 0
    budget_mb: float = 0.0
    duration_seconds: float = 0.0
    aggregate_seconds: float = 0.0
    checkpoint: str | None = None
    checkpoint_seconds: float = 0.0
    checkpoint_written_at: float | None = None
    timeline: RoundTimeline = field(default_factory=RoundTimeline)
    nodes: dict[str, NodeRecord] = field(default_factory=dict)


@dataclass
class RunResults:
    run_id: int
    status: str = "running"
    started_at: str = field(default_factory=utc_now)
    finished_at: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    transport: str = "packed"
    transport_dtype: str = "float32"
    rounds: list[RoundRecord] = field(default_factory=list)
    budget_bytes: int = 0
    budget_mb: float = 0.0
    sent_bytes: int = 0
    sent_mb: float = 0.0
    budget_limit_mb: float = 0.0
    reference_budget_mb: float = REFERENCE_BUDGET_MB
    rejections: dict[str, int] = field(default_factory=dict)
    final_adapter: str | None = None
    resumed_from: int | None = None
    error: str | None = None
    schema: int = SCHEMA_VERSION

    # ---- JSON ------------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunResults:
        return _build(cls, data)

    @classmethod
    def read(cls, path: Path) -> RunResults:
        path = Path(path)
        if path.is_dir():
            path = path / RESULTS_FILE
        return cls.from_json(json.loads(path.read_text()))

    # ---- derived -----------------------------------------------------------------------------------

    @property
    def last_round(self) -> int:
        return self.rounds[-1].round if self.rounds else 0

    def round(self, number: int) -> RoundRecord:
        for record in self.rounds:
            if record.round == number:
                return record
        raise KeyError(f"round {number} is not in the results")


# ---- reading (typed, tolerant of older kebab-case files) ------------------------------------------

_NESTED: dict[tuple[type, str], type] = {
    (RunResults, "rounds"): RoundRecord,
    (RoundRecord, "nodes"): NodeRecord,
    (RoundRecord, "timeline"): RoundTimeline,
    (NodeRecord, "timeline"): NodeTimeline,
}


def _build(cls: type, data: dict[str, Any], **fixed: Any) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = dict(fixed)
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key not in names:
            continue  # a field a newer (or older) writer had: not ours to interpret
        nested = _NESTED.get((cls, key))
        if nested is RoundRecord:
            value = [_build(RoundRecord, v) for v in value]
        elif nested is NodeRecord:
            value = {str(k): _build(NodeRecord, v, node_id=int(k)) for k, v in (value or {}).items()}
        elif nested is not None:
            value = _build(nested, value or {})
        kwargs[key] = value
    return cls(**kwargs)


# ---- the ServerApp's writer ------------------------------------------------------------------------


class ResultsFile:
    """The ServerApp's results.json: one `RunResults`, rewritten atomically (and fsynced) after every
    change, so the file is complete up to the last finished round whatever happens to the process.
    Thread-safe: the checkpoint writer thread stamps its rounds through `update`."""

    def __init__(self, run_dir: Path, results: RunResults) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / RESULTS_FILE
        self.results = results
        self._lock = threading.RLock()

    def checkpoint_dir(self, server_round: int) -> Path:
        return self.run_dir / "checkpoints" / f"round-{server_round:04d}"

    def carry_over(self, previous: RunResults) -> None:
        """A resumed run starts with the rounds its predecessor finished."""
        with self._lock:
            self.results.rounds = list(previous.rounds)
            self.results.resumed_from = previous.run_id
            self.results.budget_bytes = previous.budget_bytes
            self.results.budget_mb = previous.budget_mb
            self.results.sent_bytes = previous.sent_bytes
            self.results.sent_mb = previous.sent_mb
            self.results.rejections = dict(previous.rejections)

    def add_round(self, record: RoundRecord, budget_bytes: int, sent_bytes: int) -> None:
        with self._lock:
            self.results.rounds.append(record)
            self.results.budget_bytes = budget_bytes
            self.results.budget_mb = to_mb(budget_bytes)
            self.results.sent_bytes = sent_bytes
            self.results.sent_mb = to_mb(sent_bytes)
            for reason, count in record.rejections.items():
                self.results.rejections[reason] = self.results.rejections.get(reason, 0) + count
            self.write()

    def update(self, change: Callable[[RunResults], None]) -> None:
        with self._lock:
            change(self.results)
            self.write()

    def finish(self, status: str, final_adapter: Path | None = None, error: str | None = None) -> None:
        with self._lock:
            self.results.status = status
            self.results.finished_at = utc_now()
            if final_adapter is not None:
                self.results.final_adapter = str(final_adapter)
            if error:
                self.results.error = error
            self.write()

    def write(self) -> None:
        with self._lock:
            write_text(self.path, self.results.dumps())
