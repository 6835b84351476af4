"""Generate and check the TLS material of a federation: a CA and a SuperLink server certificate.

`fedtune-certs --out certs --san localhost --san 127.0.0.1 --san superlink.example.org` writes
ca.crt / ca.key / server.pem / server.key. Re-running reuses what is there when it still covers the
requested names (so containers restarting keep their certificates), and regenerates otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.errors import FedTuneError, one_line_errors
from fedtune.runtime_env import require_file

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
DEFAULT_SANS = ("localhost", "127.0.0.1")
VALID_DAYS = 825  # the longest server-certificate lifetime browsers and most TLS stacks accept


@dataclass(frozen=True)
class TlsFiles:
    """Paths of the files a SuperLink serves TLS with (and SuperNodes verify against)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, directory: str | os.PathLike[str]) -> TlsFiles:
        root = Path(directory)
        return cls(root / CA_CERT, root / SERVER_CERT, root / SERVER_KEY)


def _general_name(san: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(san))
    except ValueError:
        return x509.DNSName(san)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    os.replace(tmp, path)


def _write_cert(cert: x509.Certificate, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    os.replace(tmp, path)


def _builder(subject: str, issuer: str, public_key: object, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _load_ca(files: TlsFiles) -> tuple[ec.EllipticCurvePrivateKey | None, x509.Certificate | None]:
    """An existing CA is kept so SuperNodes that trust it keep working when the server cert changes."""
    key_path = files.ca_cert.parent / CA_KEY
    if not (files.ca_cert.is_file() and key_path.is_file()):
        return None, None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    except (ValueError, TypeError):
        return None, None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None, None
    return key, cert


def _new_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_key = _new_key()
    ca_cert = (
        _builder("fedtune CA", "fedtune CA", ca_key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return ca_key, ca_cert


def generate(out_dir: str | os.PathLike[str], sans: list[str], days: int = VALID_DAYS) -> TlsFiles:
    """Write a server certificate for `sans` into `out_dir`, signed by its CA (created if absent)."""
    if not sans:
        raise FedTuneError("at least one --san (DNS name or IP of the SuperLink) is required")
    files = TlsFiles.in_dir(out_dir)
    files.ca_cert.parent.mkdir(parents=True, exist_ok=True)

    ca_key, ca_cert = _load_ca(files)
    if ca_key is None or ca_cert is None:
        ca_key, ca_cert = _new_ca(days)
    server_key = _new_key()
    server_cert = (
        _builder(sans[0], "fedtune CA", server_key.public_key(), days)
        .add_extension(x509.SubjectAlternativeName([_general_name(s) for s in sans]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write_key(ca_key, files.ca_cert.parent / CA_KEY)
    _write_cert(ca_cert, files.ca_cert)
    _write_key(server_key, files.server_key)
    _write_cert(server_cert, files.server_cert)
    return files


def certificate_sans(cert_path: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    names = {str(n) for n in ext.get_values_for_type(x509.DNSName)}
    names |= {str(ip) for ip in ext.get_values_for_type(x509.IPAddress)}
    return names


def check_server_files(files: TlsFiles) -> None:
    """Fail with one line if a file is missing, unreadable, expired, or the key does not match."""
    for path, what in (
        (files.ca_cert, "CA certificate"),
        (files.server_cert, "server certificate"),
        (files.server_key, "server private key"),
    ):
        require_file(path, what)
    try:
        ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    except ValueError as err:
        raise FedTuneError(f"not a PEM certificate: {files.server_cert} or {files.ca_cert} ({err})") from None
    try:
        key = serialization.load_pem_private_key(files.server_key.read_bytes(), password=None)
    except (ValueError, TypeError) as err:
        raise FedTuneError(f"not an unencrypted PEM private key: {files.server_key} ({err})") from None
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise FedTuneError(f"{files.server_key} is not the key of {files.server_cert}")
    try:
        cert.verify_directly_issued_by(ca)  # the signature, not just matching names
    except (ValueError, TypeError, InvalidSignature):
        raise FedTuneError(f"{files.server_cert} was not issued by the CA in {files.ca_cert}") from None
    if cert.not_valid_after_utc < dt.datetime.now(dt.timezone.utc):
        raise FedTuneError(f"{files.server_cert} expired on {cert.not_valid_after_utc:%Y-%m-%d}")


def ensure(out_dir: str | os.PathLike[str], sans: list[str], force: bool = False) -> tuple[TlsFiles, bool]:
    """Reuse valid certificates covering `sans`, else generate. Returns (files, generated)."""
    files = TlsFiles.in_dir(out_dir)
    if not force and files.server_cert.is_file():
        try:
            check_server_files(files)
            if set(sans) <= certificate_sans(files.server_cert):
                return files, False
        except FedTuneError:
            pass
    return generate(out_dir, sans), True


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fedtune-certs",
        description="Create a CA and a SuperLink server certificate (reused if still valid).",
    )
    parser.add_argument("--out", default=os.environ.get("FEDTUNE_CERTS_DIR", "certs"))
    parser.add_argument(
        "--san", action="append", default=None,
        help="DNS name or IP the SuperLink is reached at (repeat); default: localhost, 127.0.0.1",
    )
    parser.add_argument("--force", action="store_true", help="regenerate even if valid files exist")
    args = parser.parse_args(argv)
    sans = args.san or os.environ.get("FEDTUNE_CERT_SANS", ",".join(DEFAULT_SANS)).split(",")
    sans = [s.strip() for s in sans if s.strip()]
    files, generated = ensure(args.out, sans, force=args.force)
    verb = "generated" if generated else "reusing"
    print(f"{verb} CA {files.ca_cert} and server certificate {files.server_cert} for {', '.join(sans)}")


if __name__ == "__main__":
    main()
