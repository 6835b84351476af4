"""Communication accounting, as the FlowerTune leaderboard counts it.

A message's cost is `ArrayRecord.count_bytes()` of its per-tensor record: Σ over tensors of (serialised .npy
bytes + key bytes), computed from shapes and dtypes alone (`fedtune.packing.leaderboard_bytes`) whatever form
the adapter actually travels in. The budget is the sum over every adapter message in both directions,
reported in MB = bytes / 1024². Beside it the ledger keeps the bytes actually sent (`count_bytes()` of the
record on the wire: the packed form is a few arrays and a manifest).
"""

from __future__ import annotations

from dataclasses import dataclass, field

MB = 1024 * 1024
REFERENCE_BUDGET_MB = 2942.79  # the FlowerTune reference submission (InternLM3-8B, 10 rounds, 2 nodes)
LEADERBOARD_BUDGET_LIMIT_MB = 200_000.0  # the leaderboard's cap on a submission's budget


def to_mb(num_bytes: int) -> float:
    return num_bytes / MB


@dataclass
class NodeTraffic:
    down_bytes: int = 0  # server → node (global adapter), leaderboard bytes
    up_bytes: int = 0  # node → server (local update), leaderboard bytes
    down_sent_bytes: int = 0  # count_bytes() of the record actually sent
    up_sent_bytes: int = 0


@dataclass
class RoundTraffic:
    server_round: int
    nodes: dict[int, NodeTraffic] = field(default_factory=dict)

    def node(self, node_id: int) -> NodeTraffic:
        return self.nodes.setdefault(node_id, NodeTraffic())

    @property
    def down_bytes(self) -> int:
        return sum(n.down_bytes for n in self.nodes.values())

    @property
    def up_bytes(self) -> int:
        return sum(n.up_bytes for n in self.nodes.values())

    @property
    def total_bytes(self) -> int:
        return self.down_bytes + self.up_bytes

    @property
    def sent_down_bytes(self) -> int:
        return sum(n.down_sent_bytes for n in self.nodes.values())

    @property
    def sent_up_bytes(self) -> int:
        return sum(n.up_sent_bytes for n in self.nodes.values())


@dataclass
class CommLedger:
    """Bytes per round, per node, per direction; the cumulative budget."""

    rounds: dict[int, RoundTraffic] = field(default_factory=dict)
    carried_bytes: int = 0  # bytes of rounds done before a resume
    carried_sent_bytes: int = 0

    def round(self, server_round: int) -> RoundTraffic:
        return self.rounds.setdefault(server_round, RoundTraffic(server_round))

    def record_down(
        self, server_round: int, node_id: int, num_bytes: int, sent_bytes: int | None = None
    ) -> None:
        node = self.round(server_round).node(node_id)
        node.down_bytes += num_bytes
        node.down_sent_bytes += num_bytes if sent_bytes is None else sent_bytes

    def record_up(
        self, server_round: int, node_id: int, num_bytes: int, sent_bytes: int | None = None
    ) -> None:
        node = self.round(server_round).node(node_id)
        node.up_bytes += num_bytes
        node.up_sent_bytes += num_bytes if sent_bytes is None else sent_bytes

    @property
    def total_sent_bytes(self) -> int:
        return self.carried_sent_bytes + sum(
            r.sent_down_bytes + r.sent_up_bytes for r in self.rounds.values()
        )

    @property
    def total_bytes(self) -> int:
        return self.carried_bytes + sum(r.total_bytes for r in self.rounds.values())

    @property
    def total_mb(self) -> float:
        return to_mb(self.total_bytes)

    def cumulative_bytes(self, through_round: int) -> int:
        return self.carried_bytes + sum(
            r.total_bytes for n, r in self.rounds.items() if n <= through_round
        )
