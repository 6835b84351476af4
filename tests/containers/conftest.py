"""Fixtures for the container tests: a running dockerd, a local base image, fedtune's images.

Everything is built from a base made here with debootstrap (no registry is reachable): images are
built once per session and reused (layer cache) by later sessions on the same machine.
Environment knobs: FEDTUNE_TEST_BASE_IMAGE (skip debootstrap, use this base),
FEDTUNE_TEST_TORCH_WHEEL (the CPU torch wheel for the build context; default: pip's find-links),
FEDTUNE_TEST_EXTRA_CA (CA bundle pip must trust inside builds; default: the host's bundle).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedtune.runtime_env import FLWR_QUIET_ENV

REPO = Path(__file__).resolve().parents[2]
BASE_IMAGE = os.environ.get("FEDTUNE_TEST_BASE_IMAGE", "local/debian-py:bookworm")
PREFIX = "fedtune"
TAG = "0.1.0"
SUPERLINK_IMAGE = f"{PREFIX}/superlink:{TAG}"
SUPERNODE_IMAGE = f"{PREFIX}/supernode:cpu"
PROMETHEUS_IMAGE = "fedtune/prometheus-standin:test"

# Every process that runs flwr, and docker compose's own variables for the stack.
BASE_ENV = {
    **FLWR_QUIET_ENV,
    "BASE_IMAGE": BASE_IMAGE,
    "FEDTUNE_IMAGE_PREFIX": PREFIX,
    "FEDTUNE_TAG": TAG,
}


def run(
    cmd: list[str],
    *,
    check: bool = True,
    timeout: float = 600,
    env: dict | None = None,
    cwd: Path = REPO,
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **BASE_ENV, **(env or {})}
    proc = subprocess.run(
        cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} -> {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torch_wheel() -> str | None:
    explicit = os.environ.get("FEDTUNE_TEST_TORCH_WHEEL")
    if explicit:
        return explicit
    folders = [os.environ.get("PIP_FIND_LINKS", ""), "/opt/wheels"]
    try:
        out = subprocess.run(
            ["python3", "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=30
        ).stdout
        folders += [
            line.split("=", 1)[1].strip("'\" ") for line in out.splitlines() if "find-links" in line
        ]
    except (OSError, subprocess.SubprocessError):
        pass
    for folder in folders:
        for candidate in folder.split():
            hits = sorted(glob.glob(os.path.join(candidate, "torch-2.13.0+cpu-cp311-*.whl")))
            if hits:
                return hits[-1]
    return None


@pytest.fixture(scope="session")
def docker() -> None:
    """dockerd running and Compose v2 present (installs/starts them if needed)."""
    if (
        run(["docker", "info"], check=False, timeout=60).returncode != 0
        or run(["docker", "compose", "version"], check=False, timeout=60).returncode != 0
    ):
        run(["bash", "scripts/install-docker.sh"], timeout=900)


@pytest.fixture(scope="session")
def compose_cli(docker: None) -> None:
    """`docker compose` available (config checks need no images)."""


@pytest.fixture(scope="session")
def base_image(docker: None) -> str:
    if "FEDTUNE_TEST_BASE_IMAGE" not in os.environ:
        run(
            ["bash", "scripts/build-base-image.sh"], timeout=900, env={"BASE_IMAGE_TAG": BASE_IMAGE}
        )
    return BASE_IMAGE


@dataclass(frozen=True)
class Images:
    superlink: str
    supernode: str
    prometheus: str
    build_seconds: float


def image_build_env(base_image: str) -> dict[str, str]:
    """docker/build-images.sh's environment: the local base, our tags, the local CPU torch wheel and the
    host's CA bundle for pip inside the build (both when present)."""
    env = {"BASE_IMAGE": base_image, "IMAGE_PREFIX": PREFIX, "TAG": TAG}
    wheel = _torch_wheel()
    if wheel:
        env["TORCH_WHEEL"] = wheel
    extra_ca = os.environ.get("FEDTUNE_TEST_EXTRA_CA", "/etc/ssl/certs/ca-certificates.crt")
    if extra_ca and Path(extra_ca).is_file():
        env["EXTRA_CA"] = extra_ca
    return env


@pytest.fixture(scope="session")
def images(base_image: str) -> Images:
    """fedtune/superlink, fedtune/supernode:cpu and the Prometheus stand-in, from the local base."""
    env = image_build_env(base_image)
    t0 = time.monotonic()
    out = run(["bash", "docker/build-images.sh"], env=env, timeout=2400)
    print(out.stdout)
    run(
        [
            "docker",
            "build",
            "-q",
            "-t",
            PROMETHEUS_IMAGE,
            "--build-arg",
            f"BASE_IMAGE={base_image}",
            "docker/prometheus",
        ],
        timeout=900,
    )
    return Images(SUPERLINK_IMAGE, SUPERNODE_IMAGE, PROMETHEUS_IMAGE, time.monotonic() - t0)


class Project:
    """One `docker compose` project (own name, files and variables), torn down with its volumes."""

    def __init__(self, files: list[Path | str], env: dict[str, str], name: str | None = None):
        self.name = name or f"fedtune-test-{uuid.uuid4().hex[:8]}"
        self.files = [str(f) for f in files]
        self.env = {**env, "COMPOSE_PROJECT_NAME": self.name}

    def compose(
        self, *args: str, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        cmd = ["docker", "compose", "-p", self.name]
        for f in self.files:
            cmd += ["-f", f]
        return run([*cmd, *args], check=check, timeout=timeout, env=self.env)

    def container(self, service: str) -> str:
        out = self.compose("ps", "-a", "-q", service).stdout.split()
        assert out, f"no container for {service} in {self.name}"
        return out[0]

    def logs(self, *services: str) -> str:
        proc = self.compose(
            "logs", "--no-color", "--timestamps", *services, check=False, timeout=120
        )
        return proc.stdout + proc.stderr

    def health(self, service: str) -> str:
        cid = self.container(service)
        return run(
            [
                "docker",
                "inspect",
                "-f",
                "{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}",
                cid,
            ]
        ).stdout.strip()

    def wait_healthy(self, service: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        status = ""
        while time.monotonic() < deadline:
            status = self.health(service)
            if status == "healthy":
                return
            if status in {"exited", "dead"}:
                break
            time.sleep(2)
        raise AssertionError(
            f"{service} not healthy ({status}) in {timeout}s:\n{self.logs(service)[-6000:]}"
        )

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "-t", "20", check=False, timeout=300)


@pytest.fixture
def project_factory(tmp_path: Path) -> Iterator:
    made: list[Project] = []

    def make(
        files: list[Path | str], env: dict[str, str] | None = None, name: str | None = None
    ) -> Project:
        project = Project(files, env or {}, name)
        made.append(project)
        return project

    yield make
    for project in reversed(made):
        if os.environ.get("FEDTUNE_TEST_KEEP_STACK") != "1":
            project.down()


def which_or_skip(tool: str) -> str:
    path = shutil.which(tool)
    if not path:
        pytest.skip(f"{tool} not installed")
    return path
