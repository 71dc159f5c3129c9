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

import functools
import ipaddress
import logging
import re
import time
from contextvars import ContextVar
from typing import Any
from urllib.parse import unquote_to_bytes

from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Bytes of a request target or client address that go into the line escaped:
# all but printable ASCII, and the backslash that starts an escape.
_UNPRINTABLE = re.compile(rb"[^\x21-\x5b\x5d-\x7e]")
# Characters of other text that go in escaped: whatever could end a line
# (Python's str.splitlines breaks at all of these), and the invisible ones
# that reorder or hide text (bidirectional controls, zero-width characters).
_DISGUISING = r"\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff"
# And the backslash, which starts an escape.
_LINE_BREAKING = re.compile(rf"[{_DISGUISING}\\]")
# In JSON text a backslash already starts one of JSON's own escapes.
_DISGUISING_IN_JSON = re.compile(f"[{_DISGUISING}]")


class _Notes:
    """What the code serving one HTTP request added to its access line."""

    def __init__(self) -> None:
        # [text, times in a row]
        self.items: list[list[Any]] = []
        # Set once the line is written: a later note would be lost.
        self.closed = False

    def render(self) -> str:
        return "".join(
            f" {text} [{count} calls]" if count > 1 else f" {text}" for text, count in self.items
        )


# The notes of the HTTP request being served in this task (and in tasks it
# starts), or None outside one.
_NOTES: ContextVar[_Notes | None] = ContextVar("gateway_access_notes", default=None)


def note(text: str) -> bool:
    """Add text to the access line of the HTTP request being served. The same
    text again (each page of a list the gateway follows, say) is counted,
    not repeated. Text from outside (a name, a description) should go
    through `escape` first.

    False when no request is being served here, its line has been written
    already, or the access log is off: the caller then logs on its own.
    """
    notes = _NOTES.get()
    if notes is None or notes.closed:
        return False
    if notes.items and notes.items[-1][0] == text:
        notes.items[-1][1] += 1
    else:
        notes.items.append([text, 1])
    return True


def escape(text: str) -> str:
    """text with anything that could break a log line or disguise it (and
    backslashes) as \\xNN or \\uNNNN escapes, so that it cannot forge a line."""
    return _LINE_BREAKING.sub(_escaped_character, text)


def _escaped_character(match: re.Match[str]) -> str:
    number = ord(match[0])
    return f"\\x{number:02x}" if number < 0x100 else f"\\u{number:04x}"


def escape_json(text: str) -> str:
    """JSON text on one line (json.dumps's without indent, ensure_ascii=False)
    with the characters escape escapes as JSON's \\uNNNN escapes: the same
    JSON, and still one line of text that reads as it is (json.dumps escapes
    only those below U+0020)."""
    return _DISGUISING_IN_JSON.sub(_json_escaped_character, text)


def _json_escaped_character(match: re.Match[str]) -> str:
    return f"\\u{ord(match[0]):04x}"


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
        notes = _Notes()
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
            notes.closed = True
            elapsed_ms = (time.perf_counter() - start) * 1000
            self.log.info(
                "%s %s %s %.1fms %s%s",
                scope["method"],
                _target(scope),
                status or "-",
                elapsed_ms,
                _client(scope),
                notes.render(),
            )


def _target(scope: Scope) -> str:
    # The path as it came, still percent-encoded, and any byte that is not
    # printable ASCII escaped: a decoded path could hold a space or a line
    # break and forge a field or a whole log line.
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    query: bytes = scope.get("query_string", b"")
    if query:
        query = b"&".join(map(_hidden_secret, query.split(b"&")))
    return _escaped_bytes(raw + b"?" + query if query else raw)


# The name of a query parameter a client may have put a secret in, once
# percent-decoded and lowercased: a token (access_token, sessiontoken, and
# so page_token too), a key (api_key, apikey), a secret, a password (passwd,
# pwd, pass, pw) or passphrase, an authorization or bearer value, a session,
# credentials, a signature (sig) or a one-time code or pass code (otp, totp,
# hotp, passcode, pin). Its value is not logged.
_SECRET_NAME = re.compile(
    rb"token|key|secret|passw|passphrase|passcode|pwd|auth|bearer|session|credential|signature"
    rb"|(?<![a-z])(?:pass|pw|sig|otp|totp|hotp|pin)(?![a-z])"
)


_CAMEL_WORD = re.compile(rb"([a-z0-9])([A-Z])")


def _hidden_secret(parameter: bytes) -> bytes:
    """A query parameter as sent, but for the value of one named like a
    secret, which is ***. The name is matched as the server reads it
    (decoded): %74oken= is token=."""
    name, equals, _ = parameter.partition(b"=")
    if equals:
        read = unquote_to_bytes(name.replace(b"+", b" "))
        # camelCase words apart, as snake_case's are: userPin as user_pin.
        if _SECRET_NAME.search(_CAMEL_WORD.sub(rb"\1_\2", read).lower()):
            return name + b"=***"
    return parameter


def _client(scope: Scope) -> str:
    client = scope.get("client")
    if not client:
        return "-"
    host, port = client
    # Port 0 is none: a proxy's X-Forwarded-For gives the client's host alone.
    return f"{_host(str(host))}:{port}" if port else _host(str(host))


@functools.lru_cache(maxsize=1024)
def _host(host: str) -> str:
    """The client's host as the line gives it (cached: a few clients make
    most requests, and parsing the address was about 5 % of a request's CPU)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        # Not an address: a proxy header (X-Forwarded-For) can put any text here.
        return _escaped_bytes(host.encode())
    return f"[{address}]" if address.version == 6 else str(address)


def _escaped_bytes(data: bytes) -> str:
    return _UNPRINTABLE.sub(lambda byte: b"\\x%02x" % byte[0][0], data).decode("ascii")
