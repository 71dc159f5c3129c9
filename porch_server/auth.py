"""Tokens and roles: secrets, their hashes, and who may call what.

Secrets carry 256 random bits, so a single SHA-256 is enough to store them:
there is nothing to brute-force that a slow hash would protect. Tokens
imported from npg_porch (32 hex characters, 128 bits) hash the same way.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from enum import Enum
from typing import Any

from porch_server.errors import PermissionDenied, Unauthenticated, shortened
from porch_server.models import Actor, Role, Token

_SECRET = re.compile(r"[A-Za-z0-9_\-]{32,128}")


class Access(Enum):
    """What a method needs."""

    READ = "read"
    WRITE = "write"  # tasks of one pipeline
    ADMIN = "admin"


def new_secret() -> str:
    """Return a fresh token secret of 256 random bits, not starting with '-':
    `porch … --token -abc…` would read as an option (one token in 64 did)."""
    while (secret := secrets.token_urlsafe(32)).startswith("-"):
        pass
    return secret


def hash_secret(secret: str) -> str:
    """Return the stored form of a secret: its lowercase hex SHA-256."""
    return hashlib.sha256(secret.encode()).hexdigest()


def is_secret(text: str) -> bool:
    """True when text has the form of a token's secret, porch's or npg_porch's."""
    return _SECRET.fullmatch(text) is not None


def bearer_secret(authorization: str | None) -> str:
    """Return the secret of an `authorization: Bearer …` value, or raise Unauthenticated."""
    if not authorization:
        raise Unauthenticated("no token: send 'authorization: Bearer <token>'")
    scheme, _, secret = authorization.strip().partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        raise Unauthenticated("malformed authorization: expected 'Bearer <token>'")
    if not is_secret(secret):
        raise Unauthenticated(
            "not a porch token: tokens are 32 to 128 letters, digits, '-' and '_'"
        )
    return secret


def _task_pipeline(request: Any) -> str:
    return str(request.task.pipeline.name)


def _batch_pipeline(request: Any) -> str:
    if request.pipeline_name:
        return str(request.pipeline_name)
    return str(request.tasks[0].pipeline.name) if request.tasks else ""


@dataclass(frozen=True, slots=True)
class Rule:
    """The access a method needs and, for WRITE, where its pipeline name is."""

    access: Access
    pipeline_of: Callable[[Any], str] | None = None


RULES: dict[str, Rule] = {
    "CreatePipeline": Rule(Access.ADMIN),
    "GetPipeline": Rule(Access.READ),
    "ListPipelines": Rule(Access.READ),
    "CreateToken": Rule(Access.ADMIN),
    "ListTokens": Rule(Access.ADMIN),
    "RevokeToken": Rule(Access.ADMIN),
    "RegisterTask": Rule(Access.WRITE, _task_pipeline),
    "RegisterTasks": Rule(Access.WRITE, _batch_pipeline),
    "GetTask": Rule(Access.READ),
    "ListTasks": Rule(Access.READ),
    "ClaimTasks": Rule(Access.WRITE, lambda request: str(request.pipeline.name)),
    "UpdateTask": Rule(Access.WRITE, _task_pipeline),
    "ListTaskEvents": Rule(Access.READ),
    "WatchEvents": Rule(Access.READ),
}


def check_token(token: Token | None) -> Token:
    """Return token if it may be used at all, or raise Unauthenticated."""
    if token is None:
        raise Unauthenticated("unknown token")
    if token.revoke_time is not None:
        raise Unauthenticated(f"token {token.token_id} was revoked")
    return token


def check_role(method: str, token: Token) -> None:
    """Raise PermissionDenied if token's role may not call method whatever the
    request: the part of `authorize` that needs no request to be read."""
    access = RULES[method].access
    if access is Access.ADMIN and token.role is not Role.ADMIN:
        given = f"{_a(token.role)} token"
        if token.pipeline_name is not None:
            given += f" of pipeline {shortened(token.pipeline_name)!r}"
        raise PermissionDenied(f"{method} needs an admin token; this is {given}")
    if access is Access.WRITE and token.role is not Role.PIPELINE:
        raise PermissionDenied(f"{method} needs a pipeline's token; this is {_a(token.role)} token")


def authorize(method: str, token: Token, request: Any) -> None:
    """Raise PermissionDenied unless token may call method with request."""
    rule = RULES[method]
    if rule.access is not Access.WRITE:
        check_role(method, token)
        return
    assert rule.pipeline_of is not None
    pipeline = rule.pipeline_of(request)
    if token.role is not Role.PIPELINE:
        named = f"pipeline {shortened(pipeline)!r}" if pipeline else "the task's pipeline"
        raise PermissionDenied(f"{method} needs a token of {named}; this is {_a(token.role)} token")
    # A request naming no pipeline is invalid, and the service says so.
    if pipeline and pipeline != token.pipeline_name:
        raise PermissionDenied(
            f"this token is for pipeline {shortened(token.pipeline_name or '')!r},"
            f" not {shortened(pipeline)!r}"
        )


def _a(role: Role) -> str:
    """The role with its article, as in "this is an admin token"."""
    return {Role.ADMIN: "an admin", Role.PIPELINE: "a pipeline", Role.READER: "a reader"}[role]


# The token of the call being served (None for an anonymous read); set by the
# interceptor for the servicer, which runs in the same task.
CALLER: ContextVar[Token | None] = ContextVar("porch_caller", default=None)


def caller_actor() -> Actor:
    """Return who is making the current call, for the events it writes."""
    token = CALLER.get()
    if token is None:
        return Actor(token_id=None, description=None)
    return Actor(token_id=token.token_id, description=token.description)
