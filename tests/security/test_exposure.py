"""Issue 13, items 1+2: from a SuperNode host only the Fleet API and /health reach the SuperLink.

The SuperLink host is this (root) network namespace; the SuperNode host is a namespace we create, joined
by one veth pair (10.214.0.1 here, 10.214.0.2 there; only addresses we create). `fedtune-superlink`
binds Flower's SuperLink to 127.0.0.1:<internal port> and its nginx proxy to 10.214.0.1:<port>. From the
node host we perform the attacks of the issue and watch them fail, then show the legitimate paths still
work: a registered SuperNode in that namespace joins and trains, and the operator's `flwr run` on the
SuperLink host completes the run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedtune.federation import CONNECTION, LocalFederation, ManagedProcess
from fedtune.flwr_config import write_connection
from tests.conftest import REPO, tiny_run_config
from tests.host import sh

pytestmark = pytest.mark.slow

NODE_NS = "ftsec-node"
HOST_DEV, NODE_DEV = "ftsec-h", "ftsec-n"
SUPERLINK_IP, NODE_IP = "10.214.0.1", "10.214.0.2"
PROTOBUF = "application/protobuf"


def _netns_available() -> bool:
    if shutil.which("ip") is None or shutil.which("curl") is None:
        return False
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists():
        return False
    return subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0


def setup_network() -> None:
    teardown_network()  # leftovers of a killed run
    sh("ip", "netns", "add", NODE_NS)
    sh("ip", "-n", NODE_NS, "link", "set", "lo", "up")
    sh("ip", "link", "add", HOST_DEV, "type", "veth", "peer", "name", NODE_DEV, "netns", NODE_NS)
    sh("ip", "addr", "add", f"{SUPERLINK_IP}/24", "dev", HOST_DEV)
    sh("ip", "link", "set", HOST_DEV, "up")
    sh("ip", "-n", NODE_NS, "addr", "add", f"{NODE_IP}/24", "dev", NODE_DEV)
    sh("ip", "-n", NODE_NS, "link", "set", NODE_DEV, "up")


def teardown_network() -> None:
    subprocess.run(["ip", "netns", "del", NODE_NS], capture_output=True)  # takes the veth pair along
    subprocess.run(["ip", "link", "del", HOST_DEV], capture_output=True)


def on_node_host(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", NODE_NS, *cmd], capture_output=True, text=True, timeout=timeout
    )


@dataclass
class NodeHostFederation(LocalFederation):
    """SuperLink (and operator) on this host; SuperNodes in the node-host namespace."""

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> ManagedProcess:
        if not name.startswith("supernode"):
            return super()._spawn(name, args, env)
        log_path = self.workdir / "logs" / f"{name}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed by ManagedProcess.stop
        process = subprocess.Popen(
            ["ip", "netns", "exec", NODE_NS, sys.executable, "-m", *args],  # ip execs: same pid
            stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=self.workdir, start_new_session=True,
        )
        return ManagedProcess(name, process, log_path, log_file)


def curl_status(fed: LocalFederation, method: str, url: str, *extra: str, node_host: bool = True) -> str:
    """HTTP status of one request (verified TLS), "000" when no connection could be made."""
    cmd = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
           "--cacert", str(fed.ca_cert), "-X", method, "-H", f"content-type: {PROTOBUF}", *extra, url]
    done = on_node_host(*cmd) if node_host else subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    return done.stdout.strip()


POLLER = textwrap.dedent(
    """
    # The issue's hijack: poll the Runtime API's acquire-task every 50 ms while a run is in progress.
    import collections, json, os, ssl, sys, time, urllib.error, urllib.request
    url, ca, stop, out = sys.argv[1:5]
    ctx = ssl.create_default_context(cafile=ca)
    codes = collections.Counter()
    while not os.path.exists(stop):
        request = urllib.request.Request(url, data=b"", method="POST",
                                         headers={"content-type": "application/protobuf"})
        try:
            with urllib.request.urlopen(request, context=ctx, timeout=5) as response:
                codes[str(response.status)] += 1
                codes["bytes"] += len(response.read())
        except urllib.error.HTTPError as err:
            codes[str(err.code)] += 1
        except OSError as err:
            codes[type(err).__name__] += 1
        time.sleep(0.05)
    open(out, "w").write(json.dumps(codes))
    """
)


@pytest.mark.skipif(not _netns_available(), reason="needs `ip netns`, curl and nginx (root)")
def test_node_host_reaches_only_the_fleet_api(tmp_path, tiny_model_dir):
    try:
        setup_network()
        fed = NodeHostFederation(
            tmp_path / "fed", host=SUPERLINK_IP, supernode_auth=True, extra_env={"OMP_NUM_THREADS": "1"}
        )
        try:
            fed.start_superlink()
            public = f"https://{fed.address}"
            control = f"https://{fed.control_address}"

            # -- the legitimate Fleet path and /health pass the proxy ------------------------------------
            assert curl_status(fed, "GET", f"{public}/health") == "200"
            # a Fleet call reaches Flower (which rejects the empty body itself: not the proxy's 403)
            assert curl_status(fed, "POST", f"{public}/v1/fleet/get-run") not in ("403", "000")

            # -- attacks from the node host: every one refused by the proxy ----------------------------
            attacks = {
                "runtime acquire-task": ("POST", "/v1/runtime/acquire-task"),
                "control start-run": ("POST", "/v1/control/start-run"),
                "control register-node": ("POST", "/v1/control/register-node"),
                "control list-runs": ("POST", "/v1/control/list-runs"),
                "control stream-logs": ("POST", "/v1/control/stream-logs"),
                "traversal ..": ("POST", "/v1/fleet/../runtime/acquire-task"),
                "traversal %2e%2e": ("POST", "/v1/fleet/%2e%2e/runtime/acquire-task"),
                "traversal ..%2f": ("POST", "/v1/fleet/..%2fcontrol/list-runs"),
                "encoded fleet path": ("POST", "/v1/%66leet/get-run"),
                "query string": ("POST", "/v1/fleet/get-run?x=/v1/control/list-runs"),
                "GET on fleet": ("GET", "/v1/fleet/get-run"),
                "POST on health": ("POST", "/health"),
                "docs": ("GET", "/docs"),
            }
            refused = {what: curl_status(fed, m, f"{public}{p}", "--path-as-is") for what, (m, p) in attacks.items()}
            assert refused == dict.fromkeys(attacks, "403"), refused
            # the same acquire-task, sent on the SuperLink host to the SuperLink itself, is served: the
            # request is one Flower answers, so only the exposure shape stops it
            assert curl_status(fed, "POST", f"{control}/v1/runtime/acquire-task", node_host=False) == "200"
            # the SuperLink's own port is not reachable from the node host at all
            direct = f"https://{SUPERLINK_IP}:{fed.internal_port}/v1/runtime/acquire-task"
            assert curl_status(fed, "POST", direct) == "000"

            # the real flwr CLI from the node host, aimed at the public port: Control API refused
            intruder_home = tmp_path / "intruder-flwr"
            write_connection(intruder_home, "intruder", fed.address, fed.ca_cert)
            key = fed.node_key("intruder", register=False).with_suffix(".pub")
            env_cmd = ["env", f"FLWR_HOME={intruder_home}", "FLWR_TELEMETRY_ENABLED=0", "FLWR_DISABLE_UPDATE_CHECK=1"]
            flwr = str(Path(sys.executable).with_name("flwr"))
            listed = on_node_host(*env_cmd, flwr, "ls", "intruder", "--format", "json", timeout=120)
            registered = on_node_host(
                *env_cmd, flwr, "supernode", "register", str(key), "intruder", "--format", "json", timeout=120
            )
            for done in (listed, registered):
                assert '"success": false' in done.stdout or done.returncode != 0, done.stdout
                assert "403" in done.stdout + done.stderr, done.stdout + done.stderr
            nodes = json.loads(fed.flwr("supernode", "ls", CONNECTION, "--format", "json").stdout)
            assert not nodes.get("nodes"), nodes  # the intruder's key did not get in

            # -- a registered SuperNode on the node host joins and trains; the operator runs `flwr run` --
            stop, counts = tmp_path / "stop-poller", tmp_path / "poller.json"
            poller = subprocess.Popen(
                ["ip", "netns", "exec", NODE_NS, sys.executable, "-c", POLLER,
                 f"{public}/v1/runtime/acquire-task", str(fed.ca_cert), str(stop), str(counts)]
            )
            try:
                fed.start_supernode(0, 2)
                config = tiny_run_config(
                    tiny_model_dir,
                    **{"num-server-rounds": 1, "train.max-steps": 2, "strategy.min-train-nodes": 1,
                       "strategy.min-available-nodes": 1, "strategy.round-timeout": 600},
                )
                started = time.monotonic()
                run_id = fed.submit(REPO, overrides=config)  # `flwr run <app> fedtune-local` on this host
                info = fed.wait_for_run(run_id, 900, poll=3)
            finally:
                stop.touch()
                poller.wait(timeout=30)
            results = json.loads((fed.run_dir(run_id) / "results.json").read_text())
            assert info["status"] == "finished:completed", results.get("error")
            assert len(results["rounds"][0]["replied"]) == 1
            polled = json.loads(counts.read_text())
            # every acquire-task of the hijack attempt was refused; none got the ServerApp's task
            assert set(polled) == {"403"} and polled["403"] > 20, polled
            denied = [json.loads(line) for line in fed.superlink.log_text().splitlines() if '"proxy-denied"' in line]
            assert any(d["remote"] == NODE_IP and d["uri"] == "/v1/runtime/acquire-task" for d in denied)
            print(
                f"exposure: {len(attacks)} attack paths 403, hijack poller {polled}, node joined and trained, "
                f"run {run_id} completed in {time.monotonic() - started:.0f}s"
            )
        finally:
            fed.stop()
    finally:
        teardown_network()
