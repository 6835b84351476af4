"""A tiny fake Kubernetes API server for the SuperNode key mint Job (fedtune/k8s_keys.py).

No cluster can run here, so the tests serve the few calls the Job makes, the way kube-apiserver answers
them: HTTPS with a CA the client must verify, a bearer token, real JSON `v1/Secret` objects with base64
`data`, `Status` objects for errors, JSON merge patches, and resourceVersion conflicts (409).

    with FakeKubeApi(tmp_path, namespace="federation") as api:
        api.env()                      # KUBERNETES_SERVICE_HOST/PORT for the client
        api.service_account_dir        # token, ca.crt, namespace: what the pod's projected volume holds
        api.secret("fedtune-supernode-auth")  # {key: bytes} of the stored Secret (or None)
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import re
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from fedtune.certs import ensure

ITEM = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/secrets/(?P<name>[^/?]+)$")
COLLECTION = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/secrets$")


def status(code: int, reason: str, message: str) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def merge_patch(target: object, patch: object) -> object:
    """RFC 7386 JSON merge patch, as the API server applies application/merge-patch+json."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class FakeKubeApi:
    def __init__(self, root: Path, namespace: str = "federation", token: str = "test-token") -> None:
        self.namespace = namespace
        self.token = token
        self.objects: dict[str, dict] = {}  # Secret name -> Secret object
        self.requests: list[tuple[str, str]] = []  # (method, path) in arrival order
        self.forbidden: set[str] = set()  # methods answered 403, as a Role without that verb
        self.before_write: Callable[[FakeKubeApi], None] | None = None  # a concurrent writer
        self._version = 0
        self._lock = threading.Lock()
        tls, _ = ensure(root / "apiserver-tls", ["127.0.0.1"])
        self.service_account_dir = root / "serviceaccount"
        self.service_account_dir.mkdir(parents=True, exist_ok=True)
        (self.service_account_dir / "token").write_text(token + "\n")
        (self.service_account_dir / "ca.crt").write_bytes(tls.ca_cert.read_bytes())
        (self.service_account_dir / "namespace").write_text(namespace)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tls.server_cert, tls.server_key)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # ------------------------------------------------------------------ lifecycle and helpers

    def __enter__(self) -> FakeKubeApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def env(self) -> dict[str, str]:
        return {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(self.port)}

    def secret(self, name: str) -> dict[str, bytes] | None:
        with self._lock:
            obj = self.objects.get(name)
            if obj is None:
                return None
            return {key: base64.b64decode(value) for key, value in obj.get("data", {}).items()}

    def store(self, name: str, data: dict[str, bytes]) -> None:
        """Put a Secret in place, as if created earlier (by a previous install or by hand)."""
        with self._lock:
            self.objects[name] = self._stamp(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": name, "namespace": self.namespace},
                    "type": "Opaque",
                    "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
                }
            )

    def resource_version(self, name: str) -> str:
        return self.objects[name]["metadata"]["resourceVersion"]

    def _stamp(self, obj: dict) -> dict:
        self._version += 1
        obj["metadata"]["resourceVersion"] = str(self._version)
        obj["metadata"].setdefault("uid", f"uid-{obj['metadata']['name']}")
        obj["metadata"].setdefault("creationTimestamp", "2025-01-01T00:00:00Z")
        return obj

    # ------------------------------------------------------------------ the API

    def _handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict]:
        self.requests.append((method, path))
        if headers.get("authorization") != f"Bearer {self.token}":
            return 401, status(401, "Unauthorized", "Unauthorized")
        item, collection = ITEM.match(path), COLLECTION.match(path)
        match = item or collection
        if not match:
            return 404, status(404, "NotFound", f"the server could not find the requested resource ({path})")
        namespace = match["ns"]
        if method in self.forbidden:
            verb = {"GET": "get", "POST": "create", "PATCH": "patch"}.get(method, method.lower())
            what = f'secrets "{item["name"]}"' if item else "secrets"
            return 403, status(
                403,
                "Forbidden",
                f'{what} is forbidden: User "system:serviceaccount:{namespace}:mint" cannot {verb} '
                f'resource "secrets" in API group "" in the namespace "{namespace}"',
            )
        if namespace != self.namespace:
            return 404, status(404, "NotFound", f'namespaces "{namespace}" not found')
        if method == "GET" and item:
            obj = self.objects.get(item["name"])
            if obj is None:
                return 404, status(404, "NotFound", f'secrets "{item["name"]}" not found')
            return 200, copy.deepcopy(obj)
        if method == "POST" and collection:
            return self._create(headers, body)
        if method == "PATCH" and item:
            return self._patch(item["name"], headers, body)
        return 405, status(405, "MethodNotAllowed", f"{method} is not supported by this fake on {path}")

    def _decode(self, headers: dict[str, str], body: bytes, content_type: str) -> dict | None:
        if headers.get("content-type", "").split(";")[0].strip() != content_type:
            return None
        value = json.loads(body)
        return value if isinstance(value, dict) else None

    def _valid_data(self, obj: dict) -> str:
        for key, value in (obj.get("data") or {}).items():
            if not re.match(r"^[-._a-zA-Z0-9]+$", key):
                return f"data[{key}]: invalid key"
            try:
                base64.b64decode(value, validate=True)
            except (binascii.Error, TypeError):
                return f"data[{key}]: illegal base64 data"
        return ""

    def _create(self, headers: dict[str, str], body: bytes) -> tuple[int, dict]:
        obj = self._decode(headers, body, "application/json")
        if obj is None or obj.get("kind") != "Secret" or obj.get("apiVersion") != "v1":
            return 400, status(400, "BadRequest", "expected a v1 Secret as application/json")
        name = obj.get("metadata", {}).get("name", "")
        if obj["metadata"].get("namespace", self.namespace) != self.namespace:
            return 400, status(400, "BadRequest", "the namespace of the object does not match the request")
        if problem := self._valid_data(obj):
            return 422, status(422, "Invalid", f'Secret "{name}" is invalid: {problem}')
        if self.before_write:
            self.before_write(self)
        with self._lock:
            if name in self.objects:
                return 409, status(409, "AlreadyExists", f'secrets "{name}" already exists')
            obj["metadata"]["namespace"] = self.namespace
            self.objects[name] = self._stamp(obj)
            return 201, copy.deepcopy(obj)

    def _patch(self, name: str, headers: dict[str, str], body: bytes) -> tuple[int, dict]:
        patch = self._decode(headers, body, "application/merge-patch+json")
        if patch is None:
            return 415, status(415, "UnsupportedMediaType", "expected application/merge-patch+json")
        if self.before_write:
            self.before_write(self)
        with self._lock:
            current = self.objects.get(name)
            if current is None:
                return 404, status(404, "NotFound", f'secrets "{name}" not found')
            wanted = (patch.get("metadata") or {}).get("resourceVersion")
            if wanted is not None and wanted != current["metadata"]["resourceVersion"]:
                return 409, status(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on secrets "{name}": the object has been modified; '
                    "please apply your changes to the latest version and try again",
                )
            updated = merge_patch(current, patch)
            if problem := self._valid_data(updated):
                return 422, status(422, "Invalid", f'Secret "{name}" is invalid: {problem}')
            self.objects[name] = self._stamp(updated)
            return 200, copy.deepcopy(updated)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                headers = {k.lower(): v for k, v in self.headers.items()}
                code, payload = api._handle(self.command, self.path, headers, body)
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _serve

            def log_message(self, format: str, *args: object) -> None:  # keep test output clean
                pass

        return Handler
