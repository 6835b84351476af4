"""`make demo` / `fedtune demo`: the main job on the embedded offline default.

Generates certificates, starts a TLS SuperLink and 2 SuperNodes with warm trainers on loopback, runs
`flwr run . fedtune-local --run-config profiles/demo.toml --stream` and follows it (readable lines, live
progress), prints the per-round table, the communication budget and the run report's path, and stops every
process it started (also on Ctrl-C or failure). A run that does not end `finished:completed` is an error:
one line on stderr and exit status 2, whatever `flwr run --stream` returned (it exits 0 for a failed run).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from fedtune.errors import FedTuneError, one_line_errors
from fedtune.federation import CONNECTION, LocalFederation
from fedtune.follow import RunFollower
from fedtune.report import REPORT_FILE, write_report
from fedtune.report.table import round_table
from fedtune.report.view import RunView, load

REPO = Path(__file__).resolve().parent.parent
DEMO_PROFILE = REPO / "profiles" / "demo.toml"
NUM_SUPERNODES = 2


def latest_run_id(fed: LocalFederation) -> int:
    runs = sorted(fed.runs(), key=lambda r: str(r.get("pending-at", "")))
    if not runs:
        raise FedTuneError("the SuperLink lists no run")
    return int(runs[-1]["run-id"])


def run_config_file(workdir: Path, profile: Path, overrides: list[str]) -> Path:
    """The profile with KEY=VALUE overrides (VALUE in TOML), as the one file `flwr run` takes."""
    from fedtune import toml_io

    if not overrides:
        return profile
    merged = toml_io.read_flat(profile)
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key.strip():
            raise FedTuneError(f"--run-config {override!r}: expected KEY=VALUE (VALUE in TOML, e.g. '\"x\"')")
        try:
            merged[key.strip()] = toml_io.loads(f"v = {value.strip()}")["v"]
        except ValueError as err:
            raise FedTuneError(f"--run-config {override!r}: the value is not TOML ({err})") from None
    path = workdir / "run-config.toml"
    toml_io.write(path, merged)  # dotted keys quoted: Flower reads them back as the same flat keys
    return path


def prepare_embedded_model(console: Console, config: Path) -> None:
    """Convert the embedded model once, here with its progress bar on the terminal, rather than silently
    inside the first SuperNode's round (whose output goes to its log file)."""
    from fedtune import embedded, toml_io

    if toml_io.read_flat(config).get("model.name") != embedded.EMBEDDED_MODEL:
        return
    if (embedded.cache_dir() / "models" / "smollm2-135m-instruct" / "config.json").is_file():
        return
    console.print(f"[demo] converting the embedded model once (GGUF → {embedded.cache_dir() / 'models'})",
                  markup=False)
    code = "from fedtune.embedded import embedded_model_dir; embedded_model_dir()"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO)  # tqdm's bars go to this terminal
    if done.returncode != 0:
        raise FedTuneError("converting the embedded model failed (see above)")


def _summary(console: Console, view: RunView, info: dict[str, Any], started: float) -> None:
    console.print()
    console.print(round_table(view), highlight=False, markup=False)
    console.print(f"status: {info['status']}; global adapter: {view.final_adapter}", highlight=False)
    traffic = info.get("network-traffic", {})
    if traffic:
        inbound, outbound = traffic.get("inbound-bytes", 0), traffic.get("outbound-bytes", 0)
        console.print(
            f"on the wire (SuperLink, all messages): in {inbound / 2**20:.2f} MB, "
            f"out {outbound / 2**20:.2f} MB",
            highlight=False,
        )
    report = view.run_dir / REPORT_FILE
    if not report.is_file():  # the ServerApp writes it at run end; an older app may not
        report = write_report(view.run_dir)
    console.print(f"report: {report}", highlight=False, markup=False)
    console.print(f"[demo] wall time {time.monotonic() - started:.0f} s", highlight=False, markup=False)


def run_demo(workdir: Path, profile: Path, overrides: list[str]) -> RunView:
    started = time.monotonic()
    console = Console(highlight=False, soft_wrap=True)  # long paths stay one line (the terminal wraps)
    workdir.mkdir(parents=True, exist_ok=True)
    config = run_config_file(workdir, profile, overrides)
    prepare_embedded_model(console, config)
    with LocalFederation(workdir, extra_env={"OMP_NUM_THREADS": "1"}) as fed:
        console.print(f"[demo] SuperLink (TLS) on https://{fed.address}, certificates in {fed.certs_dir}",
                      markup=False)
        fed.start_superlink()
        for partition in range(NUM_SUPERNODES):
            # Warm trainers keep the 4-bit model and the tokenised partition loaded across rounds and load
            # the demo's model while the run is submitted: no round pays imports and model loading again.
            fed.start_supernode(
                partition, NUM_SUPERNODES,
                extra_args=["--warm-trainer", "--warm-trainer-preload", str(config)],
            )
        logs = fed.workdir / "logs"
        console.print(f"[demo] {NUM_SUPERNODES} SuperNodes started; logs in {logs}", markup=False)
        cmd = [
            str(Path(sys.executable).with_name("flwr")), "run", str(REPO), CONNECTION,
            "--run-config", str(config), "--stream",
        ]
        console.print("[demo] $ flwr " + " ".join(cmd[1:]), markup=False)
        follower = RunFollower(
            console,
            outputs=fed.outputs,
            node_logs=[node.log_path for node in fed.supernodes],
            raw_log=logs / "serverapp.log",
        )
        with subprocess.Popen(
            cmd, env=fed.env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            errors="replace",
        ) as streamed:
            assert streamed.stdout is not None
            try:
                state = follower.follow(streamed.stdout)
            except BaseException:  # Ctrl-C, a closed terminal: the CLI goes first, then the federation
                streamed.terminate()
                raise
        if streamed.returncode != 0:
            raise FedTuneError(f"flwr run exited with {streamed.returncode}; see {logs / 'serverapp.log'}")
        run_id = state.run_id or latest_run_id(fed)
        info = fed.wait_for_run(run_id, timeout=120)
        results_path = fed.run_dir(run_id)
        if info["status"] != "finished:completed":
            # `flwr run --stream` exits 0 whatever became of the run: this line is the verdict
            reason = ""
            with contextlib.suppress(FedTuneError):  # a run that failed before writing results.json
                reason = load(results_path).error or ""
            if (results_path / REPORT_FILE).is_file():
                console.print(f"report: {results_path / REPORT_FILE}", markup=False)
            raise FedTuneError(
                f"run {run_id} ended {info['status']}" + (f": {reason}" if reason else "")
                + f" (ServerApp log: {logs / 'serverapp.log'})"
            )
        view = load(results_path)
        _summary(console, view, info, started)
        return view


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedtune demo", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / ".demo")
    parser.add_argument("--profile", type=Path, default=DEMO_PROFILE)
    parser.add_argument(
        "--run-config", action="append", default=[], metavar="KEY=VALUE",
        help="override one run-config value of the profile (VALUE in TOML); repeatable",
    )
    args = parser.parse_args(argv)
    # A closed terminal (SIGHUP) or a kill (SIGTERM) unwinds like Ctrl-C, so the federation's processes,
    # each in its own session, are stopped instead of left running.
    for sig in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, _exit_on_signal)
    run_demo(args.workdir, args.profile, args.run_config)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    main()
