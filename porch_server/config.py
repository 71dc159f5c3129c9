"""porch's settings: one frozen object, built once by the command line."""

from __future__ import annotations

import argparse
import math
import os
import re
import ssl
import tempfile
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

DEFAULT_DB_URL = "sqlite:///porch.db"
# npg_porch's names for its database, honoured after porch's own.
NPG_PORCH_VARIABLES = ("DB_URL", "DB_SCHEMA")
# What a gRPC client or server takes in one message unless told otherwise.
# porch's server keeps its answers within it, and takes no more itself: a
# call from a known token is read whole before the rest of it is checked.
GRPC_MESSAGE_BYTES = 4 * 1024 * 1024
# The largest answer porch's gateway and CLI take, should a server of
# another version send more.
RECEIVE_LIMIT = ("grpc.max_receive_message_length", 64 * 1024 * 1024)
# The longest a channel waits between tries to reach a server it lost. gRPC's
# own backoff grows to two minutes: `porch gateway` would go on answering
# 503 that long after its server came back.
RECONNECT_BACKOFF = ("grpc.max_reconnect_backoff_ms", 5_000)
# The options of every channel porch's gateway and CLI open to a server.
CHANNEL_OPTIONS = (RECEIVE_LIMIT, RECONNECT_BACKOFF)


# WatchEvents streams a server process keeps open at once, by default: each
# holds about 14 KB of its memory.
DEFAULT_MAX_STREAMS = 10_000
# ... and of them, those one token may hold (the anonymous readers of
# --anonymous-reads together count as one): no single caller takes every
# place. Unless given, a tenth of the streams kept, at least one.
STREAMS_PER_TOKEN_SHARE = 10


def streams_per_token(max_streams: int) -> int:
    """The streams one token may hold unless given, of max_streams."""
    return max(1, max_streams // STREAMS_PER_TOKEN_SHARE)


DEFAULT_MAX_STREAMS_PER_TOKEN = streams_per_token(DEFAULT_MAX_STREAMS)


@dataclass(frozen=True, slots=True)
class TLS:
    """A certificate and key to serve with, and optionally a CA to verify clients."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        """Return the certificate, key and client CA as bytes."""
        client_ca = (
            option_file("--tls-client-ca", self.client_ca_file) if self.client_ca_file else None
        )
        cert = option_file("--tls-cert", self.cert_file)
        key = option_file("--tls-key", self.key_file)
        check_pem(
            ("--tls-cert", self.cert_file),
            ("--tls-key", self.key_file),
            ("--tls-client-ca", self.client_ca_file) if self.client_ca_file else None,
        )
        return cert, key, client_ca

    def warnings(self, now: float | None = None) -> list[str]:
        """What is wrong with the times the certificates (the server's and
        its chain's) and the client CAs are valid for (see
        certificate_warnings), for the log at start."""
        found = certificate_warnings("--tls-cert", self.cert_file, now)
        if self.client_ca_file is not None:
            found += certificate_warnings("--tls-client-ca", self.client_ca_file, now, ca=True)
        return found


# Days before a certificate's end within which a server starting with it says so.
EXPIRY_WARNING_DAYS = 14

# A PEM certificate, whatever ends its lines (and spaces after its BEGIN line).
_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.DOTALL
)


def certificate_warnings(
    flag: str, path: Path, now: float | None = None, ca: bool = False
) -> list[str]:
    """Why each certificate of a PEM file would be refused now, or soon: it
    has expired, is not valid yet, or ends within EXPIRY_WARNING_DAYS;
    nothing for a file that cannot be read as one (check_pem says so).

    A server's certificate, or one of its chain, is refused by its clients
    at every handshake, and only they would say why; a client CA's (ca),
    by the server, for each client certificate it signed."""
    try:
        certificates = _PEM_CERTIFICATE.findall(path.read_bytes())
        # The standard library's one reader of a certificate's fields reads
        # a file: one scratch file, written again for each. Where no
        # temporary directory can be written (a read-only container),
        # nothing is warned of.
        with tempfile.TemporaryDirectory() as directory:
            scratch = Path(directory) / "certificate.pem"
            read = [_decoded(pem, scratch) for pem in certificates]
    except OSError:
        return []
    now = time.time() if now is None else now
    refused = "client certificates it signed are refused" if ca else "clients will refuse it"
    found = []
    for number, decoded in enumerate(read, 1):
        if decoded is None:
            continue
        not_before, not_after, subject = decoded
        which = "its certificate" if len(certificates) == 1 else f"its certificate {number}"
        named = f"{flag} {path}: {which}{f' ({subject})' if subject else ''}"
        if now >= not_after:
            found.append(f"{named} expired on {_day(not_after)}: {refused}")
        elif now < not_before:
            found.append(f"{named} is not valid until {_day(not_before)}: {refused} until then")
        elif not_after - now < EXPIRY_WARNING_DAYS * 86_400:
            found.append(f"{named} expires on {_day(not_after)}, in {_time_left(not_after - now)}")
    return found


def _decoded(pem: bytes, scratch: Path) -> tuple[float, float, str] | None:
    """A PEM certificate's start and end (seconds since the epoch) and its
    subject's common name (or ""), read through the file scratch; None if
    it cannot be read."""
    try:
        scratch.write_bytes(pem + b"\n")
        decoded = ssl._ssl._test_decode_cert(str(scratch))  # type: ignore[attr-defined]
        not_before = ssl.cert_time_to_seconds(decoded["notBefore"])
        not_after = ssl.cert_time_to_seconds(decoded["notAfter"])
    except (AttributeError, KeyError, ValueError, OSError):  # ssl.SSLError is an OSError
        return None
    names = [
        value for rdn in decoded.get("subject", ()) for key, value in rdn if key == "commonName"
    ]
    return not_before, not_after, f"CN={names[0]}" if names else ""


def _time_left(seconds: float) -> str:
    """Time to a certificate's end, in whole hours within a day, else in
    whole days, neither rounded up (13.6 days are 13 days)."""
    if seconds < 86_400:
        hours = max(1, int(seconds // 3_600))
        return f"{hours} hour{'s' if hours > 1 else ''}"
    days = int(seconds // 86_400)
    return f"{days} day{'s' if days > 1 else ''}"


def _day(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M UTC")


def check_pem(
    cert: tuple[str, Path] | None, key: tuple[str, Path] | None, ca: tuple[str, Path] | None
) -> None:
    """OSError naming the option when a certificate and its key, or a file of
    CA certificates, cannot be used: at start, rather than at every
    handshake. Each is (option, file)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if cert is not None and key is not None:

        def encrypted() -> bytes:
            raise OSError(f"{key[0]} {key[1]}: the key is encrypted; give an unencrypted one")

        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cert[1])
        except ssl.SSLError:
            raise OSError(f"{cert[0]} {cert[1]}: not a PEM certificate") from None
        try:
            context.load_cert_chain(cert[1], key[1], password=encrypted)
        except ssl.SSLError as error:
            if error.reason == "KEY_VALUES_MISMATCH":
                raise OSError(f"{key[0]} {key[1]} is not the key of {cert[0]} {cert[1]}") from None
            raise OSError(f"{key[0]} {key[1]}: not a PEM private key") from None
    if ca is not None:
        try:
            context.load_verify_locations(cafile=ca[1])
        except ssl.SSLError as error:
            raise OSError(
                f"{ca[0]} {ca[1]}: not PEM CA certificates ({error.reason or error})"
            ) from None


def option_file(flag: str, path: Path) -> bytes:
    """The bytes of the file an option names; OSError naming the option and
    the file when it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as error:
        raise OSError(f"{flag} {path}: {error.strerror or error}") from None


@dataclass(frozen=True, slots=True)
class Config:
    """Everything a porch server needs to know, read once in main."""

    db_url: str = DEFAULT_DB_URL
    db_schema: str | None = None
    host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_port: int | None = 8080
    anonymous_reads: bool = False
    tls: TLS | None = None
    workers: int = 1
    log_config: Path | None = None
    lease_sweep_seconds: float = 5.0
    grace_seconds: float = 10.0
    db_pool_size: int = 10
    watch_poll_seconds: float = 0.5
    watch_keepalive_seconds: float = 15.0
    # WatchEvents streams a server process keeps open at once.
    max_streams: int = DEFAULT_MAX_STREAMS
    max_streams_per_token: int = DEFAULT_MAX_STREAMS_PER_TOKEN
    event_retention_days: float | None = None
    # "auto" (uvloop where installed), "uvloop" or "asyncio".
    event_loop: str = "auto"

    @property
    def grpc_target(self) -> str:
        """The address a local client reaches the gRPC port at."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return host_port("::1" if host == "::" else host, self.grpc_port)


def host_port(host: str, port: int) -> str:
    """host:port, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def db_settings(
    db_url: str | None, db_schema: str | None, environ: Mapping[str, str] = os.environ
) -> tuple[str, str | None]:
    """Resolve the database URL and schema: flags, then PORCH_*, then npg_porch's names."""
    npg_url, npg_schema = NPG_PORCH_VARIABLES
    url = db_url or environ.get("PORCH_DB_URL") or environ.get(npg_url) or DEFAULT_DB_URL
    schema = db_schema or environ.get("PORCH_DB_SCHEMA") or environ.get(npg_schema) or None
    if url.startswith(_ASYNCPG_SCHEME):
        url = _libpq_ssl(url)
    for scheme in _OTHER_POSTGRESQL_SCHEMES:
        if url.startswith(scheme):
            # psycopg2 is the driver porch ships. npg_porch's DB_URL names
            # asyncpg, its driver, or none.
            url = "postgresql+psycopg2://" + url.removeprefix(scheme)
    return url, schema


_ASYNCPG_SCHEME = "postgresql+asyncpg://"
_OTHER_POSTGRESQL_SCHEMES = ("postgresql://", _ASYNCPG_SCHEME)
# What SQLAlchemy's asyncpg URLs write as ssl=..., in libpq's words.
_SSL_MODES = {
    **{
        mode: mode for mode in ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
    },
    "true": "require",
    "false": "disable",
}


def _libpq_ssl(url: str) -> str:
    """An asyncpg URL's ssl=MODE as libpq's sslmode=MODE, which psycopg2 and
    asyncpg both take: libpq refuses a URL with ssl=. Other parameters are
    left for libpq to accept or name."""
    base, mark, query = url.partition("?")
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    if not mark or "sslmode" in dict(pairs):
        return url
    given = sum(key == "ssl" for key, _ in pairs)
    if given > 1:
        raise ValueError(f"ssl is given {given} times in the database URL")
    translated = [
        ("sslmode", _SSL_MODES.get(value.lower(), value)) if key == "ssl" else (key, value)
        for key, value in pairs
    ]
    return f"{base}?{urllib.parse.urlencode(translated, safe='/:')}"


def finite_number(text: str) -> float:
    """A finite number, for argparse."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value
