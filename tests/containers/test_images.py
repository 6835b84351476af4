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
