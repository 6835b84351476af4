"""The images carry every entry point the compose files and the README name, and run unprivileged."""

from __future__ import annotations

import pytest

from .conftest import Images, run

pytestmark = pytest.mark.container

TOOLS = [
    "fedtune-superlink",
    "fedtune-supernode",
    "fedtune-certs",
    "fedtune-keys",
    "fedtune-k8s-keys",
    "fedtune-exporter",
    "fedtune-healthcheck",
    "fedtune-certs-job",
    "fedtune-keys-job",
    "fedtune-register-job",
    "fedtune-flwr-job",
    "flwr",
    "flower-superlink",
    "flower-supernode",
]


@pytest.mark.parametrize("role", ["superlink", "supernode"])
def test_image_has_the_tools_and_key_folders(images: Images, role: str) -> None:
    image = images.superlink if role == "superlink" else images.supernode
    script = (
        f"set -e; for t in {' '.join(TOOLS)}; do "
        'command -v "$t" >/dev/null || { echo "missing $t"; exit 1; }; done; '
        "id -u; stat -c '%u %a %n' /keys /pubkeys; "
        # the key job makes an ECDSA P-384 pair in /keys and reuses it on a second run
        "FEDTUNE_KEY_NAME=probe fedtune-keys-job; FEDTUNE_KEY_NAME=probe fedtune-keys-job; "
        "stat -c '%a %n' /keys/probe"
    )
    out = run(["docker", "run", "--rm", "--entrypoint", "sh", image, "-c", script], timeout=180).stdout
    lines = out.splitlines()
    assert lines[0] == "10001", out
    assert "10001 700 /keys" in lines and "10001 755 /pubkeys" in lines, out
    assert "keys-job: reusing /keys/probe" in out, out
    assert sum(line.startswith("ecdsa-sha2-nistp384 ") for line in lines) == 2, out
    assert lines[-1] == "600 /keys/probe", out


def test_superlink_image_runs_the_fleet_proxy_read_only_and_unprivileged(images: Images) -> None:
    """nginx is in the image and accepts the config fedtune-superlink renders, as uid 10001 with a
    read-only root, no capabilities and only /tmp writable (how compose and the chart run it)."""
    script = (
        "set -e; fedtune-certs --out /tmp/c >/dev/null; "
        "python -c 'from pathlib import Path; from superlink import proxy; "
        "from superlink.launch import build_parser, proxy_config; "
        "args = build_parser().parse_args([\"--certs-dir\", \"/tmp/c\"]); "
        "proxy.check(proxy.find_nginx(), proxy.write(proxy_config(args, Path(\"/tmp/fedtune-proxy\")))); "
        "print(\"nginx config ok\")'; "
        "fedtune-superlink --certs-dir /tmp/c --print-proxy-config | grep -c 'return 403'"
    )
    out = run(
        ["docker", "run", "--rm", "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
         "--security-opt", "no-new-privileges:true", "--entrypoint", "sh", images.superlink, "-c", script],
        timeout=180,
    ).stdout
    assert "nginx config ok" in out, out
    assert out.strip().splitlines()[-1] == "2", out  # the Fleet URI check and the catch-all location
