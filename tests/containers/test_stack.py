"""The one-machine federation: `docker compose up` with images built from the local base, TLS and
SuperNode authentication on (per-node key jobs, `register` before the SuperNodes), the demo job runs to
`finished:completed` (from the SuperLink's network namespace: the published port is the Fleet-only proxy),
the operator's `flwr` service lists it, the checkpoint is in the outputs volume and Prometheus (with
monitoring/prometheus/ as compose mounts it) has scraped the SuperLink exporter's budget metric."""

from __future__ import annotations

import json
import os
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from .conftest import REPO, Images, free_port, run

pytestmark = pytest.mark.container

JOB_TIMEOUT = int(os.environ.get("FEDTUNE_TEST_JOB_TIMEOUT", "2400"))


def prometheus_query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        payload = json.load(resp)
    assert payload["status"] == "success", payload
    return payload["data"]["result"]


def test_compose_up_runs_the_demo_to_completion(
    images: Images, project_factory, tmp_path: Path
) -> None:
    superlink_port, prometheus_port = free_port(), free_port()
    stack = project_factory(
        [REPO / "compose.yaml"],
        {
            "PROMETHEUS_IMAGE": images.prometheus,
            "FEDTUNE_SUPERLINK_PORT": str(superlink_port),
            "PROMETHEUS_PORT": str(prometheus_port),
        },
    )
    t0 = time.monotonic()
    # Returns once the job has started: compose waits for the SuperLink and both SuperNodes healthy.
    stack.compose("up", "-d", timeout=600)
    healthy_after = time.monotonic() - t0
    for service in ("superlink", "supernode-0", "supernode-1"):
        assert stack.health(service) == "healthy", service
    job = stack.container("job")
    code = run(["docker", "wait", job], timeout=JOB_TIMEOUT).stdout.strip()
    finished_after = time.monotonic() - t0
    job_log = stack.logs("job")
    print(
        f"\ncompose up -> services healthy {healthy_after:.0f} s, "
        f"-> demo run finished {finished_after:.0f} s "
        f"(image builds took {images.build_seconds:.0f} s)"
    )
    assert code == "0", (
        job_log[-6000:] + stack.logs("superlink", "supernode-0", "supernode-1")[-8000:]
    )
    assert "finished:completed" in job_log

    # The operator's flwr shares the SuperLink's network namespace (127.0.0.1:9000, its own port); the
    # published port is the Fleet-only proxy. Containers run with a read-only root.
    listed = stack.compose("run", "--rm", "flwr", "ls", "remote-deployment", "--format", "json", timeout=300)
    assert "finished:completed" in listed.stdout, listed.stdout[-2000:] + listed.stderr[-2000:]
    wrote = stack.compose("exec", "-T", "superlink", "touch", "/opt/venv/intruder", check=False)
    assert wrote.returncode != 0 and "Read-only file system" in wrote.stdout + wrote.stderr

    # SuperNode authentication: on, both keys registered before the SuperNodes started, and each
    # SuperNode holds its own key pair only.
    assert "SuperNode authentication is on" in stack.logs("superlink")
    register_log = stack.logs("register")
    assert register_log.count("registered as node") == 2, register_log[-3000:]
    for n in ("0", "1"):
        keys = stack.compose("exec", "-T", f"supernode-{n}", "ls", "/keys").stdout.split()
        assert sorted(keys) == [f"supernode-{n}", f"supernode-{n}.pub"], keys

    # Checkpoint and results in the outputs volume (written by the ServerApp in the SuperLink).
    found = stack.compose(
        "exec", "-T", "superlink", "find", "/outputs", "-name", "adapter_model.safetensors"
    ).stdout.split()
    assert found, stack.compose("exec", "-T", "superlink", "find", "/outputs").stdout
    results = stack.compose(
        "exec", "-T", "superlink", "sh", "-c", "cat /outputs/*/results.json"
    ).stdout
    assert '"completed"' in results, results[:2000]

    # Prometheus scraped the SuperLink's exporter, budget metric included.
    deadline = time.monotonic() + 90
    up: list[dict] = []
    budget: list[dict] = []
    while time.monotonic() < deadline:
        up = prometheus_query(prometheus_port, 'up{instance=~"superlink:9400"}')
        budget = prometheus_query(prometheus_port, '{__name__=~"fedtune_.*budget.*"}')
        if budget:
            break
        time.sleep(5)
    assert up, "Prometheus has no scrape target superlink:9400"
    assert budget, f"no fedtune_*budget* series in Prometheus (up={up})"
    names = sorted({s["metric"]["__name__"] for s in budget})
    print(f"Prometheus: up={[s['value'][1] for s in up]}, budget series: {names}")
