"""`fedtune` front door: every one-off command behind one name, the old script names still working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

from tests.conftest import REPO

BIN = Path(sys.executable).parent
COMMANDS = ("demo", "certs", "keys", "k8s-keys", "connection", "eval", "report")


def fedtune(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "fedtune"), *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd or REPO)


def test_help_lists_every_command_and_daemon_on_one_line_each():
    done = fedtune("--help")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    for name in COMMANDS:
        rows = [line for line in lines if line.split()[:1] == [name]]
        assert len(rows) == 1, (name, done.stdout)
        assert len(rows[0].split()) > 2, f"{name}: its help is not on the same line\n{done.stdout}"
    for daemon in ("fedtune-superlink", "fedtune-supernode", "fedtune-exporter"):
        assert any(line.split()[:1] == [daemon] for line in lines), done.stdout


def test_old_script_names_are_still_installed_and_declared():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for name in ("fedtune", "fedtune-superlink", "fedtune-supernode", "fedtune-certs", "fedtune-keys",
                 "fedtune-k8s-keys", "fedtune-exporter"):
        assert name in scripts
        assert (BIN / name).is_file(), name


def test_certs_subcommand_is_the_certs_program(tmp_path):
    via_front = fedtune("certs", "--out", str(tmp_path / "a"), "--san", "localhost")
    assert via_front.returncode == 0, via_front.stderr
    assert (tmp_path / "a" / "ca.crt").is_file()
    via_old = subprocess.run([str(BIN / "fedtune-certs"), "--out", str(tmp_path / "a"), "--san", "localhost"],
                             capture_output=True, text=True, timeout=120)
    assert via_old.returncode == 0 and via_old.stdout.startswith("reusing"), via_old.stdout
    # its own options reach it, and its errors are its own one line
    assert "--san" in fedtune("certs", "--help").stdout
    assert fedtune("keys", "bogus").returncode != 0


def test_keys_subcommand_generates_a_key_pair(tmp_path):
    done = fedtune("keys", "generate", "supernode-0", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "supernode-0").is_file() and (tmp_path / "supernode-0.pub").is_file()


def test_connection_writes_a_tls_entry_the_flwr_cli_reads(tmp_path):
    fedtune("certs", "--out", str(tmp_path / "certs"))
    home = tmp_path / "flwr-home"
    done = fedtune("connection", "remote", "superlink.example.org:8000", "--ca",
                   str(tmp_path / "certs" / "ca.crt"), "--flwr-home", str(home))
    assert done.returncode == 0, done.stderr
    config = tomllib.loads((home / "config.toml").read_text())["superlink"]
    assert config["default"] == "remote"
    assert config["remote"]["address"] == "superlink.example.org:8000"
    assert Path(config["remote"]["root-certificates"]) == (tmp_path / "certs" / "ca.crt").resolve()
    fedtune("connection", "sim", "--simulation", "--no-default", "--flwr-home", str(home))
    config = tomllib.loads((home / "config.toml").read_text())["superlink"]
    assert config["default"] == "remote" and config["sim"]["address"] == ":local:"


def test_bad_input_is_one_line_and_exit_status_2(tmp_path):
    no_ca = fedtune("connection", "remote", "host:8000", "--flwr-home", str(tmp_path))
    assert no_ca.returncode == 2
    assert no_ca.stderr.strip().count("\n") == 0 and no_ca.stderr.startswith("error: "), no_ca.stderr
    missing = fedtune("report", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "not a fedtune run folder" in missing.stderr, missing.stderr


def test_python_dash_m_fedtune_is_the_same_command():
    done = subprocess.run([sys.executable, "-m", "fedtune", "--help"], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 0 and "report" in done.stdout
