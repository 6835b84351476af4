"""How each metric's samples come from one run: the samplers the table (fedtune.metrics.table) names.

A sampler takes a RunData and yields (label values after run_id, value). Values are converted with float():
anything a file holds that is not a number raises, and the collector leaves that run out of the scrape."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fedtune.metrics.state import RUN_STATUSES, RunView, Traffic, parse_time
from fedtune.results import NodeRecord, RoundRecord, RoundTimeline, RunResults

Sample = tuple[tuple[str, ...], float]
DIRECTIONS = ("down", "up")  # down: SuperLink -> SuperNode (global adapter); up: SuperNode -> SuperLink
NODE_STATES = ("sampled", "replied", "failed", "rejected")
# A round on the ServerApp's clock (fedtune.results.RoundTimeline): phase -> (from, to).
ROUND_PHASES = {
    "send": ("started", "sent"),  # configure_train until every message is pushed to the SuperLink
    "replies": ("sent", "all_replies"),  # nodes download, train and upload
    "aggregate": ("all_replies", "aggregated"),  # validate, average, check finite
    "checkpoint": ("aggregated", "checkpoint_written"),  # background writer (off the critical path)
}
# A node's own stages (NodeRecord.stage_seconds, from its reply). A fixed set: label values stay bounded
# whatever a node sends.
NODE_STAGES = ("data", "model_load", "adapter_in", "trainer_setup", "train", "adapter_out")


@dataclass
class RunData:
    """What one run's samples are computed from; `results` is None for a run only the SuperLink knows."""

    run_id: str
    view: RunView | None
    traffic: Traffic | None
    status: str
    carried: int = 0  # rounds copied from the predecessor of a resumed run

    @property
    def results(self) -> RunResults:
        assert self.view is not None
        return self.view.results

    @property
    def rounds(self) -> list[RoundRecord]:
        return self.results.rounds

    @property
    def own(self) -> list[RoundRecord]:
        return self.rounds[self.carried :]

    @property
    def last_round_at(self) -> float:
        assert self.view is not None
        return self.view.last_round_at

    @property
    def last(self) -> RoundRecord | None:
        return self.rounds[-1] if self.rounds else None


def one(value: Callable[[RunData], float | None]) -> Callable[[RunData], Iterator[Sample]]:
    """A single unlabelled value (skipped when None)."""

    def samples(run: RunData) -> Iterator[Sample]:
        v = value(run)
        if v is not None:
            yield (), float(v)

    return samples


def latest_per_node(attr: str) -> Callable[[RunData], Iterator[Sample]]:
    """A node's latest reported value of a NodeRecord field (resumed rounds included)."""

    def samples(run: RunData) -> Iterator[Sample]:
        latest: dict[str, float] = {}
        for record in run.rounds:
            for node, stats in record.nodes.items():
                value = getattr(stats, attr)
                if value is not None:
                    latest[node] = float(value)
        for node in sorted(latest):
            yield (node,), latest[node]

    return samples


def per_node_bytes(kind: str, pattern: str) -> Callable[[RunData], Iterator[Sample]]:
    """Σ over own rounds of NodeRecord.<pattern % direction>, per node and direction."""

    def samples(run: RunData) -> Iterator[Sample]:
        sums: Counter[tuple[str, str]] = Counter()
        for record in run.own:
            for node, stats in record.nodes.items():
                for direction in DIRECTIONS:
                    sums[(node, direction)] += int(getattr(stats, pattern % direction))
        for (node, direction), value in sorted(sums.items()):
            yield (node, direction, kind), float(value)

    return samples


def wire_bytes(run: RunData) -> Iterator[Sample]:
    if run.traffic is not None:
        yield ("all", "down", "wire"), float(run.traffic.bytes_sent)
        yield ("all", "up", "wire"), float(run.traffic.bytes_recv)


def communication_bytes(run: RunData) -> Iterator[Sample]:
    if run.view is not None:
        yield from per_node_bytes("leaderboard", "%s_bytes")(run)
        yield from per_node_bytes("sent", "%s_sent_bytes")(run)
    yield from wire_bytes(run)


def span(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else max(0.0, float(end) - float(start))


def phases(timeline: RoundTimeline) -> Iterator[tuple[str, float]]:
    for phase, (start, end) in ROUND_PHASES.items():
        seconds = span(getattr(timeline, start), getattr(timeline, end))
        if seconds is not None:
            yield phase, seconds


def last_round_phases(run: RunData) -> Iterator[Sample]:
    if run.last is not None:
        for phase, seconds in phases(run.last.timeline):
            yield (phase,), seconds


def own_round_phases(run: RunData) -> Iterator[Sample]:
    totals: defaultdict[str, float] = defaultdict(float)
    for record in run.own:
        for phase, seconds in phases(record.timeline):
            totals[phase] += seconds
    for phase in ROUND_PHASES:
        if phase in totals:
            yield (phase,), totals[phase]


def node_stages(run: RunData) -> Iterator[Sample]:
    latest: dict[str, NodeRecord] = {}
    for record in run.rounds:
        for node, stats in record.nodes.items():
            if stats.stage_seconds:
                latest[node] = stats
    for node in sorted(latest):
        for stage in NODE_STAGES:
            if stage in latest[node].stage_seconds:
                yield (node, stage), float(latest[node].stage_seconds[stage])


def node_round_trip(run: RunData) -> Iterator[Sample]:
    """ServerApp clock: the message to the node pushed → its reply pulled (latest round of each node)."""
    latest: dict[str, float] = {}
    for record in run.rounds:
        for node, stats in record.nodes.items():
            seconds = span(stats.timeline.server_sent, stats.timeline.server_received)
            if seconds is not None:
                latest[node] = seconds
    for node in sorted(latest):
        yield (node,), latest[node]


def reason_class(reason: str) -> str:
    """Bounded label values: serverapp.validation returns short codes; keep only the code."""
    return str(reason).split(":", 1)[0].strip().replace(" ", "-")[:40] or "unknown"


def rejections(run: RunData) -> Iterator[Sample]:
    counts: Counter[str] = Counter()
    for record in run.own:
        if record.rejections:
            for reason, count in record.rejections.items():
                counts[reason_class(reason)] += int(count)
        else:  # files written before per-round counts existed
            counts.update(reason_class(r) for r in record.rejected.values())
    for reason, count in sorted(counts.items()):
        yield (reason,), float(count)


def node_failures(run: RunData) -> Iterator[Sample]:
    counts = Counter(str(node) for record in run.own for node in record.failed)
    for node, count in sorted(counts.items()):
        yield (node,), float(count)


def node_train_seconds_total(run: RunData) -> Iterator[Sample]:
    totals: defaultdict[str, float] = defaultdict(float)
    for record in run.own:
        for node, stats in record.nodes.items():
            if stats.train_seconds is not None:
                totals[node] += float(stats.train_seconds)
    for node, value in sorted(totals.items()):
        yield (node,), value


def last_round_bytes(run: RunData) -> Iterator[Sample]:
    if run.last is not None:
        for node, stats in sorted(run.last.nodes.items()):
            yield (node, "down"), float(stats.down_bytes)
            yield (node, "up"), float(stats.up_bytes)


def round_nodes(run: RunData) -> Iterator[Sample]:
    if run.last is not None:
        last = run.last
        counts = {
            "sampled": last.sampled, "replied": last.replied, "failed": last.failed, "rejected": last.rejected
        }
        for state in NODE_STATES:
            yield (state,), float(len(counts[state]))


def status(run: RunData) -> Iterator[Sample]:
    for name in RUN_STATUSES:
        yield (name,), 1.0 if name == run.status else 0.0


def info(run: RunData) -> Iterator[Sample]:
    config = run.results.config
    model = str((config.get("model") or {}).get("name", ""))
    dataset = str((config.get("dataset") or {}).get("name", ""))
    yield (model, dataset, run.results.transport), 1.0


def started(run: RunData) -> float | None:
    if run.view is not None:
        return parse_time(run.results.started_at)
    return run.traffic.started_at if run.traffic is not None and run.traffic.started_at else None


def planned(run: RunData) -> float | None:
    value = run.results.config.get("num_server_rounds")
    return None if value is None else float(value)
