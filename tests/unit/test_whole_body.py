"""fedtune/whole_body.py: a request body reaches Flower's middleware as one message, byte for byte; a
disconnect mid-body stays a disconnect; Flower's real SuperLink and SuperNode apps answer a request sent in
uvicorn-sized pieces exactly as they do without it, and FEDTUNE_WHOLE_BODY=0 leaves their stacks alone."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import pytest
from flwr.proto.message_pb2 import PushObjectRequest  # pylint: disable=no-name-in-module

from fedtune import whole_body
from fedtune.whole_body import WholeRequestBody

PIECE = 64 * 1024  # what uvicorn hands over at a time (its HIGH_WATER_LIMIT)


def pieces_of(body: bytes) -> Any:
    """An ASGI receive giving `body` in PIECE-sized `http.request` messages, then disconnects."""
    messages = [
        {"type": "http.request", "body": body[i:i + PIECE], "more_body": i + PIECE < len(body)}
        for i in range(0, len(body), PIECE)
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    return receive


class Recorder:
    """An inner ASGI app that reads every message it can until a disconnect, then answers 204."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            self.seen.append(message)
            if message["type"] == "http.disconnect" or len(self.seen) > 1:
                break
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


async def no_send(_message: dict[str, Any]) -> None:
    return None


def test_pieces_reach_the_app_as_one_message() -> None:
    body = os.urandom(5 * 1024 * 1024 + 123)
    inner = Recorder()
    asyncio.run(WholeRequestBody(inner)({"type": "http"}, pieces_of(body), no_send))
    first, after = inner.seen
    assert first == {"type": "http.request", "body": body, "more_body": False}
    assert after == {"type": "http.disconnect"}  # what comes after the body is the client's own


def test_a_disconnect_mid_body_is_passed_on() -> None:
    receive = pieces_of(os.urandom(3 * PIECE))
    truncated = []

    async def cut_short() -> dict[str, Any]:  # the client goes away after the second piece
        if len(truncated) == 2:
            return {"type": "http.disconnect"}
        truncated.append(await receive())
        return truncated[-1]

    inner = Recorder()
    asyncio.run(WholeRequestBody(inner)({"type": "http"}, cut_short, no_send))
    assert inner.seen[0] == {"type": "http.disconnect"}


def test_other_scopes_pass_through() -> None:
    seen = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append((scope["type"], await receive()))

    async def receive() -> dict[str, Any]:
        return {"type": "lifespan.startup"}

    asyncio.run(WholeRequestBody(app)({"type": "lifespan"}, receive, no_send))
    assert seen == [("lifespan", {"type": "lifespan.startup"})]


def answer(app: Any, path: str, body: bytes) -> tuple[int, bytes]:
    """Status and body of `app`'s answer to a protobuf POST whose body comes in PIECE-sized messages."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/protobuf"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000), "state": {},
    }
    asyncio.run(app(scope, pieces_of(body), send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


@pytest.fixture
def flower_factories(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Flower's own factories come back after the test."""
    import flwr.superlink.main as superlink_main
    import flwr.supernode.main as supernode_main

    monkeypatch.setattr(superlink_main, "_get_middleware", superlink_main._get_middleware)
    monkeypatch.setattr(supernode_main, "create_app", supernode_main.create_app)
    yield


def push_object_request() -> bytes:
    content = os.urandom(2 * 1024 * 1024)
    return PushObjectRequest(object_id="0" * 64, object_content=content).SerializeToString()


@pytest.mark.usefixtures("flower_factories")
@pytest.mark.parametrize("role", ["superlink", "supernode"])
def test_flower_answers_the_same(role: str) -> None:
    """The real apps: a 2 MiB push-object for an unknown run is refused the same way, with or without."""
    import flwr.superlink.main as superlink_main
    import flwr.supernode.main as supernode_main

    def build() -> Any:
        return superlink_main.create_app() if role == "superlink" else supernode_main.create_app()

    path = "/v1/fleet/push-object" if role == "superlink" else "/v1/runtime/push-object"
    body = push_object_request()
    flower = answer(build(), path, body)
    (whole_body.read_bodies_whole_in_superlink if role == "superlink"
     else whole_body.read_bodies_whole_in_supernode)()
    app = build()
    stack = [m.cls for m in app.user_middleware]
    assert stack[0] is WholeRequestBody and stack.count(WholeRequestBody) == 1
    assert flower[0] >= 400 and answer(app, path, body) == flower


@pytest.mark.usefixtures("flower_factories")
def test_idempotent_and_off_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.superlink.main as superlink_main
    import flwr.supernode.main as supernode_main

    monkeypatch.setenv(whole_body.ENV, "0")
    whole_body.read_bodies_whole_in_superlink()
    whole_body.read_bodies_whole_in_supernode()
    assert all(m.cls is not WholeRequestBody for m in superlink_main._get_middleware())
    assert all(m.cls is not WholeRequestBody for m in supernode_main.create_app().user_middleware)
    monkeypatch.delenv(whole_body.ENV)
    for _ in range(2):
        whole_body.read_bodies_whole_in_superlink()
        whole_body.read_bodies_whole_in_supernode()
    assert [m.cls for m in superlink_main._get_middleware()].count(WholeRequestBody) == 1
    assert [m.cls for m in supernode_main.create_app().user_middleware].count(WholeRequestBody) == 1
