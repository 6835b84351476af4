"""`make demo`: the main job on the embedded offline default.

Generates certificates, starts a TLS SuperLink and 2 SuperNodes on loopback, runs
`flwr run . fedtune-local --run-config profiles/demo.toml --stream`, prints the per-round table and the
communication budget, and stops every process it started (also on Ctrl-C or failure).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedtune.errors import FedTuneError, one_line_errors
from fedtune.federation import CONNECTION, LocalFederation
from fedtune.results import RESULTS_FILE, RunResults

REPO = Path(__file__).resolve().parent.parent
DEMO_PROFILE = REPO / "profiles" / "demo.toml"
NUM_SUPERNODES = 2


def round_table(results: dict[str, Any]) -> str:
    """Per-round loss and bytes, then the budget — the demo's summary."""
    header = (
        f"{'round':>5} | {'train loss':>10} | {'nodes':>5} | {'down MB':>8} | {'up MB':>8} | "
        f"{'budget MB':>9}"
    )
    lines = [header, "-" * len(header)]
    for record in results["rounds"]:
        loss = record["train_loss"]
        lines.append(
            f"{record['round']:>5} | {loss if loss is None else format(loss, '.4f'):>10} | "
            f"{len(record['replied']):>5} | {record['bytes_down'] / 2**20:>8.2f} | "
            f"{record['bytes_up'] / 2**20:>8.2f} | {record['budget_mb']:>9.2f}"
        )
    lines.append(
        f"communication budget: {results['budget_mb']:.2f} MB "
        f"(Σ ArrayRecord.count_bytes() both ways / 1024²; FlowerTune reference run: "
        f"{results['reference_budget_mb']:.2f} MB)"
    )
    return "\n".join(lines)


def latest_run_id(fed: LocalFederation) -> int:
    runs = sorted(fed.runs(), key=lambda r: str(r.get("pending-at", "")))
    if not runs:
        raise FedTuneError("the SuperLink lists no run")
    return int(runs[-1]["run-id"])


def run_demo(workdir: Path, profile: Path, overrides: list[str]) -> dict[str, Any]:
    started = time.monotonic()
    with LocalFederation(workdir, extra_env={"OMP_NUM_THREADS": "1"}) as fed:
        print(f"[demo] SuperLink (TLS) on https://{fed.address}, certificates in {fed.certs_dir}")
        fed.start(NUM_SUPERNODES)
        print(f"[demo] {NUM_SUPERNODES} SuperNodes started; logs in {fed.workdir / 'logs'}")
        cmd = [
            str(Path(sys.executable).with_name("flwr")), "run", str(REPO), CONNECTION,
            "--run-config", str(profile), "--stream",
        ]
        for override in overrides:
            cmd += ["--run-config", override]
        print("[demo] $ " + " ".join(cmd[1:]), flush=True)
        streamed = subprocess.run(cmd, env=fed.env(), cwd=REPO)
        if streamed.returncode != 0:
            raise FedTuneError(f"flwr run exited with {streamed.returncode}; see {fed.workdir / 'logs'}")
        run_id = latest_run_id(fed)
        info = fed.wait_for_run(run_id, timeout=120)
        results_path = fed.run_dir(run_id) / RESULTS_FILE
        if not results_path.is_file():
            raise FedTuneError(f"the run wrote no {results_path}")
        results = RunResults.read(results_path).to_json()
        print()
        print(round_table(results))
        print(f"status: {info['status']}; global adapter: {results.get('final_adapter')}")
        traffic = info.get("network-traffic", {})
        if traffic:
            inbound, outbound = traffic.get("inbound-bytes", 0), traffic.get("outbound-bytes", 0)
            print(
                f"on the wire (SuperLink, all messages): in {inbound / 2**20:.2f} MB, "
                f"out {outbound / 2**20:.2f} MB"
            )
        print(f"[demo] wall time {time.monotonic() - started:.0f} s")
        if info["status"] != "finished:completed":
            raise FedTuneError(f"run {run_id} ended {info['status']}; see {fed.workdir / 'logs'}")
        return results


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedtune-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / ".demo")
    parser.add_argument("--profile", type=Path, default=DEMO_PROFILE)
    args = parser.parse_args(argv)
    run_demo(args.workdir, args.profile, [])


if __name__ == "__main__":
    main()
