"""Mint SuperNode auth keys inside a Kubernetes cluster (`fedtune-k8s-keys`): the Helm chart's hook Job.

    fedtune-k8s-keys --secret fedtune-supernode-auth --statefulset fedtune-supernode --replicas 2

For every SuperNode pod `<statefulset>-<ordinal>` (ordinal < replicas) the Secret ends up holding
    <pod>       its private key: OpenSSH ECDSA P-384, what the pod mounts as FEDTUNE_AUTH_KEY
    <pod>.pub   its public key line, what the register Job passes to `flwr supernode register`
Only missing keys are generated (fedtune.auth, as `fedtune-keys generate`); a private key already in the
Secret is never replaced, because the SuperLink may know it: upgrades keep every key, a scale-up adds
keys for the new pods only, keys of pods above `replicas` stay for a later scale-up. A missing or stale
`.pub` is re-derived from its private key. A private key that does not parse is an error, never replaced.

Why in the cluster: Helm's template functions cannot write OpenSSH ECDSA keys, and a SuperNode that
registered its own key would defeat authentication. So a short-lived Job with a Role that can only
read and write this one Secret makes them before the SuperNodes start.

The Kubernetes API is spoken with the standard library only: urllib, the pod's service-account token
and the cluster CA (`--service-account-dir`, default the in-cluster mount), the API server from
KUBERNETES_SERVICE_HOST/PORT (or `--api-server`). Writes are conditional on the resourceVersion that was
read, so a concurrent writer makes this re-read (409), never overwrite.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import ssl
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from fedtune.auth import (
    check_name,
    parse_private_key,
    parse_public_key,
    private_key_bytes,
    public_key_line,
)
from fedtune.errors import FedTuneError, one_line_errors
from fedtune.keygen import new_private_key
from fedtune.runtime_env import require_file

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
ATTEMPTS = 5  # conflicting writers re-read this often before giving up
HINTS = {
    401: "the service-account token was not accepted",
    403: "the Job's Role must allow get and patch on this Secret and create on secrets",
}


class KubeApi:
    """A bearer-token JSON client for the few Kubernetes API calls this needs."""

    def __init__(self, server: str, token: str, context: ssl.SSLContext | None = None, timeout: float = 30.0):
        self.server = server.rstrip("/")
        self.token = token
        self.timeout = timeout
        # The API server is dialled directly: an HTTP(S)_PROXY in the pod's environment is not for it.
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._opener = urllib.request.build_opener(*handlers)

    @classmethod
    def in_cluster(cls, service_account_dir: str | os.PathLike[str], server: str | None = None) -> KubeApi:
        folder = Path(service_account_dir)
        token = require_file(folder / "token", "service-account token").read_text().strip()
        if not server:
            host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
            port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                raise FedTuneError(
                    "KUBERNETES_SERVICE_HOST is not set: run this in a pod or pass --api-server"
                )
            server = f"https://{f'[{host}]' if ':' in host else host}:{port}"
        context = None
        if server.startswith("https://"):
            ca = require_file(folder / "ca.crt", "cluster CA certificate")
            context = ssl.create_default_context(cafile=str(ca))
        return cls(server, token, context)

    def request(
        self, method: str, path: str, body: dict | None = None, content_type: str = "application/json"
    ) -> tuple[int, dict]:
        """(HTTP status, decoded JSON body); connection and TLS failures are one-line errors."""
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = content_type
        request = urllib.request.Request(self.server + path, data=data, headers=headers, method=method)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return response.status, _json(response.read())
        except urllib.error.HTTPError as err:
            return err.code, _json(err.read())
        except (urllib.error.URLError, OSError) as err:  # refused, DNS, TLS verification, timeout
            reason = getattr(err, "reason", None) or err
            raise FedTuneError(f"cannot reach the Kubernetes API at {self.server}: {reason}") from None


def _json(raw: bytes) -> dict:
    try:
        value = json.loads(raw or b"{}")
    except json.JSONDecodeError:
        return {"message": raw.decode(errors="replace")[:300]}
    return value if isinstance(value, dict) else {}


def _refused(method: str, what: str, status: int, payload: dict) -> FedTuneError:
    message = " ".join(str(payload.get("message") or payload.get("reason") or "").split())
    hint = HINTS.get(status)
    text = f"the Kubernetes API refused {method} {what} (HTTP {status})"
    return FedTuneError(text + (f": {message}" if message else "") + (f"; {hint}" if hint else ""))


@dataclass
class MintResult:
    secret: str
    minted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    public_keys: dict[str, str] = field(default_factory=dict)
    action: str = "unchanged"  # created | updated | unchanged


def pod_names(statefulset: str, replicas: int) -> list[str]:
    if replicas < 0:
        raise FedTuneError(f"--replicas must be >= 0, got {replicas}")
    return [check_name(f"{statefulset}-{ordinal}") for ordinal in range(replicas)]


def _same_key(line: bytes, key: ec.EllipticCurvePublicKey) -> bool:
    try:
        return parse_public_key(line, "").public_numbers() == key.public_numbers()
    except FedTuneError:
        return False


def _plan(data: dict[str, bytes], names: list[str], where: str, result: MintResult) -> dict[str, bytes]:
    """The Secret keys to add or fix; fills result.minted/kept/public_keys."""
    updates: dict[str, bytes] = {}
    result.minted, result.kept, result.public_keys = [], [], {}
    for name in names:
        if name in data:
            try:
                key = parse_private_key(data[name], f"{where}, key {name}")
            except FedTuneError as err:
                raise FedTuneError(
                    f"{err}; it is left as it is: remove that key from the Secret to mint a new one "
                    "(and unregister the old node from the SuperLink)"
                ) from None
            result.kept.append(name)
        else:
            key = new_private_key()
            updates[name] = private_key_bytes(key)
            result.minted.append(name)
        line = data.get(f"{name}.pub")
        if line is None or not _same_key(line, key.public_key()):
            line = public_key_line(key.public_key(), f"fedtune-{name}")
            updates[f"{name}.pub"] = line
        result.public_keys[name] = line.decode().strip()
    return updates


def _encoded(data: dict[str, bytes]) -> dict[str, str]:
    return {key: base64.b64encode(value).decode() for key, value in sorted(data.items())}


def mint(
    api: KubeApi, namespace: str, secret: str, names: list[str], labels: dict[str, str] | None = None
) -> MintResult:
    """Make sure Secret `namespace/secret` holds a key pair for every name; never replace a private key."""
    for value, what in ((namespace, "namespace"), (secret, "Secret name")):
        if not DNS_SUBDOMAIN.match(value):
            raise FedTuneError(f"{what} {value!r} is not a valid Kubernetes name")
    where = f"Secret {namespace}/{secret}"
    path = f"/api/v1/namespaces/{namespace}/secrets/{secret}"
    result = MintResult(secret=where)
    for _ in range(ATTEMPTS):
        status, current = api.request("GET", path)
        if status == 404:
            data, version = {}, None
        elif status == 200:
            try:
                data = {k: base64.b64decode(v) for k, v in (current.get("data") or {}).items()}
            except ValueError as err:
                raise FedTuneError(f"{where}: data is not base64 ({err})") from None
            version = current.get("metadata", {}).get("resourceVersion")
        else:
            raise _refused("GET", where, status, current)
        updates = _plan(data, names, where, result)
        if not updates:
            result.action = "unchanged"
            return result
        if version is None:
            body = {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": secret, "namespace": namespace, "labels": dict(labels or {})},
                "type": "Opaque",
                "data": _encoded(updates),
            }
            method, result.action = "POST", "created"
            status, answer = api.request(method, f"/api/v1/namespaces/{namespace}/secrets", body)
        else:
            # A JSON merge patch adds/overwrites only these keys; the resourceVersion makes it conditional.
            patch = {"metadata": {"resourceVersion": version}, "data": _encoded(updates)}
            method, result.action = "PATCH", "updated"
            status, answer = api.request(method, path, patch, "application/merge-patch+json")
        if status in (200, 201):
            return result
        if status != 409:  # 409: created or changed by someone else since the read: read again
            raise _refused(method, where, status, answer)
    raise FedTuneError(f"{where} kept changing while keys were added ({ATTEMPTS} tries); run the Job again")


def _labels(items: list[str]) -> dict[str, str]:
    labels = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FedTuneError(f"--label {item!r}: use KEY=VALUE")
        labels[key] = value
    return labels


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtune-k8s-keys",
        description="Mint SuperNode auth keys (ECDSA P-384) into a Kubernetes Secret, one per pod; "
        "existing keys are kept.",
    )
    parser.add_argument("--secret", required=True, help="Secret holding <pod> (private) and <pod>.pub")
    parser.add_argument(
        "--statefulset", required=True, help="SuperNode StatefulSet: pods NAME-0, NAME-1, ..."
    )
    parser.add_argument("--replicas", required=True, type=int, help="pods to make keys for (ordinals 0..N-1)")
    env = os.environ.get
    parser.add_argument(
        "--namespace", default=env("POD_NAMESPACE"),
        help="default: $POD_NAMESPACE, else the service account's namespace",
    )
    parser.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="label of a Secret this creates"
    )
    parser.add_argument(
        "--api-server", default=env("FEDTUNE_K8S_API_SERVER"),
        help="default: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT",
    )
    parser.add_argument(
        "--service-account-dir", default=SERVICE_ACCOUNT_DIR,
        help="folder with token, ca.crt and namespace (default: %(default)s)",
    )
    return parser


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    names = pod_names(args.statefulset, args.replicas)
    namespace = args.namespace
    if not namespace:
        namespace_file = require_file(Path(args.service_account_dir) / "namespace", "namespace file")
        namespace = namespace_file.read_text().strip()
    api = KubeApi.in_cluster(args.service_account_dir, args.api_server)
    result = mint(api, namespace, args.secret, names, _labels(args.label))
    for name in result.kept:
        print(f"k8s-keys: kept the key of {name}")
    for name in result.minted:
        print(f"k8s-keys: minted a key for {name} (ECDSA P-384)")
    print(f"k8s-keys: {result.secret} {result.action}")
    if result.public_keys:
        print("k8s-keys: public keys to register with the SuperLink:")
        for name, line in result.public_keys.items():
            print(f"{name}: {line}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
