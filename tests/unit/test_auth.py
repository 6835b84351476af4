"""SuperNode auth keys (fedtune/auth.py), auth on by default in the launchers, and bad input to both."""

import subprocess
import sys

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedtune.auth import generate, load_private_key, public_key_of, register
from fedtune.certs import ensure
from fedtune.errors import FedTuneError
from superlink import launch as superlink_launch
from supernode import launch as supernode_launch


@pytest.fixture
def certs(tmp_path):
    files, _ = ensure(tmp_path / "certs", ["localhost", "127.0.0.1"])
    return files


def superlink_cmd(*argv):
    return superlink_launch.build_command(superlink_launch.build_parser().parse_args(list(argv)))


def supernode_cmd(*argv):
    return supernode_launch.build_command(supernode_launch.build_parser().parse_args(list(argv)))


def test_keys_are_p384_openssh_pairs_that_flower_can_read(tmp_path):
    pair, generated = generate(tmp_path / "keys", "supernode-0")
    assert generated
    private = serialization.load_ssh_private_key(pair.private_key.read_bytes(), None)  # as flower-supernode
    public = serialization.load_ssh_public_key(pair.public_key.read_bytes())  # as flwr supernode register
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert pair.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert oct(pair.private_key.stat().st_mode & 0o777) == "0o600"


def test_keys_are_reused_unless_forced_and_names_are_checked(tmp_path):
    pair, _ = generate(tmp_path, "node")
    before = pair.private_key.read_bytes()
    assert generate(tmp_path, "node") == (pair, False)
    assert generate(tmp_path, "node", force=True)[1] and pair.private_key.read_bytes() != before
    other, _ = generate(tmp_path, "other")
    kept = pair.private_key.read_bytes()
    pair.public_key.write_bytes(other.public_key.read_bytes())  # mismatched .pub: re-derived, same key
    assert generate(tmp_path, "node") == (pair, False)
    assert pair.private_key.read_bytes() == kept
    assert pair.public_key.read_bytes() != other.public_key.read_bytes()
    with pytest.raises(FedTuneError, match="key name"):
        generate(tmp_path, "../escape")
    pair.public_key.unlink()
    assert public_key_of(pair.private_key) == pair.public_key and pair.public_key.is_file()


def test_bad_key_files_give_one_line_errors(tmp_path):
    garbage = tmp_path / "garbage"
    garbage.write_text("not a key")
    with pytest.raises(FedTuneError, match="not an unencrypted OpenSSH private key"):
        load_private_key(garbage)
    with pytest.raises(FedTuneError, match="SuperNode auth key not found"):
        load_private_key(tmp_path / "missing")
    with pytest.raises(FedTuneError, match="not an OpenSSH public key"):
        register(garbage, "fedtune-local", tmp_path)
    with pytest.raises(FedTuneError, match="SuperNode public key not found"):
        register(tmp_path / "missing.pub", "fedtune-local", tmp_path)


def test_fedtune_keys_cli_exits_2_with_one_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "fedtune.auth", "register", str(tmp_path / "x.pub"), "--connection", "c"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: SuperNode public key not found: {tmp_path / 'x.pub'}"


def test_superlink_auth_is_on_by_default_with_tls(certs, monkeypatch):
    monkeypatch.delenv("FEDTUNE_SUPERNODE_AUTH", raising=False)
    certs_dir = str(certs.ca_cert.parent)
    assert "--enable-supernode-auth" in superlink_cmd("--certs-dir", certs_dir)
    assert "--enable-supernode-auth" not in superlink_cmd("--certs-dir", certs_dir, "--no-supernode-auth")
    assert "--enable-supernode-auth" not in superlink_cmd("--insecure")  # plaintext cannot authenticate
    monkeypatch.setenv("FEDTUNE_SUPERNODE_AUTH", "0")  # compose / chart: explicitly off
    assert "--enable-supernode-auth" not in superlink_cmd("--certs-dir", certs_dir)
    monkeypatch.setenv("FEDTUNE_SUPERNODE_AUTH", "1")
    assert "--enable-supernode-auth" in superlink_cmd("--certs-dir", certs_dir)
    with pytest.raises(FedTuneError, match="requires TLS"):
        superlink_cmd("--insecure")


def test_supernode_checks_its_auth_key_and_data_before_starting(certs, tmp_path):
    base = ["--superlink", "sl:8000", "--root-certificates", str(certs.ca_cert), "--partition-id", "0"]
    pair, _ = generate(tmp_path, "n0")
    cmd = supernode_cmd(*base, "--auth-key", str(pair.private_key))
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == str(pair.private_key)
    with pytest.raises(FedTuneError, match="not an unencrypted OpenSSH private key"):
        supernode_cmd(*base, "--auth-key", str(pair.public_key))  # the .pub by mistake
    with pytest.raises(FedTuneError, match="SuperNode auth key not found"):
        supernode_cmd(*base, "--auth-key", str(tmp_path / "nope"))
    with pytest.raises(FedTuneError, match="requires TLS"):
        supernode_cmd("--superlink", "sl:8000", "--insecure", "--partition-id", "0", "--auth-key", "k")
    with pytest.raises(FedTuneError, match="--data-path not found"):
        supernode_cmd("--superlink", "sl:8000", "--root-certificates", str(certs.ca_cert),
                      "--data-path", str(tmp_path / "missing.jsonl"))
    with pytest.raises(FedTuneError, match="must be HOST:PORT"):
        supernode_cmd("--superlink", "superlink.example.org", "--root-certificates", str(certs.ca_cert),
                      "--partition-id", "0")


def test_a_lost_public_key_is_rederived_never_replaced_by_a_new_identity(tmp_path):
    from fedtune.auth import generate as generate_pair

    pair, generated = generate_pair(tmp_path, "node-0")
    private, public = pair.private_key.read_bytes(), pair.public_key.read_bytes()
    pair.public_key.unlink()
    again, generated_again = generate_pair(tmp_path, "node-0")
    assert generated and not generated_again
    assert again.private_key.read_bytes() == private
    assert again.public_key.read_bytes() == public
