"""Two hosts: the SuperLink stack and a SuperNode stack as separate compose projects on separate
networks, joined only through the SuperLink's published TLS port, with SuperNode authentication on (the
default): the node host makes its key pair, the SuperLink host registers the public key, the node joins.
A SuperNode with a key nobody registered, and one holding another CA, are refused.

The SuperNode "host" uses the host network and reaches the SuperLink by its public name
superlink.example.org (mapped to 127.0.0.1 in that container's /etc/hosts), so the TLS handshake
checks the certificate's SAN for that name as on a real second machine, and every byte between the
two projects crosses the published port.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, Images, Project, free_port, run

pytestmark = pytest.mark.container

PUBLIC_NAME = "superlink.example.org"
LS_SCRIPT = """
set -e
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "local"
[superlink.local]
address = "127.0.0.1:9000"
root-certificates = "/certs/ca.crt"
TOML
flwr supernode ls local --format json
"""


def supernode_override(tmp: Path, name: str, clientapp_port: int) -> Path:
    path = tmp / f"{name}.override.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "services": {
                    "supernode": {
                        "network_mode": "host",
                        "extra_hosts": [f"{PUBLIC_NAME}:127.0.0.1"],
                        "environment": {"FEDTUNE_CLIENTAPP_PORT": str(clientapp_port)},
                    }
                }
            }
        )
    )
    return path


def online_nodes(link: Project) -> list[dict]:
    out = link.compose("exec", "-T", "superlink", "sh", "-c", LS_SCRIPT, timeout=120).stdout
    data = json.loads(out[out.index("{") :])
    nodes = data.get("nodes", [])
    return [n for n in nodes if str(n.get("status", "")).lower() == "online"]


def wait_for_nodes(link: Project, count: int, timeout: float = 120) -> list[dict]:
    deadline = time.monotonic() + timeout
    nodes: list[dict] = []
    while time.monotonic() < deadline:
        nodes = online_nodes(link)
        if len(nodes) >= count:
            return nodes
        time.sleep(3)
    raise AssertionError(f"expected {count} online SuperNodes, have {nodes}")


def public_status(port: int, ca: Path, method: str, path: str) -> int:
    """HTTP status of one request to the SuperLink host's published port, as a SuperNode host sends it."""
    context = ssl.create_default_context(cafile=str(ca))
    request = urllib.request.Request(
        f"https://127.0.0.1:{port}{path}", method=method, data=b"" if method == "POST" else None,
        headers={"content-type": "application/protobuf"},
    )
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def node_public_key(node: Project) -> str:
    """Run the node host's one-shot key job; its output ends with the public key line to register."""
    out = node.compose("run", "--rm", "keys", timeout=300).stdout
    lines = [line for line in out.splitlines() if line.startswith("ecdsa-sha2-nistp384 ")]
    assert lines, out[-2000:]
    return lines[-1] + "\n"


def test_authenticated_supernode_joins_over_published_tls_port_others_are_refused(
    images: Images, project_factory, tmp_path: Path
) -> None:
    port = free_port()
    # The SuperLink operator's folder of SuperNode public keys (read by the uid-10001 register job).
    public_keys = tmp_path / "public-keys"
    public_keys.mkdir()
    public_keys.chmod(0o755)
    link = project_factory(
        [REPO / "docker/compose.superlink.yaml"],
        {
            "FEDTUNE_EXTRA_SANS": PUBLIC_NAME,
            "FEDTUNE_SUPERLINK_BIND": "127.0.0.1",
            "FEDTUNE_SUPERLINK_PORT": str(port),
            "FEDTUNE_PUBLIC_KEYS": str(public_keys),
        },
    )
    link.compose("up", "-d", "superlink", timeout=300)
    link.wait_healthy("superlink")
    assert "SuperNode authentication is on" in link.logs("superlink")
    ca = tmp_path / "ca.crt"
    ca.write_text(link.compose("exec", "-T", "superlink", "cat", "/certs/ca.crt").stdout)
    assert "BEGIN CERTIFICATE" in ca.read_text()
    # The published port is the Fleet-only proxy: Control and Runtime APIs are refused from outside.
    assert public_status(port, ca, "GET", "/health") == 200
    for path in ("/v1/control/list-runs", "/v1/control/register-node", "/v1/runtime/acquire-task"):
        assert public_status(port, ca, "POST", path) == 403, path
    # The CA key never reaches the SuperLink container.
    files = link.compose("exec", "-T", "superlink", "ls", "/certs").stdout.split()
    assert sorted(files) == ["ca.crt", "server.key", "server.pem"]

    node_env = {
        "FEDTUNE_SUPERLINK": f"{PUBLIC_NAME}:{port}",
        "FEDTUNE_CA_FILE": str(ca),
        "FEDTUNE_PARTITION_ID": "0",
    }
    good = project_factory(
        [REPO / "docker/compose.supernode.yaml", supernode_override(tmp_path, "good", free_port())],
        node_env,
    )
    # Node host: make the key pair, send the public key; SuperLink host: register it.
    pub = node_public_key(good)
    assert node_public_key(good) == pub  # the key job keeps the pair it made
    (public_keys / "node-0.pub").write_text(pub)
    (public_keys / "node-0.pub").chmod(0o644)
    registered = link.compose("run", "--rm", "register", timeout=300).stdout
    assert "registered as node" in registered, registered[-2000:]
    again = link.compose("run", "--rm", "register", timeout=300).stdout
    assert "already registered" in again, again[-2000:]

    good.compose("up", "-d", timeout=300)
    good.wait_healthy("supernode")
    nodes = wait_for_nodes(link, 1)
    assert len(nodes) == 1, nodes
    # Separate projects, separate networks: nothing but the published port joins them.
    link_nets = set(
        json.loads(
            run(
                [
                    "docker",
                    "inspect",
                    "-f",
                    "{{json .NetworkSettings.Networks}}",
                    link.container("superlink"),
                ]
            ).stdout
        )
    )
    assert link_nets == {f"{link.name}_default"}

    refusing = {"FEDTUNE_MAX_RETRIES": "1", "FEDTUNE_RESTART": "no", "FEDTUNE_PARTITION_ID": "1"}
    # Right CA, but a key nobody registered (its own key job made it): the SuperLink refuses it.
    stranger = project_factory(
        [REPO / "docker/compose.supernode.yaml", supernode_override(tmp_path, "stranger", free_port())],
        {**node_env, **refusing},
    )
    stranger.compose("up", "-d", timeout=300)
    code = run(["docker", "wait", stranger.container("supernode")], timeout=240).stdout.strip()
    logs = stranger.logs("supernode")
    assert code != "0", logs[-3000:]
    # flwr logs its exit code 305 with "[code: 2004]" (unknown public key); the process exits 1.
    assert "2004" in logs, logs[-3000:]
    print(f"\nunregistered key: SuperNode exited {code}, '[code: 2004]' in its log")

    # A second federation's CA: the SuperLink's certificate does not chain to it.
    other = tmp_path / "other"
    subprocess.run(
        [
            str(REPO / ".venv/bin/python"),
            "-c",
            f"from fedtune.certs import generate; generate({str(other)!r}, ['{PUBLIC_NAME}'])",
        ],
        cwd=REPO,
        check=True,
        timeout=60,
    )
    bad = project_factory(
        [REPO / "docker/compose.supernode.yaml", supernode_override(tmp_path, "bad", free_port())],
        {**node_env, **refusing, "FEDTUNE_CA_FILE": str(other / "ca.crt")},
    )
    bad.compose("up", "-d", timeout=300)
    cid = bad.container("supernode")
    code = run(["docker", "wait", cid], timeout=240).stdout.strip()
    logs = bad.logs("supernode")
    assert code != "0", logs[-3000:]
    assert "CERTIFICATE_VERIFY_FAILED" in logs or "certificate verify failed" in logs.lower(), logs[
        -3000:
    ]
    # ... and the federation still has exactly the one registered node online.
    assert len(online_nodes(link)) == 1
