"""Flower's Control- and Fleet-only HTTP middleware runs on its own API's requests only.

The SuperLink serves the Fleet, Runtime and Control APIs through one Starlette app with eight middleware
layers (`flwr.superlink.main._get_middleware`), each a `BaseHTTPMiddleware`: per request and layer an anyio
task group, memory streams and a streaming wrapper around the response. Six of them act on one API's paths
and call straight through for every other request: the four Control layers (no-cache headers on its login
routes, account authentication, the license check, the event log) only on `/v1/control/`, node
authentication and the Fleet event log only on `/v1/fleet/`. A round's traffic is Fleet and Runtime
requests (every adapter chunk twice on each), and the SuperLink's event loop spent most of its time in
these layers (py-spy `--gil` on the SuperLink during a federation, bench/RESULTS.md session 12).

`OnlyOnPaths` wraps such a layer in a pure-ASGI check of the request's path (Flower's own test,
`request.url.path.startswith(...)`): its own API's requests go through the layer exactly as before, the
others skip the pass-through. The two layers every API needs (error translation, protobuf translation)
stay as they are. Applied by `superlink/flower_entry.py`; FEDTUNE_SCOPED_MIDDLEWARE=0 keeps Flower's stack.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fedtune.patching import wrap_once
from fedtune.runtime_env import env_tristate
from fedtune.whole_body import ASGIApp, Receive, Scope, Send

ENV = "FEDTUNE_SCOPED_MIDDLEWARE"
CONTROL_PATHS = "/v1/control/"
FLEET_PATHS = "/v1/fleet/"
_PATCHED = "_fedtune_middleware_scope"


class OnlyOnPaths:
    """ASGI middleware: `middleware` (a Starlette middleware class) for HTTP requests whose path starts with
    `prefix`; every other request goes to `app` directly."""

    def __init__(
        self,
        app: ASGIApp,
        middleware: type[Any],
        prefix: str,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.app = app
        self.prefix = prefix
        self.inner = middleware(app, *args, **dict(kwargs or {}))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not _path(scope).startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        await self.inner(scope, receive, send)


def _path(scope: Scope) -> str:
    from starlette.datastructures import URL

    return URL(scope=scope).path  # what Flower's layers test (`request.url.path`)


def scoped_layers() -> dict[type[Any], str]:
    """Flower's one-API middleware classes -> the path prefix they act on."""
    from flwr.superlink.routers.control.middlewares import (
        ControlAuthenticationMiddleware,
        ControlEventLogMiddleware,
        ControlLicenseMiddleware,
        ControlSensitiveResponseMiddleware,
    )
    from flwr.superlink.routers.fleet.middlewares import FleetEventLogMiddleware
    from flwr.superlink.routers.fleet.node_auth import NodeAuthMiddleware

    return {
        ControlSensitiveResponseMiddleware: CONTROL_PATHS,
        ControlAuthenticationMiddleware: CONTROL_PATHS,
        ControlLicenseMiddleware: CONTROL_PATHS,
        ControlEventLogMiddleware: CONTROL_PATHS,
        NodeAuthMiddleware: FLEET_PATHS,
        FleetEventLogMiddleware: FLEET_PATHS,
    }


def scope(stack: list[Any], layers: Mapping[type[Any], str]) -> list[Any]:
    """`stack` (Starlette `Middleware` entries, outermost first) with each of `layers` wrapped in
    OnlyOnPaths, in its place; the rest as they are."""
    from starlette.middleware import Middleware

    scoped = []
    for entry in stack:
        prefix = layers.get(entry.cls)
        if prefix is None:
            scoped.append(entry)
        else:
            scoped.append(Middleware(OnlyOnPaths, middleware=entry.cls, prefix=prefix,
                                     args=tuple(entry.args), kwargs=dict(entry.kwargs)))
    return scoped


def enabled() -> bool:
    return env_tristate(ENV) is not False  # on unless set to 0/false


def scope_superlink_middleware() -> bool:
    """Wrap the SuperLink's one-API layers (`flwr.superlink.main._get_middleware`, which its `create_app`
    calls). Idempotent; False (nothing changed) when FEDTUNE_SCOPED_MIDDLEWARE=0."""
    if not enabled():
        return False
    import flwr.superlink.main as superlink_main

    layers = scoped_layers()

    def scoping(flower_stack: Callable[[], list[Any]]) -> Callable[[], list[Any]]:
        return lambda: scope(flower_stack(), layers)

    wrap_once(superlink_main, "_get_middleware", scoping, _PATCHED)
    return True
