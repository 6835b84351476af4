"""Fixtures for the Kubernetes end-to-end test: a real cluster, fedtune's images in it, kubectl/helm.

Which cluster:
1. `shared/k8s/cluster` next to the clone (`<repo>/../shared/k8s`, as in CI): started here with its state
   under /tmp (FEDTUNE_K8S_STATE_DIR, default /tmp/fedtune-k8s-test), the images built by the container
   tests' helper and loaded with `cluster load-image`, and always stopped again (`cluster down`) at the end.
2. Otherwise the cluster $KUBECONFIG points at (your own): nothing is started or stopped, the images
   must already be pullable there (FEDTUNE_K8S_HELM_ARGS can add e.g. `--set global.imageRegistry=...`).
3. Otherwise the test skips and says why.
FEDTUNE_K8S_KEEP=1 leaves the shared cluster running (for iterating on the chart).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.containers.conftest import BASE_ENV, PREFIX, TAG, image_build_env
from tests.containers.conftest import run as host_run

REPO = Path(__file__).resolve().parents[2]
SHARED_CLUSTER = REPO.parent / "shared" / "k8s" / "cluster"
STATE_DIR = Path(os.environ.get("FEDTUNE_K8S_STATE_DIR", "/tmp/fedtune-k8s-test"))
IMAGES = (f"{PREFIX}/superlink:{TAG}", f"{PREFIX}/supernode:cpu")


def log(message: str) -> None:
    print(f"[k8s {time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class Cluster:
    """kubectl/helm against one cluster; `owned` when this session started it (and must stop it)."""

    env: dict[str, str]
    owned: bool
    state_dir: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def run(self, *cmd: str, check: bool = True, timeout: float = 300, stdin: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout,
                              input=stdin, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"{shlex.join(cmd)} -> {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done

    def kubectl(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run("kubectl", *args, **kwargs)

    def helm(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run("helm", *args, **kwargs)

    def json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json").stdout)


def _shared_cluster_env(state_dir: Path) -> dict[str, str]:
    out = subprocess.run([str(SHARED_CLUSTER), "env", str(state_dir)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    env = dict(os.environ)
    for line in out.splitlines():
        if not line.startswith("export "):
            continue
        key, _, value = line[len("export "):].partition("=")
        value = value.strip('"').replace('"$PATH"', env.get("PATH", "")).replace("$PATH", env.get("PATH", ""))
        env[key] = value.replace('"', "")
    return env


def _cluster_cmd(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SHARED_CLUSTER), *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def _cluster_up() -> subprocess.CompletedProcess[str]:
    """`cluster up`, once more if it fails. From a stopped STATE_DIR on a cold page cache its helper can
    SIGHUP dnsmasq before dnsmasq has installed its handler, so dnsmasq dies silently ("dnsmasq exited";
    reproduced here after `drop_caches`). `up` is idempotent and restarts only what died, so a second
    call is the documented recovery; any other failure fails twice and is reported."""
    up = _cluster_cmd("up", str(STATE_DIR), timeout=900)
    if up.returncode != 0:
        reason = next((line for line in up.stderr.splitlines() if "error:" in line), up.stderr[-200:])
        log(f"cluster up failed ({up.returncode}: {reason}); once more")
        up = _cluster_cmd("up", str(STATE_DIR), timeout=900)
    return up


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    if SHARED_CLUSTER.is_file():
        t0 = time.monotonic()
        log(f"cluster up {STATE_DIR} ({SHARED_CLUSTER})")
        up = _cluster_up()
        try:
            if up.returncode != 0:
                raise AssertionError(f"cluster up failed ({up.returncode}):\n{up.stderr[-4000:]}")
            env = _shared_cluster_env(STATE_DIR)
            handle = Cluster(env, owned=True, state_dir=STATE_DIR)
            handle.timings["cluster_up_s"] = time.monotonic() - t0
            log(f"cluster up in {handle.timings['cluster_up_s']:.0f} s")
            yield handle
        finally:
            if os.environ.get("FEDTUNE_K8S_KEEP") == "1":
                log(f"FEDTUNE_K8S_KEEP=1: cluster {STATE_DIR} left running")
            else:
                down = _cluster_cmd("down", str(STATE_DIR), timeout=300)
                log(f"cluster down: rc {down.returncode}")
                status = _cluster_cmd("status", str(STATE_DIR), timeout=60)
                # `status` exits 1 unless everything runs; after `down` nothing may run at all.
                leftover = [line for line in status.stdout.splitlines() if " running " in f"{line} "]
                assert down.returncode == 0 and not leftover, (down.stderr[-2000:], leftover)
        return
    kubeconfig = os.environ.get("KUBECONFIG")
    if kubeconfig and Path(kubeconfig).is_file():
        log(f"using the cluster of KUBECONFIG={kubeconfig} (nothing is started or stopped)")
        yield Cluster(dict(os.environ), owned=False)
        return
    reason = (f"no Kubernetes cluster: {SHARED_CLUSTER} is missing (CI has it at ../shared/k8s next to the "
              "clone) and $KUBECONFIG names no file")
    print(f"SKIP tests/k8s: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def k8s_images(cluster: Cluster) -> tuple[str, ...]:
    """fedtune/superlink and fedtune/supernode:cpu from the local base (as tests/containers), in the cluster."""
    if not cluster.owned:
        return IMAGES
    if host_run(["docker", "info"], check=False, timeout=60).returncode != 0:
        host_run(["bash", "scripts/install-docker.sh"], timeout=900)
    base = BASE_ENV["BASE_IMAGE"]
    if "FEDTUNE_TEST_BASE_IMAGE" not in os.environ:
        host_run(["bash", "scripts/build-base-image.sh"], timeout=900, env={"BASE_IMAGE_TAG": base})
    env = image_build_env(base)
    t0 = time.monotonic()
    if os.environ.get("FEDTUNE_K8S_SKIP_BUILD") != "1":
        log("building images (docker/build-images.sh; cached layers are reused)")
        host_run(["bash", "docker/build-images.sh"], env=env, timeout=2400)
    cluster.timings["image_build_s"] = time.monotonic() - t0
    # Loading 2 x 2 GB takes a minute: skip images the cluster already holds in this exact version.
    assert cluster.state_dir is not None
    marker = cluster.state_dir / "fedtune-images.json"
    ids = {image: host_run(["docker", "image", "inspect", "-f", "{{.Id}}", image]).stdout.strip() for image in IMAGES}
    loaded = json.loads(marker.read_text()) if marker.is_file() else {}
    present = set(cluster.run("ctr", "-a", cluster.env["CONTAINERD_ADDRESS"], "-n", "k8s.io", "images", "ls", "-q",
                              check=False).stdout.split())
    missing = [i for i in IMAGES if loaded.get(i) != ids[i] or f"docker.io/{i}" not in present]
    t0 = time.monotonic()
    if missing:
        log(f"cluster load-image {' '.join(missing)}")
        done = _cluster_cmd("load-image", str(cluster.state_dir), *missing, timeout=1800)
        assert done.returncode == 0, done.stderr[-3000:]
        marker.write_text(json.dumps(ids))
    cluster.timings["image_load_s"] = time.monotonic() - t0
    log(f"images ready (build {cluster.timings['image_build_s']:.0f} s, load {cluster.timings['image_load_s']:.0f} s)")
    return IMAGES
