"""The tables bench/federation.py prints: each round's hop timeline, a run's totals, all runs side by
side."""

from __future__ import annotations

from bench.federation_timeline import NODE_HOPS


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def print_round(r: dict) -> None:
    share = r["non_training_share"]
    if r["failed"] or r["rejected"]:
        print(f"\nround {r['round']}: FAILED nodes {r['failed']}, rejected {r['rejected']}")
    print(
        f"\nround {r['round']}: wall {r['wall_seconds']:.2f} s | slowest node's training "
        f"{r['slowest_train_seconds']:.2f} s | non-training {r['non_training_seconds']:.2f} s "
        f"({'—' if share is None else format(share, '.1%')})",
        flush=True,
    )
    nodes = r["timeline"]["nodes"]
    print("| hop (s from round start) | " + " | ".join(f"node {k}" for k in nodes) + " | longest step |")
    print("|---" * (len(nodes) + 2) + "|")
    previous: dict[str, float | None] = dict.fromkeys(nodes, 0.0)
    for label, _ in NODE_HOPS:
        values = {k: hops[label] for k, hops in nodes.items()}
        steps = [v - previous[k] for k, v in values.items() if v is not None and previous[k] is not None]
        print(
            f"| {label} | " + " | ".join(_fmt(v) for v in values.values())
            + f" | {_fmt(max(steps) if steps else None)} |"
        )
        previous = {k: (v if v is not None else previous[k]) for k, v in values.items()}
    last = max((v for v in previous.values() if v is not None), default=0.0)
    for label, value in r["timeline"]["round"].items():
        step = None if value is None else value - last
        print(f"| {label} | " + " | ".join(_fmt(value) for _ in nodes) + f" | {_fmt(step)} |")
        last = value if value is not None else last


def print_run(run: dict) -> None:
    s = run["summary"]
    print(
        f"\n== {run['profile']} / {run['transport']}: run {run['run_id']} {run['status']}, "
        f"{len(run['rounds'])} rounds, whole run {s['run_wall_seconds']:.1f} s "
        f"(ServerApp start {_fmt(s['serverapp_start_seconds'])} s); Σ slowest training "
        f"{s['sum_slowest_train_seconds']:.1f} s + first-round load {s['first_round_load_seconds']:.1f} s; "
        f"ratio {_fmt(s['run_wall_over_training_and_load'])}",
        flush=True,
    )
    if "extrapolated_10_rounds" in s:
        e = s["extrapolated_10_rounds"]
        print(
            f"   10 rounds (extrapolated): {e['run_wall_seconds']:.0f} s wall vs "
            f"{e['sum_slowest_train_seconds']:.0f} s training → ratio {_fmt(e['ratio'])} (target ≤ 1.2); "
            f"later rounds non-training {s['later_rounds_non_training_seconds']:.2f} s "
            f"({_fmt(100 * (s['later_rounds_non_training_share'] or 0))} %)"
        )


def print_comparison(runs: list[dict]) -> None:
    print("\n| profile | transport | round | wall s | slowest training s | non-training s | share |")
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        for r in run["rounds"]:
            share = r["non_training_share"]
            print(
                f"| {run['profile']} | {run['transport']} | {r['round']} | {r['wall_seconds']:.2f} "
                f"| {r['slowest_train_seconds']:.2f} | {r['non_training_seconds']:.2f} "
                f"| {_fmt(None if share is None else 100 * share)} % |"
            )
