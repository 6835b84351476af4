"""Issue 13, bad input at the launchers: each case is one `error: ...` line on stderr and exit 2, before
any flwr process starts (so nothing hangs and nothing is half-started)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fedtune.certs import generate


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("certs"), ["localhost"])


def launch(role: str, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", role, *argv],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", **(env or {})},
    )


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def test_superlink_ports(certs, tmp_path):
    base = ["--certs-dir", str(certs.ca_cert.parent), "--database", str(tmp_path / "s.db")]
    assert "FEDTUNE_PORT must be an integer, got 'abc'" in one_line(
        launch("superlink", *base, env={"FEDTUNE_PORT": "abc"})
    )
    assert "FEDTUNE_INTERNAL_PORT must be a TCP port (1-65535), got 0" in one_line(
        launch("superlink", *base, env={"FEDTUNE_INTERNAL_PORT": "0"})
    )
    assert "argument --port: must be a TCP port (1-65535), got 70000" in one_line(
        launch("superlink", *base, "--port", "70000")
    )
    assert "argument --port: invalid" not in one_line(launch("superlink", *base, "--port", "x1"))
    assert "--internal-port must differ from --port" in one_line(
        launch("superlink", *base, "--port", "9000", "--internal-port", "9000")
    )
    assert "unrecognized arguments: --bogus" in one_line(launch("superlink", *base, "--bogus"))
    assert "FEDTUNE_OBJECT_WAIT_SECONDS must be a number of seconds, got 'soon'" in one_line(
        launch("superlink", *base, "--dry-run", env={"FEDTUNE_OBJECT_WAIT_SECONDS": "soon"})
    )


def test_superlink_needs_loopback_in_the_server_certificate(tmp_path):
    from fedtune import certs as certs_module

    # a certificate made elsewhere, without localhost/127.0.0.1 (fedtune-certs always adds them)
    original = certs_module.with_local_names
    try:
        certs_module.with_local_names = lambda sans: list(sans)
        files = generate(tmp_path / "c", ["superlink.example.org"])
    finally:
        certs_module.with_local_names = original
    line = one_line(launch("superlink", "--certs-dir", str(files.ca_cert.parent), "--dry-run"))
    assert "lacks 127.0.0.1, localhost in its SANs" in line


def test_supernode_env_and_ports(certs):
    base = ["--superlink", "127.0.0.1:1", "--root-certificates", str(certs.ca_cert), "--dry-run"]
    assert "FEDTUNE_PARTITION_ID must be an integer, got 'abc'" in one_line(
        launch("supernode", *base, env={"FEDTUNE_PARTITION_ID": "abc"})
    )
    assert "argument --clientapp-port: must be a TCP port (1-65535), got 70000" in one_line(
        launch("supernode", *base, "--partition-id", "0", "--clientapp-port", "70000")
    )
    assert "FEDTUNE_CLIENTAPP_PORT must be an integer" in one_line(
        launch("supernode", *base, "--partition-id", "0", env={"FEDTUNE_CLIENTAPP_PORT": "abc"})
    )
    assert "FEDTUNE_OBJECT_WAIT_SECONDS must be from 0 to 10 s, got 30" in one_line(
        launch("supernode", *base, "--partition-id", "0", env={"FEDTUNE_OBJECT_WAIT_SECONDS": "30"})
    )


def test_supernode_ca_file_that_is_not_pem(tmp_path):
    bad = tmp_path / "ca.crt"
    bad.write_bytes(b"\x30\x82\x01\x0a garbage, maybe DER, certainly not PEM")
    # not --dry-run: the real start path, which used to print flwr's traceback and then hang
    line = one_line(launch("supernode", "--superlink", "127.0.0.1:1", "--root-certificates", str(bad),
                           "--partition-id", "0", "--num-partitions", "2"))
    assert line == f"error: CA certificate {bad} is not a PEM certificate (expected -----BEGIN CERTIFICATE-----)"


def test_supernode_malformed_jsonl_data_path(certs, tmp_path):
    data = tmp_path / "mine.jsonl"
    good = json.dumps({"instruction": "Say hi", "input": "", "output": "hi"})
    data.write_text(f"{good}\n{{\"instruction\": \"broken\",\n{good}\n")
    base = ["--superlink", "127.0.0.1:1", "--root-certificates", str(certs.ca_cert)]
    line = one_line(launch("supernode", *base, "--data-path", str(data)))
    assert line.startswith(f"error: {data} line 2: not JSON")
    data.write_text(f"{good}\n[1, 2]\n")
    assert f"{data} line 2: not a JSON object" in one_line(launch("supernode", *base, "--data-path", str(data)))
    data.write_text(json.dumps({"instruction": "no output"}) + "\n")
    assert "no usable row" in one_line(launch("supernode", *base, "--data-path", str(data)))
    data.write_text(f"{good}\n\n{good}\n")  # blank lines are fine
    done = launch("supernode", *base, "--data-path", str(data), "--dry-run")
    assert done.returncode == 0, done.stderr
