"""What the report, the table and the live progress read from a run folder: one small adapter over
results.json (and the eval output), so the rest of the package never touches the file's keys.

It reads the file through the typed schema of `fedtune/results.py` (`RunResults.from_json`, which also
takes the first writer's kebab-case keys) and derives what a person looks at: phases, per-node totals.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.accounting import LEADERBOARD_BUDGET_LIMIT_MB as BUDGET_CAP_MB
from fedtune.accounting import MB, REFERENCE_BUDGET_MB
from fedtune.errors import FedTuneError
from fedtune.results import RESULTS_FILE, RoundRecord, RunResults

EVAL_RESULTS = Path("eval") / "mmlu_results.json"  # where `fedtune eval` writes by default

# Round phases in the order they happen (RoundTimeline of fedtune/results.py), with their labels.
PHASES = (
    ("send", "send to nodes"),
    ("wait", "transfer + waiting"),
    ("setup", "node: data + model load"),
    ("train", "node: train"),
    ("aggregate", "aggregate"),
    ("other", "results + other"),
)
# the ClientApp's stages (reply metrics `time-*`) that are set-up rather than training
_SETUP_STAGES = ("data", "model_load", "adapter_in", "trainer_setup", "adapter_out")


@dataclass
class RoundView:
    round: int
    train_loss: float | None
    sampled: list[int]
    replied: list[int]
    failed: list[int]
    rejected: dict[str, str]
    aggregated: bool
    down_bytes: int
    up_bytes: int
    budget_mb: float
    duration_s: float
    phases: dict[str, float]  # PHASES key -> seconds (sums to duration_s)
    checkpoint_s: float
    checkpoint: str | None

    @property
    def total_mb(self) -> float:
        return (self.down_bytes + self.up_bytes) / MB


@dataclass
class NodeView:
    node_id: str
    partition_id: int | None
    down_bytes: int = 0
    up_bytes: int = 0
    rounds: int = 0
    failed: int = 0
    rejected: int = 0

    @property
    def label(self) -> str:
        short = self.node_id if len(self.node_id) <= 6 else "…" + self.node_id[-4:]
        return f"partition {self.partition_id} ({short})" if self.partition_id is not None else short


@dataclass
class EvalView:
    path: Path
    categories: list[str]
    rows: list[tuple[str, list[float | None], float | None]]  # method, accuracy per category, average
    budget_mb: float | None
    num_questions: int | None
    source: str | None


@dataclass
class RunView:
    run_dir: Path
    run_id: int | None
    status: str
    error: str | None
    model: str
    planned_rounds: int | None
    rounds: list[RoundView]
    nodes: list[NodeView]
    budget_mb: float
    budget_limit_mb: float
    reference_mb: float
    final_adapter: str | None
    started_at: str | None
    finished_at: str | None
    eval: EvalView | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def last_round(self) -> int:
        return self.rounds[-1].round if self.rounds else 0


def _phases(record: RoundRecord, duration: float) -> dict[str, float]:
    """Seconds per phase (PHASES, summing to the round's duration) from the round's timeline and the
    slowest node's stages; without a timeline (older files), the slowest node's training time."""
    timeline = record.timeline
    marks = (timeline.started, timeline.sent, timeline.all_replies, timeline.aggregated)
    phases = dict.fromkeys((key for key, _ in PHASES), 0.0)
    nodes = list(record.nodes.values())
    slowest = max((n.stage_seconds for n in nodes), key=lambda st: sum(st.values()), default={})
    train = float(slowest.get("train") or max((n.train_seconds or 0.0 for n in nodes), default=0.0))
    setup = sum(float(slowest.get(k) or 0.0) for k in _SETUP_STAGES)
    times = [m for m in marks if m is not None]
    if len(times) == len(marks):
        started, sent, replies, aggregated = times
        phases["send"] = max(0.0, sent - started)
        at_nodes = max(0.0, replies - sent)
        phases["setup"] = min(setup, at_nodes)
        phases["train"] = min(train, at_nodes - phases["setup"])
        phases["wait"] = at_nodes - phases["setup"] - phases["train"]
        phases["aggregate"] = max(0.0, aggregated - replies)
    else:
        phases["setup"] = min(setup, duration)
        phases["train"] = min(train, duration - phases["setup"])
    phases["other"] = max(0.0, duration - sum(phases.values()))
    return phases


def _round(record: RoundRecord) -> RoundView:
    duration = float(record.duration_seconds or 0.0)
    return RoundView(
        round=record.round,
        train_loss=record.train_loss,
        sampled=list(record.sampled),
        replied=list(record.replied),
        failed=list(record.failed),
        rejected={str(k): str(v) for k, v in record.rejected.items()},
        aggregated=record.aggregated,
        down_bytes=record.bytes_down,
        up_bytes=record.bytes_up,
        budget_mb=record.budget_mb,
        duration_s=duration,
        phases=_phases(record, duration),
        checkpoint_s=record.checkpoint_seconds,
        checkpoint=record.checkpoint,
    )


def _nodes(rounds: list[RoundRecord]) -> list[NodeView]:
    nodes: dict[str, NodeView] = {}
    for record in rounds:
        rejected = {str(k) for k in record.rejected}
        failed = {str(k) for k in record.failed}
        for node_id, stats in record.nodes.items():
            view = nodes.setdefault(str(node_id), NodeView(str(node_id), stats.partition_id))
            view.down_bytes += stats.down_bytes
            view.up_bytes += stats.up_bytes
            view.rounds += 1
            view.failed += str(node_id) in failed
            view.rejected += str(node_id) in rejected
    return sorted(nodes.values(), key=lambda n: (n.partition_id is None, n.partition_id or 0, n.node_id))


def _eval(run_dir: Path) -> EvalView | None:
    path = run_dir / EVAL_RESULTS
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        methods = data["methods"]
        categories = [c for c in methods[0]["categories"] if c != "Other"] if methods else []
        rows = [
            (
                str(m["name"]),
                [m["categories"].get(c, {}).get("accuracy") for c in categories],
                m.get("average"),
            )
            for m in methods
        ]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None  # a partial or foreign file: the report says "no evaluation" rather than fail
    return EvalView(path, categories, rows, data.get("budget_mb"), data.get("num_questions"),
                    data.get("mmlu_source"))


def load(run_dir: str | Path) -> RunView:
    """The run in `run_dir` (or the results.json given directly); one clear error if unreadable."""
    path = Path(run_dir).expanduser()
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.is_file():
        raise FedTuneError(f"no {RESULTS_FILE} in {path.parent}: not a fedtune run folder")
    try:
        data = json.loads(path.read_text())
        results = RunResults.from_json(data)
        model = results.config.get("model") or {}
        view = RunView(
            run_dir=path.parent,
            run_id=results.run_id,
            status=results.status,
            error=results.error,
            model=str(model.get("name", "?")),
            planned_rounds=results.config.get("num_server_rounds"),
            rounds=[_round(r) for r in results.rounds],
            nodes=_nodes(results.rounds),
            budget_mb=results.budget_mb,
            budget_limit_mb=results.budget_limit_mb or BUDGET_CAP_MB,
            reference_mb=results.reference_budget_mb or REFERENCE_BUDGET_MB,
            final_adapter=results.final_adapter,
            started_at=results.started_at,
            finished_at=results.finished_at,
            raw=data,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise FedTuneError(f"{path}: not a readable results file ({type(err).__name__}: {err})") from None
    view.eval = _eval(view.run_dir)
    return view
