"""What the in-process ASGI benchmarks share: the types, the route, a prebuilt request."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from hardening.adapters.asgi import ASGIApp, Message, Receive, Scope, Send

__all__ = ["SCOPE", "ASGIApp", "Message", "Receive", "Scope", "Send", "item", "receive"]


async def item(request: Request) -> Response:
    """The benchmarked route, ``/items/{item_id}``: it answers ``ok``."""
    return PlainTextResponse("ok")


SCOPE: Scope = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.4"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/items/42",
    "raw_path": b"/items/42",
    "root_path": "",
    "query_string": b"",
    "headers": [(b"host", b"testserver"), (b"user-agent", b"bench")],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
    "state": {},
}


async def receive() -> Message:
    """An empty request body."""
    return {"type": "http.request", "body": b"", "more_body": False}
