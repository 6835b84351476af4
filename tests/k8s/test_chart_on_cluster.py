"""The Helm chart on a real Kubernetes cluster (issue 15): `helm install` runs a federated run to `completed`.

One release of `ci/small-cpu-values.yaml` (the laptop-size profile), two short runs on the embedded model:
1. install -> the control container registers both SuperNodes' keys and submits run 1 -> `completed`;
   the checkpoint and results.json are on the outputs volume; the PVCs are Bound; SuperNode auth is on
   with the keys minted in the cluster, and each SuperNode pod holds only its own key;
2. a real Prometheus scrapes the exporter's metrics Service: the budget equals results.json; the
   ServiceMonitor's target (resolved from the object, as the operator would) is scraped directly;
3. the exposure shape from pods that are not the SuperLink: `helm test --logs`, and from a SuperNode pod
   the proxy answers 403 to the Control/Runtime paths and the SuperLink pod's internal port is closed;
   the NetworkPolicies are accepted;
4. `helm upgrade` (new run tag, SuperNodes rolled): the keys are kept, the nodes rejoin with the same ids,
   nothing is registered twice; run 2 starts without a SuperLink restart, a SuperNode pod is deleted
   mid-run, the StatefulSet recreates it and run 2 still completes;
5. every Grafana dashboard panel's query returns series on that Prometheus; `helm uninstall` leaves no pod.
The cluster fixture stops the cluster afterwards (conftest.py). Durations are printed, not asserted.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.k8s.conftest import REPO, Cluster, log

# Setup (cluster, images, install) counts towards the first test's timeout: give the module room.
pytestmark = [pytest.mark.k8s, pytest.mark.timeout(2400)]

CHART = REPO / "helm" / "fedtune"
VALUES = CHART / "ci" / "small-cpu-values.yaml"
DASHBOARD = CHART / "dashboards" / "fedtune.json"
NS = "fedtune-e2e"
RELEASE = "e2e"
FULL = f"{RELEASE}-fedtune"
SUPERLINK = f"deploy/{FULL}-superlink"
NODES = f"{FULL}-supernode"
PODS = [f"{NODES}-0", f"{NODES}-1"]
# Short runs on the embedded SmolLM2-135M (unquantized: bitsandbytes' 4-bit kernels are slow on a CPU, and
# the deployment is what is tested here): one step per round, a numbered checkpoint every round.
LIGHT = "model.quantization=0 train.max-steps=1 train.seq-length=160 train.save-every-round=1"
RUN_1 = f"num-server-rounds=1 {LIGHT}"
RUN_2 = f"num-server-rounds=2 {LIGHT} train.seed=7"
RUN_TIMEOUT_S = 1200
# A line the SuperNode logs once it has a round's message in hand (its ClientApp is starting).
MID_ROUND_MARK = "clientapp"
# A minimal ServiceMonitor CRD (no operator runs here): lets the chart's ServiceMonitor be applied and read.
SERVICE_MONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "names": {"kind": "ServiceMonitor", "listKind": "ServiceMonitorList", "plural": "servicemonitors",
                  "singular": "servicemonitor"},
        "scope": "Namespaced",
        "versions": [{"name": "v1", "served": True, "storage": True,
                      "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}],
    },
}


class Release:
    """The installed release and what the steps learn about it."""

    def __init__(self, cluster: Cluster, workdir: Path) -> None:
        self.cluster = cluster
        self.workdir = workdir
        self.facts: dict[str, Any] = {}
        self.prometheus: Any = None

    # -- kubectl in the SuperLink pod ----------------------------------------------------------------
    def exec(self, target: str, container: str, *cmd: str, check: bool = True, timeout: float = 120):
        return self.cluster.kubectl("-n", NS, "exec", target, "-c", container, "--", *cmd,
                                    check=check, timeout=timeout)

    def flwr(self, *args: str, attempts: int = 4) -> dict[str, Any]:
        """`flwr ... --format json` in the control container; a busy node may time a call out: retry."""
        for attempt in range(attempts):
            try:
                done = self.exec(SUPERLINK, "control", "flwr", *args, "remote-deployment", "--format", "json",
                                 timeout=180)
                return json.loads(done.stdout)
            except (AssertionError, subprocess.TimeoutExpired, ValueError) as err:
                if attempt == attempts - 1:
                    raise
                log(f"flwr {' '.join(args)} failed ({type(err).__name__}); retrying")
                time.sleep(5)
        raise AssertionError("unreachable")

    def python(self, target: str, container: str, code: str, timeout: float = 120) -> Any:
        return json.loads(self.exec(target, container, "python3", "-c", code, timeout=timeout).stdout)

    def control_records(self) -> dict[str, list[dict[str, Any]]]:
        code = (
            "import json, pathlib\n"
            "root = pathlib.Path('/state/control')\n"
            "print(json.dumps({k: [json.loads(p.read_text()) for p in sorted((root / k).glob('*.json'))]"
            " for k in ('keys', 'runs')}))"
        )
        return self.python(SUPERLINK, "control", code)

    def run_status(self, run_id: int) -> dict[str, Any]:
        for run in self.flwr("ls").get("runs", []):
            if int(run.get("run-id", -1)) == run_id:
                return run
        return {}

    def wait_for_submission(self, tag: str, timeout: float = 600) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.control_records()["runs"]:
                if str(record.get("request", {}).get("tag", "")) == tag and "run_id" in record:
                    return int(record["run_id"])
                if record.get("error") and int(record.get("attempts", 0)) >= 3:  # control.py gives up after 3
                    raise AssertionError(f"the control container could not submit the run: {record}")
            time.sleep(3)
        raise AssertionError(f"no run submitted for tag {tag!r} in {timeout:.0f} s:\n{self.logs()}")

    def wait_for_run(self, run_id: int, timeout: float = RUN_TIMEOUT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            info = self.run_status(run_id)
            status = str(info.get("status", ""))
            if status != last:
                log(f"run {run_id}: {status}")
                last = status
            if status.startswith("finished"):
                return info
            time.sleep(5)
        raise AssertionError(f"run {run_id} not finished in {timeout:.0f} s (last {last}):\n{self.logs()}")

    def results(self, run_id: int) -> tuple[dict[str, Any], list[str]]:
        """results.json of the run and the files of its run folder, read on the SuperLink's outputs volume."""
        code = (
            "import json, os, pathlib\n"
            f"hits = [p for p in pathlib.Path('/outputs').rglob('results.json') if json.loads(p.read_text()).get('run_id') in ({run_id}, '{run_id}')]\n"
            "run = hits[0].parent\n"
            "print(json.dumps({'results': json.loads(hits[0].read_text()), 'dir': str(run),"
            # followlinks: latest/ may be a link to the newest checkpoint folder
            " 'files': sorted(os.path.relpath(os.path.join(d, f), run) for d, _, fs in os.walk(run, followlinks=True)"
            " for f in fs)}))"
        )
        payload = self.python(SUPERLINK, "superlink", code)
        return payload["results"], payload["files"]

    def nodes(self) -> dict[str, str]:
        """node id -> status, as the SuperLink lists them."""
        return {str(n["node-id"]): n["status"] for n in self.flwr("supernode", "ls").get("nodes", [])}

    def wait_nodes_online(self, count: int, timeout: float = 300) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        nodes: dict[str, str] = {}
        while time.monotonic() < deadline:
            nodes = self.nodes()
            if sum(s == "online" for s in nodes.values()) >= count:
                return nodes
            time.sleep(3)
        raise AssertionError(f"{count} SuperNodes not online in {timeout:.0f} s: {nodes}\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for args in ((SUPERLINK, "-c", "control"), (SUPERLINK, "-c", "superlink"), (f"pod/{PODS[0]}",),
                     (f"pod/{PODS[1]}",)):
            done = self.cluster.kubectl("-n", NS, "logs", "--tail=40", *args, check=False, timeout=60)
            parts.append(f"--- kubectl logs {' '.join(args)}\n{done.stdout}{done.stderr}")
        pods = self.cluster.kubectl("-n", NS, "get", "pods", "-o", "wide", check=False)
        events = self.cluster.kubectl("-n", NS, "get", "events", "--sort-by=.lastTimestamp", check=False)
        return "\n".join([*parts, pods.stdout, events.stdout[-3000:]])

    def secret(self, name: str) -> dict[str, bytes]:
        data = self.cluster.json("-n", NS, "get", "secret", name)["data"]
        return {k: base64.b64decode(v) for k, v in data.items()}


def _helm_args() -> list[str]:
    return shlex.split(os.environ.get("FEDTUNE_K8S_HELM_ARGS", ""))


@pytest.fixture(scope="module")
def release(cluster: Cluster, k8s_images, tmp_path_factory) -> Any:
    from tests.observability.helpers import need_tool

    need_tool("prometheus")
    handle = Release(cluster, tmp_path_factory.mktemp("k8s-e2e"))
    cluster.kubectl("apply", "-f", "-", stdin=json.dumps(SERVICE_MONITOR_CRD))
    cluster.kubectl("wait", "--for=condition=Established", "crd/servicemonitors.monitoring.coreos.com",
                    "--timeout=60s")
    existing = cluster.helm("status", RELEASE, "-n", NS, check=False).returncode == 0
    # FEDTUNE_K8S_REUSE=1 (with FEDTUNE_K8S_KEEP=1, when iterating): go on with a release a kept run left
    reuse = existing and os.environ.get("FEDTUNE_K8S_REUSE") == "1"
    if existing and not reuse:
        cluster.helm("uninstall", RELEASE, "-n", NS, "--wait", check=False, timeout=240)
    if not reuse:
        cluster.kubectl("delete", "namespace", NS, "--ignore-not-found", "--wait=true", "--timeout=180s",
                        timeout=240)
    t0 = time.monotonic()
    log(f"helm install {RELEASE} -f {VALUES.name} (run: {RUN_1})" + (" [reusing the kept release]" if reuse else ""))
    try:
        if not reuse:
            cluster.helm("install", RELEASE, str(CHART), "-n", NS, "--create-namespace", "-f", str(VALUES),
                         "--set", f"run.runConfig={RUN_1}", "--set", "run.tag=1",
                         "--set", "metrics.serviceMonitor.enabled=true",
                         "--wait", "--timeout", "10m", *_helm_args(), timeout=700)
        handle.facts["installed_s"] = time.monotonic() - t0
        log(f"installed and ready in {handle.facts['installed_s']:.0f} s")
        handle.facts["t_install"] = t0
        yield handle
    except AssertionError:
        print(handle.logs())
        raise
    finally:
        if handle.prometheus is not None:
            handle.prometheus.stop()
        if os.environ.get("FEDTUNE_K8S_KEEP") != "1":
            cluster.helm("uninstall", RELEASE, "-n", NS, "--wait", "--timeout", "3m", check=False, timeout=240)
            cluster.kubectl("delete", "namespace", NS, "--wait=true", "--timeout=120s", check=False, timeout=180)
            cluster.kubectl("delete", "crd", "servicemonitors.monitoring.coreos.com", check=False)
        timings = {**cluster.timings, **{k: v for k, v in handle.facts.items() if k.endswith("_s")}}
        log("durations: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))


# ------------------------------------------------------------------------------------------- 1. install


def test_install_runs_the_configured_run_to_completed(release):
    run_id = release.wait_for_submission("1")
    info = release.wait_for_run(run_id)
    release.facts["install_to_completed_s"] = time.monotonic() - release.facts["t_install"]
    log(f"helm install -> run {run_id} {info['status']} in {release.facts['install_to_completed_s']:.0f} s")
    results, files = release.results(run_id)
    release.facts["run1"] = (run_id, results)
    assert info["status"] == "finished:completed", (results.get("error"), release.logs())
    assert len(results["rounds"]) == 1
    assert results["budget_bytes"] > 0
    # the final global adapter, latest/ (resume point) and the numbered checkpoint of round 1
    for folder in ("adapter", "latest", "checkpoints/round-0001"):
        assert {f"{folder}/adapter_model.safetensors", f"{folder}/adapter_config.json"} <= set(files), files


def test_claims_are_bound_and_on_the_superlink(release):
    claims = release.cluster.json("-n", NS, "get", "pvc")["items"]
    phases = {c["metadata"]["name"]: c["status"]["phase"] for c in claims}
    assert phases == {f"{FULL}-superlink-state": "Bound", f"{FULL}-outputs": "Bound"}, phases
    pod = release.cluster.json("-n", NS, "get", "pods", "-l", "app.kubernetes.io/component=superlink")["items"][0]
    used = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert used == set(phases)


def test_supernode_auth_uses_the_keys_minted_in_the_cluster(release):
    records = release.control_records()
    keys = {r["name"]: r for r in records["keys"]}
    assert set(keys) == set(PODS), records
    minted = release.secret(f"{FULL}-supernode-auth")
    assert set(minted) == {*PODS, *(f"{p}.pub" for p in PODS)}
    nodes = release.nodes()
    assert {str(r["node_id"]) for r in keys.values()} == set(nodes), (keys, nodes)
    args = release.cluster.json("-n", NS, "get", SUPERLINK)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--enable-supernode-auth" in args
    # each SuperNode pod holds its own private key, and only it (issue 13, item 11)
    for pod in PODS:
        listed = release.exec(f"pod/{pod}", "supernode", "ls", "-A", "/auth").stdout.split()
        assert listed == [pod], (pod, listed)
        held = release.exec(f"pod/{pod}", "supernode", "cat", f"/auth/{pod}").stdout.encode()
        assert held.strip() == minted[pod].strip()
    release.facts["node_ids"] = set(nodes)
    release.facts["minted"] = minted


# ---------------------------------------------------------------------------------------- 2. metrics


def _metrics_service(release) -> tuple[str, int]:
    service = release.cluster.json("-n", NS, "get", "service", f"{FULL}-metrics")
    return service["spec"]["clusterIP"], int(service["spec"]["ports"][0]["port"])


def test_prometheus_scrapes_the_metrics_service_and_the_budget_matches(release):
    from tests.observability.helpers import Prometheus

    ip, port = _metrics_service(release)
    prom = Prometheus(release.workdir / "prometheus", [f"{ip}:{port}"]).start()
    release.prometheus = prom
    run_id, results = release.facts["run1"]
    sel = f'{{run_id="{run_id}"}}'
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not prom.query(f"fedtune_communication_budget_bytes{sel}"):
        time.sleep(2)
    assert prom.value(f'up{{instance="{ip}:{port}"}}') == 1
    assert prom.value(f"fedtune_communication_budget_bytes{sel}") == results["budget_bytes"]
    assert prom.value(f"fedtune_communication_budget_mb{sel}") == pytest.approx(results["budget_mb"], rel=1e-12)


def test_service_monitor_target_is_scraped_directly(release):
    import urllib.request

    monitor = release.cluster.json("-n", NS, "get", "servicemonitor", FULL)
    selector = monitor["spec"]["selector"]["matchLabels"]
    endpoint = monitor["spec"]["endpoints"][0]
    namespaces = monitor["spec"]["namespaceSelector"]["matchNames"]
    assert namespaces == [NS]
    labels = ",".join(f"{k}={v}" for k, v in selector.items())
    services = release.cluster.json("-n", NS, "get", "service", "-l", labels)["items"]
    assert [s["metadata"]["name"] for s in services] == [f"{FULL}-metrics"]
    # what the operator's generated config does: the Service's endpoints, the port named in the monitor
    endpoints = release.cluster.json("-n", NS, "get", "endpoints", f"{FULL}-metrics")
    targets = [
        f"{address['ip']}:{port['port']}"
        for subset in endpoints["subsets"] for address in subset["addresses"]
        for port in subset["ports"] if port["name"] == endpoint["port"]
    ]
    assert len(targets) == 1, endpoints
    with urllib.request.urlopen(f"http://{targets[0]}{endpoint['path']}", timeout=10) as response:
        text = response.read().decode()
    run_id, results = release.facts["run1"]
    line = next(ln for ln in text.splitlines()
                if ln.startswith("fedtune_communication_budget_bytes{") and f'run_id="{run_id}"' in ln)
    assert float(line.rsplit(" ", 1)[1]) == results["budget_bytes"]


# ---------------------------------------------------------------------------------------- 3. exposure


def test_helm_test_proves_the_exposure_shape(release):
    done = release.cluster.helm("test", RELEASE, "-n", NS, "--logs", "--timeout", "5m", check=False, timeout=360)
    assert done.returncode == 0, done.stdout + done.stderr
    checks = [json.loads(ln) for ln in done.stdout.splitlines() if ln.startswith('{"check"')]
    assert len(checks) == 6 and all(c["ok"] for c in checks), done.stdout
    assert {c["status"] for c in checks if "status" in c} == {200, 403}
    # kept for `helm test --logs` (hook-delete-policy before-hook-creation only)
    pod = release.cluster.json("-n", NS, "get", "pod", f"{FULL}-test-exposure")
    assert pod["status"]["phase"] == "Succeeded"


def test_a_supernode_pod_reaches_only_the_fleet_api(release):
    pod = release.cluster.json("-n", NS, "get", "pods", "-l", "app.kubernetes.io/component=superlink")["items"][0]
    ip = pod["status"]["podIP"]
    code = f"""
import json, socket, ssl, urllib.error, urllib.request
ctx = ssl.create_default_context(cafile="/certs/ca.crt")
def status(method, url):
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
svc = "https://{FULL}-superlink.{NS}.svc:8000"
out = {{p: status(m, svc + p) for m, p in (("GET", "/health"), ("POST", "/v1/runtime/acquire-task"),
                                           ("POST", "/v1/control/start-run"), ("POST", "/v1/control/register-node"),
                                           ("POST", "/v1/fleet/../control/start-run"))}}
def reach(port):
    try:
        socket.create_connection(("{ip}", port), timeout=5).close()
        return "open"
    except OSError as e:
        return type(e).__name__
out["pod:9000"] = reach(9000)
out["pod:8000"] = reach(8000)
print(json.dumps(out))
"""
    seen = release.python(f"pod/{PODS[0]}", "supernode", code)
    assert seen["/health"] == 200, seen
    for path in ("/v1/runtime/acquire-task", "/v1/control/start-run", "/v1/control/register-node",
                 "/v1/fleet/../control/start-run"):
        assert seen[path] in (403, 404) and seen[path] != 200, seen
    assert seen["/v1/runtime/acquire-task"] == seen["/v1/control/start-run"] == 403
    assert seen["pod:8000"] == "open" and seen["pod:9000"] != "open", seen  # 9000 is the pod's loopback only


def test_network_policies_are_accepted(release):
    policies = release.cluster.json("-n", NS, "get", "networkpolicy")["items"]
    by_name = {p["metadata"]["name"]: p for p in policies}
    assert set(by_name) == {f"{FULL}-superlink", f"{FULL}-supernode"}
    ports = {port["port"] for rule in by_name[f"{FULL}-superlink"]["spec"]["ingress"] for port in rule["ports"]}
    assert ports == {"https", "metrics", "health"}


# ------------------------------------------------------------------------------ 4. upgrade, pod kill


def test_upgrade_keeps_keys_and_node_ids_and_a_killed_supernode_rejoins_mid_run(release):
    cluster = release.cluster
    superlink_uid = cluster.json("-n", NS, "get", "pods", "-l", "app.kubernetes.io/component=superlink")["items"][0][
        "metadata"]["uid"]
    t0 = time.monotonic()
    log(f"helm upgrade (run: {RUN_2}, SuperNodes rolled)")
    cluster.helm("upgrade", RELEASE, str(CHART), "-n", NS, "--reuse-values",
                 "--set", f"run.runConfig={RUN_2}", "--set", "run.tag=2",
                 "--set-string", f"supernodes.podAnnotations.fedtune-e2e/rolled={int(time.time())}",
                 "--wait", "--timeout", "10m", *_helm_args(), timeout=700)
    release.facts["upgrade_s"] = time.monotonic() - t0
    # keys kept: the Secret holds the very same keys; nothing was registered twice
    assert release.secret(f"{FULL}-supernode-auth") == release.facts["minted"]
    records = release.control_records()
    assert sorted(r["name"] for r in records["keys"]) == PODS
    # the SuperLink was not restarted by the upgrade (the run request reaches it through the ConfigMap)
    pods = cluster.json("-n", NS, "get", "pods", "-l", "app.kubernetes.io/component=superlink")["items"]
    assert [p["metadata"]["uid"] for p in pods] == [superlink_uid]
    # the rolled SuperNodes rejoin under the same node ids (ids are bound to their keys)
    nodes = release.wait_nodes_online(2)
    online = {n for n, s in nodes.items() if s == "online"}
    assert online == release.facts["node_ids"], (nodes, release.facts["node_ids"])

    run_id = release.wait_for_submission("2", timeout=300)  # the kubelet refreshes the ConfigMap (~1 min)
    log(f"run {run_id} submitted {time.monotonic() - t0:.0f} s after the upgrade")
    # wait until the first round is out to the nodes, then delete a SuperNode pod
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = str(release.run_status(run_id).get("status", ""))
        assert not status.startswith("finished"), f"run {run_id} finished before the pod kill: {status}"
        train_log = cluster.kubectl("-n", NS, "logs", f"pod/{PODS[1]}", "--since=3m", check=False).stdout
        if status == "running" and MID_ROUND_MARK in train_log:
            break
        time.sleep(3)
    old = cluster.json("-n", NS, "get", "pod", PODS[1])["metadata"]["uid"]
    log(f"deleting pod {PODS[1]} mid-run")
    cluster.kubectl("-n", NS, "delete", "pod", PODS[1], "--wait=false")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with contextlib.suppress(AssertionError):
            pod = cluster.json("-n", NS, "get", "pod", PODS[1])
            ready = any(c.get("ready") for c in pod["status"].get("containerStatuses", []))
            if pod["metadata"]["uid"] != old and ready:
                break
        time.sleep(2)
    else:
        raise AssertionError(f"the StatefulSet did not recreate {PODS[1]}:\n{release.logs()}")
    info = release.wait_for_run(run_id)
    results, _ = release.results(run_id)
    assert info["status"] == "finished:completed", (results.get("error"), release.logs())
    assert len(results["rounds"]) == 2
    nodes = release.wait_nodes_online(2)
    assert {n for n, s in nodes.items() if s == "online"} == release.facts["node_ids"]
    release.facts["run2"] = (run_id, results)
    superlink_log = cluster.kubectl("-n", NS, "logs", SUPERLINK, "-c", "superlink", check=False).stdout
    assert "already in use" not in superlink_log.lower()


# ------------------------------------------------------------------------------- 5. dashboard, uninstall


def _dashboard_exprs() -> list[tuple[str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    flat = []
    for panel in panels:
        flat.append(panel)
        flat.extend(panel.get("panels", []))
    return [(p["title"], t["expr"]) for p in flat if p.get("type") != "row" for t in p.get("targets", [])]


def test_every_dashboard_panel_returns_series(release):
    from tests.observability.helpers import concrete

    prom = release.prometheus
    assert prom is not None, "the Prometheus step did not run"
    run_id, _ = release.facts["run2"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not prom.query(f'fedtune_communication_budget_bytes{{run_id="{run_id}"}}'):
        time.sleep(2)
    time.sleep(5)  # a few more scrapes, so rate() windows hold two samples
    exprs = _dashboard_exprs()
    assert exprs
    empty = [(title, expr) for title, expr in exprs if not prom.query(concrete(expr))]
    assert not empty, empty


def test_uninstall_leaves_no_pod(release):
    cluster = release.cluster
    cluster.helm("uninstall", RELEASE, "-n", NS, "--wait", "--timeout", "3m", timeout=240)
    # Helm never deletes hook objects on uninstall: the last `helm test` pod (kept for `helm test --logs`)
    # stays, finished, until deleted; nothing else may be left, let alone running.
    test_pod = f"{FULL}-test-exposure"
    deadline = time.monotonic() + 120
    pods: dict[str, str] = {}
    while time.monotonic() < deadline:
        pods = {p["metadata"]["name"]: p["status"]["phase"] for p in cluster.json("-n", NS, "get", "pods")["items"]}
        if set(pods) <= {test_pod}:
            break
        time.sleep(2)
    assert pods in ({}, {test_pod: "Succeeded"}), pods
    cluster.kubectl("-n", NS, "delete", "pod", test_pod, "--ignore-not-found", "--wait=true")
    assert cluster.json("-n", NS, "get", "pods")["items"] == []
