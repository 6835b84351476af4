"""Every metric the exporter serves, in one table: name, type, help, labels, and the sampler
(fedtune.metrics.samples) that computes it from a run. The collector turns the table into families.

Per-run metrics carry `run_id` first (added by the collector). Counters count only a run's *own* rounds:
the rounds a resumed run carried over from its predecessor are counted there. Gauges show the latest values.
docs/observability.md is the reference for operators.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fedtune.accounting import LEADERBOARD_BUDGET_LIMIT_MB, to_mb
from fedtune.metrics.samples import (
    NODE_STAGES,
    RunData,
    Sample,
    communication_bytes,
    info,
    last_round_bytes,
    last_round_phases,
    latest_per_node,
    node_failures,
    node_round_trip,
    node_stages,
    node_train_seconds_total,
    one,
    own_round_phases,
    planned,
    rejections,
    round_nodes,
    started,
    status,
)

ROUND_DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)


@dataclass(frozen=True)
class MetricDef:
    name: str
    kind: str  # gauge | counter | histogram (a histogram's samples are observations)
    help: str
    labels: tuple[str, ...]
    samples: Callable[[RunData], Iterable[Sample]]
    needs_results: bool = True
    buckets: tuple[float, ...] = ()


NODE = ("node",)
ND = ("node", "direction")
TABLE: tuple[MetricDef, ...] = (
    # -- communication ---------------------------------------------------------------------------------
    MetricDef("fedtune_communication_bytes", "counter",
              "Adapter bytes exchanged, per run, node and direction. kind=leaderboard: "
              "ArrayRecord.count_bytes() of the per-tensor form (the FlowerTune budget formula), per node; "
              "kind=sent: count_bytes() of what was actually sent (packed transport, codecs), per node; "
              'kind=wire: bytes the SuperLink reports for the run (flwr ls network-traffic), node="all". '
              "Rounds carried over by a resume are not counted again.",
              (*ND, "kind"), communication_bytes, needs_results=False),
    MetricDef("fedtune_round_communication_bytes", "gauge",
              "Leaderboard bytes of the latest finished round, per node and direction.", ND,
              last_round_bytes),
    MetricDef("fedtune_communication_budget_bytes", "gauge",
              "Cumulative communication budget of the run (all rounds, both directions, resumes included).",
              (), one(lambda r: r.results.budget_bytes)),
    MetricDef("fedtune_communication_budget_mb", "gauge",
              "Cumulative communication budget in MB as the leaderboard reports it (bytes / 1024^2).",
              (), one(lambda r: to_mb(r.results.budget_bytes))),
    MetricDef("fedtune_communication_sent_bytes", "gauge",
              "Cumulative bytes actually sent (count_bytes() of the records on the wire; resumes included).",
              (), one(lambda r: r.results.sent_bytes)),
    MetricDef("fedtune_communication_budget_limit_mb", "gauge",
              f"Configured budget limit in MB (comm.budget-limit-mb; the leaderboard's cap is "
              f"{LEADERBOARD_BUDGET_LIMIT_MB:g}).", (),
              one(lambda r: r.results.budget_limit_mb or LEADERBOARD_BUDGET_LIMIT_MB)),
    # -- rounds ----------------------------------------------------------------------------------------
    MetricDef("fedtune_round", "gauge", "Latest finished round of the run (0 before the first).", (),
              one(lambda r: r.results.last_round)),
    MetricDef("fedtune_rounds_planned", "gauge", "num-server-rounds of the run.", (), one(planned)),
    MetricDef("fedtune_round_last_timestamp_seconds", "gauge",
              "Unix time the latest round finished (the run's start before the first round).", (),
              one(lambda r: r.last_round_at)),
    MetricDef("fedtune_round_duration_seconds", "histogram",
              "Wall time of a round on the ServerApp: from configure_train to results.json written.", (),
              lambda r: (((), rec.duration_seconds) for rec in r.own), buckets=ROUND_DURATION_BUCKETS),
    MetricDef("fedtune_round_phase_seconds", "gauge",
              "Latest round's phases on the ServerApp's clock: send (messages pushed), replies (nodes "
              "download, train, upload), aggregate, checkpoint (background writer).", ("phase",),
              last_round_phases),
    MetricDef("fedtune_round_phases_seconds", "counter",
              "Seconds spent in each round phase, summed over the run's own rounds (rate() = share of time).",
              ("phase",), own_round_phases),
    MetricDef("fedtune_round_nodes", "gauge",
              "Nodes in the latest finished round by state (sampled, replied, failed, rejected).",
              ("state",), round_nodes),
    MetricDef("fedtune_node_failures", "counter", "Replies that carried an error (node failed or timed out).",
              NODE, node_failures),
    MetricDef("fedtune_rejected_updates", "counter", "Updates refused by validation, by reason.",
              ("reason",), rejections),
    MetricDef("fedtune_train_loss", "gauge", "Aggregated (example-weighted) train loss of the latest round.",
              (), one(lambda r: r.last.train_loss if r.last else None)),
    # -- nodes -----------------------------------------------------------------------------------------
    MetricDef("fedtune_node_train_loss", "gauge", "Train loss a node reported for its latest round.",
              NODE, latest_per_node("train_loss")),
    MetricDef("fedtune_node_train_examples", "gauge",
              "Training examples of a node (num-examples of its latest round).", NODE,
              latest_per_node("num_examples")),
    MetricDef("fedtune_node_train_seconds", "gauge", "Local training wall time of a node's latest round.",
              NODE, latest_per_node("train_seconds")),
    MetricDef("fedtune_node_train_seconds", "counter",
              "Local training wall time summed over a node's rounds.", NODE, node_train_seconds_total),
    MetricDef("fedtune_node_tokens_per_second", "gauge", "Training throughput of a node's latest round.",
              NODE, latest_per_node("tokens_per_second")),
    MetricDef("fedtune_node_peak_memory_bytes", "gauge",
              "Peak accelerator memory of a node's latest round (CUDA max allocated; CPU: peak RSS).", NODE,
              latest_per_node("peak_memory_bytes")),
    MetricDef("fedtune_node_stage_seconds", "gauge",
              f"Seconds of each stage of a node's latest round, as it reported them "
              f"({', '.join(NODE_STAGES)}).",
              ("node", "stage"), node_stages),
    MetricDef("fedtune_node_round_trip_seconds", "gauge",
              "ServerApp clock, a node's latest round: its message pushed until its reply pulled.", NODE,
              node_round_trip),
    # -- checkpoints and the run -----------------------------------------------------------------------
    MetricDef("fedtune_checkpoint_write_seconds", "gauge", "Time to write the latest round's checkpoint(s).",
              (), one(lambda r: r.last.checkpoint_seconds if r.last else None)),
    MetricDef("fedtune_checkpoint_write_seconds", "counter",
              "Time spent writing checkpoints, summed over rounds.", (),
              one(lambda r: sum(rec.checkpoint_seconds for rec in r.own))),
    MetricDef("fedtune_run_status", "gauge", "1 for the run's current status, 0 for the others.", ("status",),
              status, needs_results=False),
    MetricDef("fedtune_run_info", "gauge", "Static facts about the run (value 1).",
              ("model", "dataset", "transport"), info),
    MetricDef("fedtune_run_start_timestamp_seconds", "gauge", "Unix time the run started.", (), one(started),
              needs_results=False),
)
