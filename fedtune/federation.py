"""A real federation on one machine: a TLS SuperLink and N SuperNodes as separate processes on
loopback, started through the same launchers used in production. `make demo` and the end-to-end
tests use it; nothing is simulated.

The deployment's exposure shape too: SuperNodes dial `address` (the Fleet-only nginx proxy of
`fedtune-superlink`), the `flwr` CLI (Control API) and the exporter dial `control_address` (the SuperLink
itself, 127.0.0.1:`internal_port`)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fedtune import toml_io
from fedtune.certs import ensure as ensure_certs
from fedtune.errors import FedTuneError
from fedtune.flwr_config import write_connection
from fedtune.runtime_env import flwr_env

CONNECTION = "fedtune-local"
TERMINAL_STATUSES = ("finished:completed", "finished:failed", "finished:stopped")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ManagedProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=timeout)
        self.log_file.close()

    def kill(self) -> None:
        """kill -9 the process group: a crash, not a shutdown."""
        self.stop(signal.SIGKILL)

    def log_text(self) -> str:
        self.log_file.flush()
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class LocalFederation:
    workdir: Path
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)  # public: the Fleet-only proxy SuperNodes dial
    internal_port: int = field(default_factory=free_port)  # the SuperLink itself, on 127.0.0.1
    health_port: int = field(default_factory=free_port)
    extra_env: dict[str, str] = field(default_factory=dict)
    superlink: ManagedProcess | None = None
    supernodes: list[ManagedProcess] = field(default_factory=list)
    # SuperNode authentication: the SuperLink admits only registered keys; start_supernode generates
    # and registers one ECDSA key per node name (fedtune/auth.py). Off by default here (demo, tests).
    supernode_auth: bool = False
    registered_keys: dict[str, int | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        for sub in ("certs", "state", "logs", "outputs", "flwr-home"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)

    # -- paths ----------------------------------------------------------------------------
    @property
    def certs_dir(self) -> Path:
        return self.workdir / "certs"

    @property
    def ca_cert(self) -> Path:
        return self.certs_dir / "ca.crt"

    @property
    def outputs(self) -> Path:
        return self.workdir / "outputs"

    @property
    def flwr_home(self) -> Path:
        return self.workdir / "flwr-home"

    @property
    def keys_dir(self) -> Path:
        return self.workdir / "keys"

    @property
    def address(self) -> str:
        """What SuperNodes dial: the proxy (Fleet API and /health only)."""
        return f"{self.host}:{self.port}"

    @property
    def control_address(self) -> str:
        """What the operator's `flwr` and the exporter dial: the SuperLink on loopback (all APIs)."""
        return f"127.0.0.1:{self.internal_port}"

    def env(self, **extra: str) -> dict[str, str]:
        return flwr_env(
            FLWR_HOME=str(self.flwr_home),
            FEDTUNE_OUTPUT_DIR=str(self.outputs),
            PYTHONUNBUFFERED="1",
            **{**self.extra_env, **extra},
        )

    # -- processes --------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> ManagedProcess:
        log_path = self.workdir / "logs" / f"{name}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed by ManagedProcess.stop
        process = subprocess.Popen(
            [sys.executable, "-m", *args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.workdir,
            start_new_session=True,  # its own process group: stop() reaches the ClientApps too
        )
        return ManagedProcess(name, process, log_path, log_file)

    def start_superlink(self, extra_args: list[str] | None = None, timeout: float = 60.0) -> None:
        ensure_certs(self.certs_dir, ["localhost", self.host])
        self.superlink = self._spawn(
            "superlink",
            [
                "superlink",
                "--certs-dir", str(self.certs_dir),
                "--database", str(self.workdir / "state" / "superlink.db"),
                "--host", self.host,
                "--port", str(self.port),
                "--internal-port", str(self.internal_port),
                # nginx's config, pid and temp folders with the rest of this federation (not in /tmp)
                "--proxy-dir", str(self.workdir / "proxy"),
                "--health-port", str(self.health_port),
                "--enable-supernode-auth" if self.supernode_auth else "--no-supernode-auth",
                *(extra_args or []),
            ],
            self.env(),
        )
        self.wait_healthy(timeout)
        write_connection(self.flwr_home, CONNECTION, self.control_address, self.ca_cert)

    def health(self) -> int | None:
        """HTTP status of /health through the proxy over TLS (verified against our CA), or None:
        200 only when both the proxy and the SuperLink behind it are up."""
        context = ssl.create_default_context(cafile=str(self.ca_cert))
        try:
            with urllib.request.urlopen(
                f"https://{self.host}:{self.port}/health", context=context, timeout=2
            ) as response:
                return int(response.status)
        except OSError:
            return None

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.superlink is not None
            if not self.superlink.alive():
                raise FedTuneError(f"SuperLink exited:\n{self.superlink.log_text()[-3000:]}")
            if self.health() == 200:
                return
            time.sleep(0.5)
        raise FedTuneError(f"SuperLink not healthy after {timeout:.0f}s")

    def start_supernode(
        self,
        partition_id: int,
        num_partitions: int,
        root_certificates: Path | None = None,
        extra_args: list[str] | None = None,
        name: str | None = None,
        auth: bool | None = None,
    ) -> ManagedProcess:
        """Start a SuperNode; with auth (default: the federation's `supernode_auth`) it joins with the
        key of `name`, generated and registered on first use (a restarted node keeps its node id)."""
        name = name or f"supernode-{partition_id}"
        extra_args = list(extra_args or [])
        if (self.supernode_auth if auth is None else auth) and "--auth-key" not in extra_args:
            extra_args += ["--auth-key", str(self.node_key(name))]
        node = self._spawn(
            name,
            [
                "supernode",
                "--superlink", self.address,
                "--root-certificates", str(root_certificates or self.ca_cert),
                "--partition-id", str(partition_id),
                "--num-partitions", str(num_partitions),
                "--clientapp-port", str(free_port()),
                *(extra_args or []),
            ],
            self.env(),
        )
        self.supernodes.append(node)
        return node

    def node_key(self, name: str, register: bool = True) -> Path:
        """The private key of SuperNode `name` (generated once), registered with the SuperLink."""
        from fedtune.auth import generate
        from fedtune.auth import register as register_key

        pair, _ = generate(self.keys_dir, name)
        if register and name not in self.registered_keys:
            self.registered_keys[name] = register_key(pair.public_key, CONNECTION, self.flwr_home)
        return pair.private_key

    def start(self, num_supernodes: int) -> LocalFederation:
        """The SuperLink, then `num_supernodes` SuperNodes, one partition each (of as many)."""
        self.start_superlink()
        for partition in range(num_supernodes):
            self.start_supernode(partition, num_supernodes)
        return self

    def stop(self) -> None:
        for node in reversed(self.supernodes):
            node.stop()
        if self.superlink is not None:
            self.superlink.stop()

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- runs -------------------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(Path(sys.executable).with_name("flwr")), *args],
            capture_output=True, text=True, env=self.env(), timeout=timeout, cwd=self.workdir,
        )

    def submit(
        self,
        app_dir: Path,
        profile: Path | None = None,
        overrides: dict[str, Any] | None = None,
        timeout: float = 120.0,
    ) -> int:
        """Start a run with `profile` (a run-config TOML) plus `overrides`; returns the run id. `timeout`:
        for `flwr run` (it builds and uploads the FAB: slow on a loaded host)."""
        args = ["run", str(app_dir), CONNECTION, "--format", "json"]
        if profile is not None or overrides:
            config_file = self._run_config_file(profile, overrides or {})
            check_known_keys(app_dir, config_file)  # flwr only says "Invalid run configuration"
            args += ["--run-config", str(config_file)]
        done = self.flwr(*args, timeout=timeout)
        try:
            payload = json.loads(done.stdout)
        except json.JSONDecodeError:
            payload = {}
        if done.returncode != 0 or not payload.get("success", False):
            raise FedTuneError(f"flwr run failed: {done.stdout[-2000:]} {done.stderr[-2000:]}")
        return int(payload["run-id"])

    def _run_config_file(self, profile: Path | None, overrides: dict[str, Any]) -> Path:
        """flwr takes one TOML file or key=value pairs, not both: merge them into one file."""
        merged: dict[str, Any] = {}
        if profile is not None:
            merged.update(toml_io.read_flat(profile))
        merged.update(overrides)
        path = self.workdir / f"run-config-{len(list(self.workdir.glob('run-config-*.toml')))}.toml"
        return toml_io.write(path, merged)  # dotted keys stay single quoted keys, as flwr expects

    def runs(self) -> list[dict[str, Any]]:
        done = self.flwr("ls", CONNECTION, "--format", "json")
        if done.returncode != 0:
            raise FedTuneError(f"flwr ls failed: {done.stdout[-1000:]} {done.stderr[-1000:]}")
        return list(json.loads(done.stdout).get("runs", []))

    def run_info(self, run_id: int) -> dict[str, Any]:
        for run in self.runs():
            if int(run.get("run-id", -1)) == run_id:
                return run
        raise FedTuneError(f"run {run_id} not listed by the SuperLink")

    def wait_for_run(self, run_id: int, timeout: float, poll: float = 2.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.run_info(run_id)
            if str(info.get("status", "")).startswith("finished"):
                return info
            time.sleep(poll)
        raise FedTuneError(f"run {run_id} did not finish within {timeout:.0f}s")

    def run_dir(self, run_id: int) -> Path:
        return self.outputs / str(run_id)


def check_known_keys(app_dir: Path, config_file: Path) -> None:
    """One clear line for a run-config key the app does not declare (the SuperLink refuses the run)."""
    pyproject = Path(app_dir) / "pyproject.toml"
    if not pyproject.is_file():
        return
    app = toml_io.read(pyproject).get("tool", {}).get("flwr", {}).get("app", {})
    known = set(toml_io.flatten(app.get("config", {})))
    unknown = sorted(set(toml_io.read_flat(config_file)) - known)
    if unknown:
        raise FedTuneError(
            f"unknown run config key {unknown[0]!r}: not in [tool.flwr.app.config] of {pyproject}"
        )
