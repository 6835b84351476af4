"""Separate hosts: the SuperLink in one network namespace, each SuperNode in its own, joined by veth pairs on
a bridge (10.213.0.0/24, only between our namespaces). SuperNodes reach the SuperLink by a DNS name that
their /etc/hosts (ip netns' /etc/netns/NS/hosts) maps to its address; TLS verifies that name against the
certificate's SANs, and a name or an address outside the SANs is refused. One node's link is shaped
with tc tbf. Everything is removed in a finally."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedtune.certs import certificate_sans, generate
from fedtune.federation import CONNECTION, LocalFederation, ManagedProcess
from fedtune.flwr_config import write_connection
from tests.conftest import REPO
from tests.host import sh
from tests.reliability.conftest import small_config
from tests.reliability.helpers import read_results, report, wait_until

pytestmark = pytest.mark.slow

PREFIX = "ftrel"
SUPERLINK_NS = f"{PREFIX}-sl"
NODE_NS = [f"{PREFIX}-n0", f"{PREFIX}-n1"]
SUPERLINK_IP = "10.213.0.1"
OTHER_IP = "10.213.0.2"  # also the SuperLink's, but not in the certificate
NODE_IPS = ["10.213.0.10", "10.213.0.11"]
NAME = "superlink.fedtune.test"
WRONG_NAME = "intruder.fedtune.test"  # maps to the same address, not in the SANs
SHAPED_RATE = "4mbit"


def _ip_netns_available() -> bool:
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return False
    return subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0


def setup_network() -> None:
    for ns in (SUPERLINK_NS, *NODE_NS):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # leftovers of a killed run
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        hosts = Path("/etc/netns") / ns / "hosts"
        hosts.parent.mkdir(parents=True, exist_ok=True)
        hosts.write_text(f"127.0.0.1 localhost\n{SUPERLINK_IP} {NAME}\n{SUPERLINK_IP} {WRONG_NAME}\n")
    sh("ip", "-n", SUPERLINK_NS, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", SUPERLINK_NS, "addr", "add", f"{SUPERLINK_IP}/24", "dev", "br0")
    sh("ip", "-n", SUPERLINK_NS, "addr", "add", f"{OTHER_IP}/24", "dev", "br0")
    sh("ip", "-n", SUPERLINK_NS, "link", "set", "br0", "up")
    for i, (ns, address) in enumerate(zip(NODE_NS, NODE_IPS, strict=True)):
        hub, node = f"{PREFIX}-h{i}", f"{PREFIX}-e{i}"
        sh("ip", "link", "add", hub, "netns", SUPERLINK_NS, "type", "veth", "peer", "name", node, "netns", ns)
        sh("ip", "-n", SUPERLINK_NS, "link", "set", hub, "master", "br0", "up")
        sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", node)
        sh("ip", "-n", ns, "link", "set", node, "up")


def shape(i: int) -> list[tuple[str, str]]:
    """tbf on both directions of node i's link: its uplink (in its namespace) and downlink (hub side)."""
    links = [(NODE_NS[i], f"{PREFIX}-e{i}"), (SUPERLINK_NS, f"{PREFIX}-h{i}")]
    for ns, dev in links:
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
           "rate", SHAPED_RATE, "burst", "32kbit", "latency", "400ms")
    return links


def qdisc_bytes(ns: str, dev: str) -> int:
    out = sh("ip", "netns", "exec", ns, "tc", "-s", "qdisc", "show", "dev", dev)
    assert "tbf" in out, out
    return int(re.search(r"Sent (\d+) bytes", out).group(1))


def teardown_network() -> None:
    for ns in (SUPERLINK_NS, *NODE_NS):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # takes its veth ends along
        shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


@dataclass
class NetnsFederation(LocalFederation):
    """LocalFederation whose processes run in network namespaces (the name of a process picks its one)."""

    netns: dict[str, str] = field(default_factory=dict)

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> ManagedProcess:
        log_path = self.workdir / "logs" / f"{name}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed by ManagedProcess.stop
        process = subprocess.Popen(
            ["ip", "netns", "exec", self.netns[name], sys.executable, "-m", *args],  # ip execs: same pid
            stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=self.workdir, start_new_session=True,
        )
        return ManagedProcess(name, process, log_path, log_file)

    @property
    def address(self) -> str:  # what SuperNodes and the flwr CLI dial: the DNS name
        return f"{NAME}:{self.port}"

    def start_superlink(self, extra_args: list[str] | None = None, timeout: float = 120.0) -> None:
        self.netns["superlink"] = SUPERLINK_NS
        self.superlink = self._spawn(
            "superlink",
            ["superlink", "--certs-dir", str(self.certs_dir),
             "--database", str(self.workdir / "state" / "superlink.db"),
             "--host", "0.0.0.0", "--port", str(self.port), "--internal-port", str(self.internal_port),
             "--health-port", "0",
             "--no-supernode-auth", *(extra_args or [])],
            self.env(),
        )
        # the operator's flwr runs on the SuperLink host (its namespace) against the SuperLink itself
        write_connection(self.flwr_home, CONNECTION, self.control_address, self.ca_cert)
        self.wait_healthy(timeout)

    def health(self) -> int | None:
        done = subprocess.run(
            ["ip", "netns", "exec", SUPERLINK_NS, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
             "--max-time", "3", "--cacert", str(self.ca_cert), f"https://{self.address}/health"],
            capture_output=True, text=True,
        )
        return int(done.stdout) if done.stdout.strip().isdigit() else None

    def flwr(self, *args: str, timeout: float = 180.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", SUPERLINK_NS, str(Path(sys.executable).with_name("flwr")), *args],
            capture_output=True, text=True, env=self.env(), timeout=timeout, cwd=self.workdir,
        )

    def node(self, i: int, name: str, superlink: str, extra: list[str] | None = None) -> ManagedProcess:
        self.netns[name] = NODE_NS[i]
        return self.start_supernode(i, 2, name=name, extra_args=["--superlink", superlink, *(extra or [])])


@pytest.mark.skipif(not _ip_netns_available(), reason="needs `ip netns` and tc (root)")
def test_separate_hosts_tls_names_and_a_shaped_link(tmp_path, tiny_model_dir):
    try:
        setup_network()
        certs = generate(tmp_path / "certs", [NAME, SUPERLINK_IP, "localhost", "127.0.0.1"])
        assert certificate_sans(certs.server_cert) == {NAME, SUPERLINK_IP, "localhost", "127.0.0.1"}
        fed = NetnsFederation(tmp_path / "fed", extra_env={"OMP_NUM_THREADS": "1"})
        shutil.copytree(certs.ca_cert.parent, fed.certs_dir, dirs_exist_ok=True)
        shaped = shape(1)
        try:
            fed.start_superlink()
            # negative cases first: a name and an address the certificate does not cover
            quick = ["--max-retries", "1", "--max-wait-time", "20"]
            refused = {
                "wrong name": fed.node(0, "by-wrong-name", f"{WRONG_NAME}:{fed.port}", quick),
                "address outside the SANs": fed.node(0, "by-other-ip", f"{OTHER_IP}:{fed.port}", quick),
            }
            for what, node in refused.items():
                wait_until(lambda node=node: not node.alive(), 180, f"the SuperNode dialling by {what} to fail")
                log = node.log_text()
                assert node.process.returncode != 0, what
                assert "CERTIFICATE_VERIFY_FAILED" in log or "certificate verify failed" in log, log[-2000:]
                assert "mismatch" in log.lower() or "not valid for" in log.lower(), log[-2000:]
            fed.node(0, "supernode-0", fed.address)
            fed.node(1, "supernode-1", f"{SUPERLINK_IP}:{fed.port}")  # by address: in the SANs too

            config = small_config(tiny_model_dir)
            started = time.monotonic()
            run_id = fed.submit(REPO, overrides=config)
            info = fed.wait_for_run(run_id, 900, poll=5)
            results = read_results(fed.run_dir(run_id))
            assert info["status"] == "finished:completed", results.get("error")
            assert all(len(r["replied"]) == 2 for r in results["rounds"])
            shaped_bytes = {f"{ns}/{dev}": qdisc_bytes(ns, dev) for ns, dev in shaped}
            per_node = results["budget_bytes"] // 2
            assert sum(shaped_bytes.values()) > per_node, shaped_bytes  # node 1's adapters crossed tbf
            report(
                "separate hosts (netns + veth)", superlink=f"{NAME} ({SUPERLINK_IP})",
                refused=list(refused), shaped=f"supernode-1 at {SHAPED_RATE}", tbf_bytes=shaped_bytes,
                seconds=round(time.monotonic() - started),
            )
        finally:
            fed.stop()
    finally:
        teardown_network()
