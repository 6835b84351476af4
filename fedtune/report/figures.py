"""The report's figures as PNG bytes (matplotlib, Agg backend: no display, no server)."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import TYPE_CHECKING

from fedtune.report.view import MB, PHASES, RunView

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# name -> (title, drawer); the file is <name>.png beside report.html
FIGURES: dict[str, str] = {
    "loss": "Train loss per round",
    "budget": "Cumulative communication budget",
    "node_bytes": "Bytes per node and direction",
    "phases": "Round time by phase",
}
_PHASE_COLOURS = ("#4c72b0", "#8172b3", "#dd8452", "#c44e52", "#55a868", "#c0c0c0")


def _figure(draw: Callable[[Axes], None], width: float = 6.4, height: float = 3.4) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=True)  # a file renderer: the ServerApp host has no display
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    draw(fig.add_subplot())
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _no_data(ax: Axes, text: str = "no finished round yet") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def loss(view: RunView) -> bytes:
    def draw(ax: Axes) -> None:
        points = [(r.round, r.train_loss) for r in view.rounds if r.train_loss is not None]
        if not points:
            return _no_data(ax)
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="o", color="#4c72b0")
        ax.set_xlabel("round")
        ax.set_ylabel("train loss (weighted mean)")
        ax.set_xticks(list(xs))
        ax.grid(alpha=0.3)

    return _figure(draw)


def budget(view: RunView) -> bytes:
    """Cumulative MB per round against the reference run and the cap, on a log scale so a 20 MB demo
    and the 200,000 MB cap fit one picture."""

    def draw(ax: Axes) -> None:
        if not view.rounds:
            return _no_data(ax)
        xs = [r.round for r in view.rounds]
        ys = [r.budget_mb for r in view.rounds]
        ax.plot(xs, ys, marker="o", color="#4c72b0", label=f"this run ({view.budget_mb:,.2f} MB)")
        ax.axhline(view.reference_mb, color="#dd8452", ls="--",
                   label=f"FlowerTune reference {view.reference_mb:,.2f} MB")
        ax.axhline(view.budget_limit_mb, color="#c44e52", ls=":", label=f"cap {view.budget_limit_mb:,.0f} MB")
        ax.set_yscale("log")
        low = max(min(y for y in ys if y > 0) / 10, 1e-3) if any(y > 0 for y in ys) else 1e-3
        ax.set_ylim(low, view.budget_limit_mb * 5)
        ax.set_xlabel("round")
        ax.set_ylabel("cumulative MB (log scale)")
        ax.set_xticks(xs)
        ax.figure.legend(loc="outside lower center", ncols=3, fontsize=8)
        ax.grid(alpha=0.3)

    return _figure(draw)


def node_bytes(view: RunView) -> bytes:
    def draw(ax: Axes) -> None:
        if not view.nodes:
            return _no_data(ax)
        labels = [n.label for n in view.nodes]
        ys = range(len(labels))
        down = [n.down_bytes / MB for n in view.nodes]
        up = [n.up_bytes / MB for n in view.nodes]
        ax.barh([y - 0.2 for y in ys], down, height=0.4, label="down (server → node)", color="#4c72b0")
        ax.barh([y + 0.2 for y in ys], up, height=0.4, label="up (node → server)", color="#55a868")
        ax.set_yticks(list(ys), labels)
        ax.invert_yaxis()
        ax.set_xlabel("MB over the run (leaderboard bytes)")
        ax.figure.legend(loc="outside lower center", ncols=2, fontsize=8)
        ax.grid(alpha=0.3, axis="x")

    return _figure(draw, height=max(2.8, 1.4 + 0.5 * len(view.nodes)))


def phases(view: RunView) -> bytes:
    def draw(ax: Axes) -> None:
        if not view.rounds:
            return _no_data(ax)
        xs = [r.round for r in view.rounds]
        bottom = [0.0] * len(xs)
        for (key, label), colour in zip(PHASES, _PHASE_COLOURS, strict=True):
            values = [r.phases.get(key, 0.0) for r in view.rounds]
            ax.bar(xs, values, bottom=bottom, label=label, color=colour)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_xlabel("round")
        ax.set_ylabel("seconds (slowest node)")
        ax.set_xticks(xs)
        ax.figure.legend(loc="outside lower center", ncols=3, fontsize=8)
        ax.grid(alpha=0.3, axis="y")

    return _figure(draw)


DRAWERS: dict[str, Callable[[RunView], bytes]] = {
    "loss": loss, "budget": budget, "node_bytes": node_bytes, "phases": phases,
}


def render_all(view: RunView) -> dict[str, bytes]:
    """{name: PNG bytes} for every figure in FIGURES."""
    return {name: DRAWERS[name](view) for name in FIGURES}
