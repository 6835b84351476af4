"""The one-machine federation: `docker compose up` with images built from the local base, TLS on,
the demo job runs to `finished:completed`, the checkpoint is in the outputs volume and Prometheus
has scraped the SuperLink's budget metric."""

from __future__ import annotations

import json
import os
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, Images, free_port, run

pytestmark = pytest.mark.container

MONITORING_CONFIG = REPO / "monitoring/prometheus/prometheus.yml"
JOB_TIMEOUT = int(os.environ.get("FEDTUNE_TEST_JOB_TIMEOUT", "2400"))
# Fallback only while monitoring/ has not landed: scrape the SuperLink's exporter port.
FALLBACK_PROMETHEUS = {
    "global": {"scrape_interval": "5s", "evaluation_interval": "5s"},
    "scrape_configs": [
        {"job_name": "fedtune-superlink", "static_configs": [{"targets": ["superlink:9400"]}]}
    ],
}


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
    files: list[Path | str] = [REPO / "compose.yaml"]
    if not MONITORING_CONFIG.is_file():
        prom_dir = tmp_path / "prometheus"
        prom_dir.mkdir()
        (prom_dir / "prometheus.yml").write_text(yaml.safe_dump(FALLBACK_PROMETHEUS))
        prom_dir.chmod(0o755)
        override = tmp_path / "prometheus.override.yaml"
        override.write_text(
            yaml.safe_dump(
                {"services": {"prometheus": {"volumes": [f"{prom_dir}:/etc/prometheus:ro"]}}}
            )
        )
        files.append(override)
    stack = project_factory(
        files,
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
    if not budget and not MONITORING_CONFIG.is_file():
        # Everything above was checked; the exporter and its Prometheus config come with issue 3.
        pytest.xfail(f"metrics exporter not in this tree yet (monitoring/ absent); up={up}")
    assert budget, f"no fedtune_*budget* series in Prometheus (up={up})"
