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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.atomic import write_bytes
from fedtune.errors import FedTuneError, one_line_errors
from fedtune.keygen import new_private_key
from fedtune.runtime_env import require_file

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
# Always in the server certificate: the SuperLink's own clients (its nginx proxy, Flower's SuperExec, the
# exporter, the operator's `flwr`) reach it on 127.0.0.1 from its host/container/pod.
DEFAULT_SANS = ("localhost", "127.0.0.1")
VALID_DAYS = 825  # the longest server-certificate lifetime browsers and most TLS stacks accept
# Renew a CA or server certificate this close to its end, so a restart never serves an expiring one.
RENEW_BEFORE = dt.timedelta(days=30)


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


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_bytes(path, pem, mode=0o600)


def _write_cert(cert: x509.Certificate, path: Path) -> None:
    write_bytes(path, cert.public_bytes(serialization.Encoding.PEM))


def _builder(
    subject: str, issuer: str, public_key: object, days: int, not_after: dt.datetime | None = None
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    end = now + dt.timedelta(days=days)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(end, not_after) if not_after is not None else end)
    )


def expiry_problem(cert: x509.Certificate, path: Path, margin: dt.timedelta = dt.timedelta(0)) -> str | None:
    """Why `cert` cannot be used now (expired, not yet valid, or ending within `margin`), else None."""
    now = dt.datetime.now(dt.timezone.utc)
    if cert.not_valid_after_utc <= now:
        return f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    if cert.not_valid_before_utc > now:
        return f"{path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check the clock)"
    if cert.not_valid_after_utc - now < margin:
        return f"{path} expires on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    return None


def _load_ca(files: TlsFiles) -> tuple[ec.EllipticCurvePrivateKey | None, x509.Certificate | None]:
    """An existing CA is kept so SuperNodes that trust it keep working when the server cert changes,
    unless it is expired or about to (RENEW_BEFORE): then None, and the caller makes a new one."""
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
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        return None, None
    if expiry_problem(cert, files.ca_cert, RENEW_BEFORE) is not None:
        return None, None
    return key, cert


def _new_ca(days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_key = new_private_key()
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
    sans = with_local_names(sans)
    files = TlsFiles.in_dir(out_dir)
    files.ca_cert.parent.mkdir(parents=True, exist_ok=True)

    ca_key, ca_cert = _load_ca(files)
    if ca_key is None or ca_cert is None:
        ca_key, ca_cert = _new_ca(days)
    server_key = new_private_key()
    server_cert = (
        # never valid longer than the CA that vouches for it
        _builder(sans[0], "fedtune CA", server_key.public_key(), days, not_after=ca_cert.not_valid_after_utc)
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


def with_local_names(sans: list[str]) -> list[str]:
    """`sans` plus localhost and 127.0.0.1 (kept in order, no duplicates)."""
    return list(dict.fromkeys([*sans, *DEFAULT_SANS]))


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
    for checked, path in ((ca, files.ca_cert), (cert, files.server_cert)):
        problem = expiry_problem(checked, path)
        if problem is not None:
            raise FedTuneError(f"{problem}; renew with `fedtune-certs --out DIR` (see README, TLS)")


def check_ca_file(path: str | os.PathLike[str]) -> Path:
    """A SuperNode's or `flwr`'s CA file: present, PEM certificates, none expired (else one line)."""
    resolved = require_file(path, "CA certificate")
    try:
        certs = x509.load_pem_x509_certificates(resolved.read_bytes())
    except ValueError:
        raise FedTuneError(
            f"CA certificate {resolved} is not a PEM certificate (expected -----BEGIN CERTIFICATE-----)"
        ) from None
    for cert in certs:
        problem = expiry_problem(cert, resolved)
        if problem is not None:
            raise FedTuneError(f"CA certificate {problem}; get the federation's current ca.crt")
    return resolved


def renewal_reason(files: TlsFiles, sans: list[str]) -> str | None:
    """Why the certificates in `files` cannot be reused for `sans` (None: reuse them)."""
    if not files.server_cert.is_file():
        return None if not files.ca_cert.is_file() else f"{files.server_cert} is missing"
    try:
        check_server_files(files)
    except FedTuneError as err:
        return str(err).split("; renew with")[0]
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    for checked, path in ((ca, files.ca_cert), (cert, files.server_cert)):
        problem = expiry_problem(checked, path, RENEW_BEFORE)
        if problem is not None:
            return problem
    missing = set(with_local_names(sans)) - certificate_sans(files.server_cert)
    if missing:
        return f"{files.server_cert} does not cover {', '.join(sorted(missing))}"
    return None


def ensure(
    out_dir: str | os.PathLike[str],
    sans: list[str],
    force: bool = False,
    report: Callable[[str], None] | None = None,
) -> tuple[TlsFiles, bool]:
    """Reuse valid certificates covering `sans` (plus localhost, 127.0.0.1), else generate; an expired
    or expiring CA is replaced, and `report` gets one line saying why and what SuperNodes must do.
    Returns (files, generated)."""
    files = TlsFiles.in_dir(out_dir)
    reason = "--force" if force else renewal_reason(files, sans)
    if not force and reason is None and files.server_cert.is_file():
        return files, False
    old_ca = files.ca_cert.read_bytes() if files.ca_cert.is_file() else None
    generated = generate(out_dir, sans)
    if report is not None and reason is not None:
        if old_ca is not None and generated.ca_cert.read_bytes() != old_ca:
            report(
                f"renewing: {reason}; made a NEW CA: give {generated.ca_cert} to every SuperNode and operator"
            )
        else:
            report(f"renewing: {reason}; new server certificate from the same CA (SuperNodes unaffected)")
    return generated, True


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
    files, generated = ensure(args.out, sans, force=args.force, report=print)
    verb = "generated" if generated else "reusing"
    print(f"{verb} CA {files.ca_cert} and server certificate {files.server_cert} for {', '.join(sans)}")


if __name__ == "__main__":
    main()
