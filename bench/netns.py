"""Separate hosts on one machine, for tests/reliability/test_netns.py and bench/tbf_transfer.py: the SuperLink
in one network namespace, each SuperNode in its own, joined by veth pairs on a bridge (10.213.0.0/24, only
between our namespaces); SuperNodes reach the SuperLink by a DNS name their /etc/hosts (ip netns'
/etc/netns/NS/hosts) maps to its address, and one node's link can be shaped with tc tbf. Needs root."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fedtune.federation import CONNECTION, LocalFederation, ManagedProcess
from fedtune.flwr_config import write_connection

PREFIX = "ftrel"
SUPERLINK_NS = f"{PREFIX}-sl"
NODE_NS = [f"{PREFIX}-n0", f"{PREFIX}-n1"]
SUPERLINK_IP = "10.213.0.1"
OTHER_IP = "10.213.0.2"  # also the SuperLink's, but not in the certificate
NODE_IPS = ["10.213.0.10", "10.213.0.11"]
NAME = "superlink.fedtune.test"
WRONG_NAME = "intruder.fedtune.test"  # maps to the same address, not in the SANs


def available() -> bool:
    """`ip netns` and tc usable here (root)."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return False
    return subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0


def setup_network() -> None:
    for ns in (SUPERLINK_NS, *NODE_NS):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # leftovers of a killed run
        _sh("ip", "netns", "add", ns)
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        hosts = Path("/etc/netns") / ns / "hosts"
        hosts.parent.mkdir(parents=True, exist_ok=True)
        hosts.write_text(f"127.0.0.1 localhost\n{SUPERLINK_IP} {NAME}\n{SUPERLINK_IP} {WRONG_NAME}\n")
    _sh("ip", "-n", SUPERLINK_NS, "link", "add", "br0", "type", "bridge")
    _sh("ip", "-n", SUPERLINK_NS, "addr", "add", f"{SUPERLINK_IP}/24", "dev", "br0")
    _sh("ip", "-n", SUPERLINK_NS, "addr", "add", f"{OTHER_IP}/24", "dev", "br0")
    _sh("ip", "-n", SUPERLINK_NS, "link", "set", "br0", "up")
    for i, (ns, address) in enumerate(zip(NODE_NS, NODE_IPS, strict=True)):
        hub, node = f"{PREFIX}-h{i}", f"{PREFIX}-e{i}"
        _sh("ip", "link", "add", hub, "netns", SUPERLINK_NS, "type", "veth", "peer", "name", node,
            "netns", ns)
        _sh("ip", "-n", SUPERLINK_NS, "link", "set", hub, "master", "br0", "up")
        _sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", node)
        _sh("ip", "-n", ns, "link", "set", node, "up")


def shape(i: int, rate: str) -> list[tuple[str, str]]:
    """tbf at `rate` (tc's unit, e.g. 4mbit) on both directions of node i's link: its uplink (in its
    namespace) and downlink (hub side)."""
    links = [(NODE_NS[i], f"{PREFIX}-e{i}"), (SUPERLINK_NS, f"{PREFIX}-h{i}")]
    for ns, dev in links:
        _sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
           "rate", rate, "burst", "32kbit", "latency", "400ms")
    return links


def qdisc_bytes(ns: str, dev: str) -> int:
    """Bytes the tbf qdisc on `dev` in namespace `ns` has sent."""
    out = _sh("ip", "netns", "exec", ns, "tc", "-s", "qdisc", "show", "dev", dev)
    sent = re.search(r"Sent (\d+) bytes", out)
    if "tbf" not in out or sent is None:
        raise RuntimeError(f"no tbf qdisc on {ns}/{dev}: {out.strip()}")
    return int(sent.group(1))


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


def _sh(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done.stdout
