"""Issue 13 item 10: an expired CA is neither reused by fedtune-certs nor accepted by the launchers."""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedtune.certs import TlsFiles, certificate_sans, check_ca_file, check_server_files, ensure, generate
from fedtune.errors import FedTuneError
from superlink import launch as superlink_launch

NOW = dt.datetime.now(dt.timezone.utc)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_pki(folder, ca_days: tuple[int, int], server_days: tuple[int, int]) -> TlsFiles:
    """A CA and a server certificate valid from NOW+a to NOW+b days (negative: in the past)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())

    def build(subject, public_key, days, *extensions):
        builder = (
            x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name("fedtune CA"))
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(NOW + dt.timedelta(days=days[0]))
            .not_valid_after(NOW + dt.timedelta(days=days[1]))
        )
        for ext, critical in extensions:
            builder = builder.add_extension(ext, critical=critical)
        return builder.sign(ca_key, hashes.SHA384())

    ca_ext = (x509.BasicConstraints(ca=True, path_length=0), True)
    ca = build("fedtune CA", ca_key.public_key(), ca_days, ca_ext)
    sans = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    server = build("localhost", server_key.public_key(), server_days, (sans, False))
    files = TlsFiles.in_dir(folder)
    files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (folder / "ca.key").write_bytes(_key_pem(ca_key))
    files.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    files.server_key.write_bytes(_key_pem(server_key))
    return files


def test_expired_ca_fails_the_superlink_preflight_with_one_line(tmp_path):
    files = write_pki(tmp_path / "certs", ca_days=(-900, -1), server_days=(-900, 300))
    with pytest.raises(FedTuneError, match=r"ca\.crt expired on .*renew with `fedtune-certs"):
        check_server_files(files)
    done = subprocess.run(
        [sys.executable, "-m", "superlink", "--certs-dir", str(files.ca_cert.parent), "--dry-run"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "ca.crt expired on" in done.stderr
    # what SuperNodes and operators check their CA file with
    with pytest.raises(FedTuneError, match=r"CA certificate .*ca\.crt expired on"):
        check_ca_file(files.ca_cert)


def test_fedtune_certs_replaces_an_expired_ca_and_says_so(tmp_path):
    files = write_pki(tmp_path / "certs", ca_days=(-900, -1), server_days=(-900, 300))
    old_ca = files.ca_cert.read_bytes()
    done = subprocess.run(
        [sys.executable, "-m", "fedtune.certs", "--out", str(files.ca_cert.parent)],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "renewing:" in done.stdout and "expired on" in done.stdout and "NEW CA" in done.stdout, done.stdout
    assert files.ca_cert.read_bytes() != old_ca
    check_server_files(files)  # the new pair passes the SuperLink preflight
    assert superlink_launch.build_command(
        superlink_launch.build_parser().parse_args(["--certs-dir", str(files.ca_cert.parent)])
    )[0] == "flower-superlink"


def test_expiring_server_cert_is_renewed_from_the_same_ca(tmp_path):
    files = write_pki(tmp_path / "certs", ca_days=(-10, 3000), server_days=(-10, 5))  # 5 days left
    old_ca = files.ca_cert.read_bytes()
    lines: list[str] = []
    _, generated = ensure(files.ca_cert.parent, ["localhost"], report=lines.append)
    assert generated and files.ca_cert.read_bytes() == old_ca
    assert lines and "expires on" in lines[0] and "same CA" in lines[0], lines
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    assert cert.not_valid_after_utc - NOW > dt.timedelta(days=300)
    # valid material is reused as is, silently
    lines.clear()
    _, generated = ensure(files.ca_cert.parent, ["localhost"], report=lines.append)
    assert not generated and not lines


def test_server_certificates_always_name_loopback(tmp_path):
    files = generate(tmp_path / "certs", ["superlink.example.org"])
    assert {"superlink.example.org", "localhost", "127.0.0.1"} <= certificate_sans(files.server_cert)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    assert cert.not_valid_after_utc <= ca.not_valid_after_utc  # never outlives its CA
