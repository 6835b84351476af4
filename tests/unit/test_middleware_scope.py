"""fedtune/middleware_scope.py on Flower's real SuperLink middleware stack: the six one-API layers are
wrapped in place, the rest untouched; a wrapped layer runs on its own API's paths and is skipped on others."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import pytest

from fedtune import middleware_scope


def flower_stack() -> list[Any]:
    import flwr.superlink.main as superlink_main

    return list(superlink_main._get_middleware())


def test_flowers_one_api_layers_are_wrapped_in_place_and_the_rest_kept():
    from flwr.supercore.protobuf.translation import ProtobufTranslationMiddleware

    stack = flower_stack()
    layers = middleware_scope.scoped_layers()
    scoped = middleware_scope.scope(stack, layers)
    assert len(scoped) == len(stack)
    wrapped = 0
    for before, after in zip(stack, scoped, strict=True):
        if before.cls in layers:
            wrapped += 1
            assert after.cls is middleware_scope.OnlyOnPaths
            assert after.kwargs["middleware"] is before.cls
            assert after.kwargs["prefix"] == layers[before.cls]
        else:
            assert after is before
    assert wrapped == 6  # Flower 1.42: four Control layers, node auth, the Fleet event log
    assert ProtobufTranslationMiddleware in [entry.cls for entry in scoped]  # every API needs it


class Recording:
    """A Starlette-style middleware class: records the paths it saw, then calls through."""

    seen: ClassVar[list[str]] = []

    def __init__(self, app: Any, tag: str = "") -> None:
        self.app, self.tag = app, tag

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        Recording.seen.append(f"{self.tag}{scope['path']}")
        await self.app(scope, receive, send)


def test_a_scoped_layer_sees_only_its_apis_requests():
    reached: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])

    Recording.seen = []
    layer = middleware_scope.OnlyOnPaths(app, Recording, "/v1/fleet/", kwargs={"tag": "auth:"})

    async def call(path: str, kind: str = "http") -> None:
        await layer({"type": kind, "path": path, "root_path": "", "scheme": "https", "server": ("x", 1),
                     "query_string": b"", "headers": []}, None, None)

    for path in ("/v1/fleet/push-object", "/v1/runtime/push-object", "/v1/control/list-runs", "/health"):
        asyncio.run(call(path))
    asyncio.run(call("/v1/runtime/x", kind="lifespan"))  # not HTTP: through the layer, as Starlette does
    assert Recording.seen == ["auth:/v1/fleet/push-object", "auth:/v1/runtime/x"]
    assert reached == ["/v1/fleet/push-object", "/v1/runtime/push-object", "/v1/control/list-runs", "/health",
                       "/v1/runtime/x"]


def test_off_switch_keeps_flowers_stack(monkeypatch: pytest.MonkeyPatch):
    import flwr.superlink.main as superlink_main

    monkeypatch.setattr(superlink_main, "_get_middleware", superlink_main._get_middleware)
    monkeypatch.setenv(middleware_scope.ENV, "0")
    assert middleware_scope.scope_superlink_middleware() is False
    assert all(entry.cls is not middleware_scope.OnlyOnPaths for entry in flower_stack())
    monkeypatch.setenv(middleware_scope.ENV, "1")
    assert middleware_scope.scope_superlink_middleware() is True
    assert middleware_scope.scope_superlink_middleware() is True  # idempotent
    assert sum(entry.cls is middleware_scope.OnlyOnPaths for entry in flower_stack()) == 6
