"""The run's summary as text: one row per round, then the communication budget. Printed by the demo
at the end of a run and by `fedtune report`."""

from __future__ import annotations

from fedtune.report.view import MB, RunView


def round_table(view: RunView) -> str:
    header = (
        f"{'round':>5} | {'train loss':>10} | {'nodes':>5} | {'down MB':>8} | {'up MB':>8} | "
        f"{'budget MB':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in view.rounds:
        loss = "n/a" if r.train_loss is None else f"{r.train_loss:.4f}"
        lines.append(
            f"{r.round:>5} | {loss:>10} | {len(r.replied):>5} | {r.down_bytes / MB:>8.2f} | "
            f"{r.up_bytes / MB:>8.2f} | {r.budget_mb:>9.2f}"
        )
    lines.append(
        f"communication budget: {view.budget_mb:.2f} MB "
        f"(Σ ArrayRecord.count_bytes() both ways / 1024²; FlowerTune reference run: "
        f"{view.reference_mb:.2f} MB)"
    )
    troubled = [r for r in view.rounds if r.failed or r.rejected]
    for r in troubled:
        parts = []
        if r.failed:
            parts.append("failed " + ", ".join(str(n) for n in r.failed))
        if r.rejected:
            parts.append("rejected " + "; ".join(f"{n}: {why}" for n, why in r.rejected.items()))
        lines.append(f"round {r.round}: " + " | ".join(parts))
    return "\n".join(lines)
