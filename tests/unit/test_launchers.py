"""The role launchers: the flwr command they build, and one-line errors for bad input."""

import subprocess
import sys

import pytest

from fedtune.certs import certificate_sans, ensure, generate
from fedtune.errors import FedTuneError
from superlink import launch as superlink_launch
from supernode import launch as supernode_launch


@pytest.fixture
def certs(tmp_path):
    files, generated = ensure(tmp_path / "certs", ["localhost", "127.0.0.1", "superlink"])
    assert generated
    return files


def superlink_cmd(*argv):
    return superlink_launch.build_command(superlink_launch.build_parser().parse_args(list(argv)))


def supernode_cmd(*argv):
    return supernode_launch.build_command(supernode_launch.build_parser().parse_args(list(argv)))


def test_superlink_serves_tls_with_a_state_db_and_no_runtime_installs(certs, tmp_path):
    cmd = superlink_cmd("--certs-dir", str(certs.ca_cert.parent), "--database", str(tmp_path / "s.db"))
    assert cmd[0] == "flower-superlink"
    assert cmd[cmd.index("--ssl-certfile") + 1] == str(certs.server_cert)
    assert cmd[cmd.index("--ssl-keyfile") + 1] == str(certs.server_key)
    assert cmd[cmd.index("--ssl-ca-certfile") + 1] == str(certs.ca_cert)
    assert "--disable-runtime-dependency-installation" in cmd and "--insecure" not in cmd
    assert "--health-server-address" in cmd


def test_superlink_refuses_to_start_without_tls_unless_told(tmp_path):
    with pytest.raises(FedTuneError, match="TLS needs --certs-dir"):
        superlink_cmd()
    assert "--insecure" in superlink_cmd("--insecure")
    with pytest.raises(FedTuneError, match="requires TLS"):
        superlink_cmd("--insecure", "--enable-supernode-auth")


def test_bad_cert_files_give_one_line_errors(certs, tmp_path):
    with pytest.raises(FedTuneError, match="server private key not found"):
        superlink_cmd("--certs-dir", str(certs.ca_cert.parent), "--ssl-keyfile", str(tmp_path / "nope.key"))
    other = generate(tmp_path / "other", ["localhost"])  # a different CA and key
    with pytest.raises(FedTuneError, match="is not the key of"):
        superlink_cmd("--certs-dir", str(certs.ca_cert.parent), "--ssl-keyfile", str(other.server_key))
    with pytest.raises(FedTuneError, match="was not issued by the CA"):
        superlink_cmd("--certs-dir", str(certs.ca_cert.parent), "--ssl-ca-certfile", str(other.ca_cert))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(FedTuneError, match="not a PEM certificate"):
        superlink_cmd("--certs-dir", str(certs.ca_cert.parent), "--ssl-certfile", str(garbage))


def test_launcher_exits_2_with_one_line_on_stderr(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "superlink", "--certs-dir", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: CA certificate not found: {tmp_path / 'missing' / 'ca.crt'}"


def test_supernode_partition_from_flag_or_ordinal(certs, monkeypatch):
    cmd = supernode_cmd(
        "--superlink", "sl:8000", "--root-certificates", str(certs.ca_cert), "--partition-id", "3"
    )
    assert cmd[cmd.index("--node-config") + 1] == "partition-id=3 num-partitions=20"
    monkeypatch.setenv("POD_NAME", "fedtune-supernode-4")
    cmd = supernode_cmd(
        "--superlink",
        "sl:8000",
        "--root-certificates",
        str(certs.ca_cert),
        "--partition-from-ordinal",
        "--partition-offset",
        "10",
    )
    assert cmd[cmd.index("--node-config") + 1] == "partition-id=14 num-partitions=20"


def test_supernode_bad_input(certs, tmp_path, monkeypatch):
    ca = str(certs.ca_cert)
    with pytest.raises(FedTuneError, match="--superlink HOST:PORT is required"):
        supernode_cmd("--root-certificates", ca, "--partition-id", "0")
    with pytest.raises(FedTuneError, match=r"outside 0\.\.19"):
        supernode_cmd("--superlink", "sl:8000", "--root-certificates", ca, "--partition-id", "20")
    with pytest.raises(FedTuneError, match="TLS needs --root-certificates"):
        supernode_cmd("--superlink", "sl:8000", "--partition-id", "0")
    with pytest.raises(FedTuneError, match="CA certificate not found"):
        supernode_cmd(
            "--superlink", "sl:8000", "--root-certificates", str(tmp_path / "x.crt"), "--partition-id", "0"
        )
    monkeypatch.setenv("POD_NAME", "no-ordinal-here")
    with pytest.raises(FedTuneError, match="trailing -<number>"):
        supernode_cmd("--superlink", "sl:8000", "--root-certificates", ca, "--partition-from-ordinal")
    assert "--insecure" in supernode_cmd("--superlink", "sl:8000", "--insecure", "--partition-id", "0")


def test_certs_are_reused_and_the_ca_survives_new_names(tmp_path):
    files, generated = ensure(tmp_path, ["localhost"])
    ca_before = files.ca_cert.read_bytes()
    assert ensure(tmp_path, ["localhost"]) == (files, False)
    files, generated = ensure(tmp_path, ["localhost", "superlink.example.org", "10.0.0.5"])
    assert generated and files.ca_cert.read_bytes() == ca_before
    assert {"localhost", "superlink.example.org", "10.0.0.5"} <= certificate_sans(files.server_cert)
    assert oct(files.server_key.stat().st_mode & 0o777) == "0o600"
