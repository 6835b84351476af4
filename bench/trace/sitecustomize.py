"""Per-request trace of a federation (bench.federation --trace DIR): loaded at interpreter start-up by every
process whose PYTHONPATH starts with this folder, active only when FEDTUNE_TRACE_DIR is set.

It times, per process, every protobuf-over-HTTP call Flower makes (`ProtobufClient._unary_unary`: SuperNode
to SuperLink, ClientApp to SuperNode, ServerApp to SuperLink) and the object and message handlers of the
SuperLink and the SuperNode, one JSON line each in DIR/<pid>.jsonl. Modules are patched when they are first
imported, so a process that never imports Flower pays nothing. bench/request_trace.py reads the folder.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import threading
import time
from typing import Any

TRACE_DIR = os.environ.get("FEDTUNE_TRACE_DIR", "")
CLIENT_MODULE = "flwr.supercore.protobuf.client"
HANDLER_MODULES = {  # module -> what the analyzer calls its handlers
    "flwr.superlink.servicer.fleet.fleet_handlers": "fleet",
    "flwr.superlink.servicer.runtime.runtime_handlers": "runtime",
    "flwr.supernode.servicer.runtime.runtime_handlers": "node-runtime",
}
HANDLERS = ("push_object", "pull_object", "push_messages", "pull_messages")


class TraceFile:
    def __init__(self, folder: str) -> None:
        self._lock = threading.Lock()
        self._file = open(os.path.join(folder, f"{os.getpid()}.jsonl"), "a", buffering=1)  # noqa: SIM115
        self.write({"argv": command_line()})

    def write(self, record: dict[str, Any]) -> None:
        with self._lock:
            self._file.write(json.dumps(record) + "\n")

    def span(self, kind: str, name: str, nbytes: int, start: float) -> None:
        self.write({"kind": kind, "name": name, "bytes": nbytes, "start": start, "end": time.time(),
                    "thread": threading.get_ident()})


def command_line() -> list[str]:
    """This process's whole command line: at start-up `sys.argv` of `python -m X` does not name X yet."""
    try:
        with open("/proc/self/cmdline", "rb") as cmdline:
            return [part.decode(errors="replace") for part in cmdline.read().split(b"\0") if part]
    except OSError:
        return list(sys.argv)


def content_bytes(message: Any) -> int:
    """Bytes of an object request's or response's payload (0 for other messages)."""
    content = getattr(message, "object_content", None)
    return len(content) if isinstance(content, bytes) else 0


def patch_client(module: Any, trace: TraceFile) -> None:
    original = module.ProtobufClient._unary_unary

    def unary_unary(self: Any, *, path: str, request: Any, **kwargs: Any) -> Any:
        start = time.time()
        response = original(self, path=path, request=request, **kwargs)
        trace.span("client", path, content_bytes(request) or content_bytes(response), start)
        return response

    module.ProtobufClient._unary_unary = unary_unary


def patch_handlers(module: Any, prefix: str, trace: TraceFile) -> None:
    for name in HANDLERS:
        original = getattr(module, name, None)
        if original is None:
            continue

        def handler(*args: Any, _original: Any = original, _name: str = f"{prefix}.{name}",
                    **kwargs: Any) -> Any:
            start = time.time()
            response = _original(*args, **kwargs)
            request = kwargs.get("request", args[0] if args else None)
            trace.span("handler", _name, content_bytes(request) or content_bytes(response), start)
            return response

        setattr(module, name, handler)


class PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds the modules above with the normal machinery and patches each right after it has run."""

    def __init__(self, trace: TraceFile) -> None:
        self.trace = trace

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != CLIENT_MODULE and fullname not in HANDLER_MODULES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        loader, trace = spec.loader, self.trace

        class PatchingLoader(importlib.abc.Loader):
            def create_module(self, spec: Any) -> Any:
                return loader.create_module(spec)

            def exec_module(self, module: Any) -> None:
                loader.exec_module(module)
                if fullname == CLIENT_MODULE:
                    patch_client(module, trace)
                else:
                    patch_handlers(module, HANDLER_MODULES[fullname], trace)

        spec.loader = PatchingLoader()
        return spec


def chain_next_sitecustomize() -> None:
    """Run the sitecustomize this one shadows, if the environment has one."""
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        candidate = os.path.join(entry or ".", "sitecustomize.py")
        if os.path.abspath(entry or ".") != here and os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location("_shadowed_sitecustomize", candidate)
            if spec and spec.loader:
                spec.loader.exec_module(importlib.util.module_from_spec(spec))
            return


if TRACE_DIR:
    try:
        os.makedirs(TRACE_DIR, exist_ok=True)
        sys.meta_path.insert(0, PatchOnImport(TraceFile(TRACE_DIR)))
    except OSError as err:  # tracing must never stop a process from starting
        print(f"fedtune trace: off in this process ({err})", file=sys.stderr)
chain_next_sitecustomize()
