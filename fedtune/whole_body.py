"""Hand Flower's HTTP middleware a request body in one piece instead of uvicorn's 64 KiB pieces.

Flower's SuperLink stacks eight Starlette `BaseHTTPMiddleware` layers (the SuperNode one), four of them
outside the protobuf translation that reads the whole body. Each of those layers passes every ASGI
`http.request` message through its `receive_or_disconnect`, which opens an anyio task group and cancels it:
for a 5 MiB object uvicorn delivers ~80 messages (it pauses reading at 64 KiB), so a SuperLink spends ~320
task groups on one push, per hop, in the one event loop every node and the ServerApp share.

`WholeRequestBody` sits outside all of them and reads the body first, the way the protobuf translation
would read it anyway, then hands the layers inside one message with all of it. The request is the same byte
for byte; a client that goes away mid-body is seen as the disconnect it is. Pure ASGI, so it adds no task
group of its own. Applied by `superlink/flower_entry.py` and `supernode/flower_entry.py`
(FEDTUNE_WHOLE_BODY=0 keeps Flower's stack as it is).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fedtune.patching import wrap_once
from fedtune.runtime_env import env_tristate

ENV = "FEDTUNE_WHOLE_BODY"
_PATCHED = "_fedtune_whole_body"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class WholeRequestBody:
    """ASGI middleware: read an HTTP request's body, then replay it to `app` as one message."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        first = await read_whole_body(receive)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()  # after the body: only a disconnect can come

        await self.app(scope, replay, send)


async def read_whole_body(receive: Receive) -> Message:
    """The request's `http.request` messages as one, or the `http.disconnect` that cut them short."""
    pieces: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return message
        pieces.append(message.get("body", b""))
        if not message.get("more_body", False):
            body = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            return {"type": "http.request", "body": body, "more_body": False}


def enabled() -> bool:
    return env_tristate(ENV) is not False  # on unless set to 0/false


def read_bodies_whole_in_superlink() -> None:
    """Put `WholeRequestBody` outside the SuperLink's middleware (`flwr.superlink.main._get_middleware`,
    which its `create_app` calls). Idempotent; nothing when FEDTUNE_WHOLE_BODY=0."""
    if not enabled():
        return
    import flwr.superlink.main as superlink_main
    from starlette.middleware import Middleware

    def outside(flower_stack: Callable[[], list[Middleware]]) -> Callable[[], list[Middleware]]:
        return lambda: [Middleware(WholeRequestBody), *flower_stack()]

    wrap_once(superlink_main, "_get_middleware", outside, _PATCHED)


def read_bodies_whole_in_supernode() -> None:
    """The same for the SuperNode's local Runtime API app (`flwr.supernode.main.create_app`): the ClientApp
    pushes its reply's objects there. Idempotent; nothing when FEDTUNE_WHOLE_BODY=0."""
    if not enabled():
        return
    import flwr.supernode.main as supernode_main

    def reading_whole_bodies(create_app: Callable[..., Any]) -> Callable[..., Any]:
        def create_app_reading_whole_bodies(*args: Any, **kwargs: Any) -> Any:
            app = create_app(*args, **kwargs)
            app.add_middleware(WholeRequestBody)  # added last = outermost
            return app

        return create_app_reading_whole_bodies

    wrap_once(supernode_main, "create_app", reading_whole_bodies, _PATCHED)
