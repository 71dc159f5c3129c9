"""The gateway's access log: one line per HTTP request, written when it ends.

    PUT /tasks 200 5.2ms 127.0.0.1:50422 UpdateTask OK token 3 (wrapper)

The line gives the HTTP method, the path as received (with its query), the
HTTP status, the time to the end of the response (for a stream: its whole
life), the client's address, then whatever the code serving the request
added with `note`. A server whose handlers run in this process (through a
`LocalUpstream`) can thereby put what it knows, such as the gRPC method,
status code and caller, on the same line instead of logging a second one.
"""

from __future__ import annotations

import logging
import re
import time
from contextvars import ContextVar
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_UNPRINTABLE = re.compile(rb"[^\x21-\x7e]")

# The notes of the HTTP request being served in this task (and in tasks it
# starts), each with how many times in a row it came; None outside a request.
_NOTES: ContextVar[list[list[Any]] | None] = ContextVar("gateway_access_notes", default=None)


def note(text: str) -> bool:
    """Add text to the access line of the HTTP request being served. The same
    text again (each page of a list the gateway follows, say) is counted,
    not repeated.

    False when no request is being served here, or the access log is off:
    the caller then logs on its own.
    """
    notes = _NOTES.get()
    if notes is None:
        return False
    if notes and notes[-1][0] == text:
        notes[-1][1] += 1
    else:
        notes.append([text, 1])
    return True


class AccessLog:
    """ASGI middleware that writes each HTTP request's access line to a logger."""

    def __init__(self, app: ASGIApp, logger: str) -> None:
        self.app = app
        self.log = logging.getLogger(logger)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.log.isEnabledFor(logging.INFO):
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        notes: list[list[Any]] = []
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        reset = _NOTES.set(notes)
        try:
            await self.app(scope, receive, send_status)
        except BaseException:
            status = status or 500  # what the server answers in its place
            raise
        finally:
            _NOTES.reset(reset)
            elapsed_ms = (time.perf_counter() - start) * 1000
            self.log.info(
                "%s %s %s %.1fms %s%s",
                scope["method"],
                _target(scope),
                status or "-",
                elapsed_ms,
                _client(scope),
                "".join(
                    f" {text} [{count} calls]" if count > 1 else f" {text}" for text, count in notes
                ),
            )


def _target(scope: Scope) -> str:
    # The path as it came, still percent-encoded, and any byte that is not
    # printable ASCII escaped: a decoded path could hold a space or a line
    # break and forge a field or a whole log line.
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope.get("query_string", b"")
    target = raw + b"?" + query if query else raw
    return _UNPRINTABLE.sub(lambda byte: b"\\x%02x" % byte[0][0], target).decode("ascii")


def _client(scope: Scope) -> str:
    client = scope.get("client")
    if not client:
        return "-"
    host, port = client
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
