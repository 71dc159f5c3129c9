"""Token secrets, their hashes, and the role rules as pure functions."""

from datetime import UTC, datetime

import pytest

from porch_server import auth
from porch_server.errors import PermissionDenied, Unauthenticated
from porch_server.models import Role, Token
from porch_stubs.v1 import porch_pb2

NOW = datetime.now(UTC)


def token(role: Role, pipeline: str | None = None, revoked: bool = False) -> Token:
    return Token("7", role, pipeline, "test", NOW, NOW if revoked else None)


def test_secrets_are_long_random_and_distinct() -> None:
    secrets = {auth.new_secret() for _ in range(100)}
    assert len(secrets) == 100
    assert all(len(s) >= 43 for s in secrets)  # 256 bits in base64url


def test_no_secret_starts_like_a_command_line_option(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = iter(["-starts-like-an-option" + "x" * 21, "fine" + "x" * 39])
    monkeypatch.setattr(auth.secrets, "token_urlsafe", lambda size: next(drawn))
    assert auth.new_secret() == "fine" + "x" * 39


def test_hash_is_sha256_hex_and_not_the_secret() -> None:
    secret = auth.new_secret()
    hashed = auth.hash_secret(secret)
    assert len(hashed) == 64 and secret not in hashed
    assert hashed == auth.hash_secret(secret)
    # a 32-hex npg_porch token hashes the same way
    assert auth.hash_secret("0" * 32) == (
        "84e0c0eafaa95a34c293f278ac52e45ce537bab5e752a00e6959a13ae103b65a"
    )


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "no token"),
        ("", "no token"),
        ("Bearer", "malformed authorization"),
        ("Basic abc", "malformed authorization"),
        ("Bearer short", "not a porch token"),
        ("Bearer " + "x" * 31 + "!", "not a porch token"),
    ],
)
def test_bad_authorization_is_unauthenticated(header: str | None, message: str) -> None:
    with pytest.raises(Unauthenticated, match=message):
        auth.bearer_secret(header)


def test_bearer_secret_accepts_npg_tokens_and_case() -> None:
    assert auth.bearer_secret("bearer " + "a1" * 16) == "a1" * 16


def test_revoked_and_unknown_tokens_are_unauthenticated() -> None:
    with pytest.raises(Unauthenticated, match="unknown"):
        auth.check_token(None)
    with pytest.raises(Unauthenticated, match="revoked"):
        auth.check_token(token(Role.ADMIN, revoked=True))


def claim(pipeline: str) -> porch_pb2.ClaimTasksRequest:
    return porch_pb2.ClaimTasksRequest(pipeline=porch_pb2.Pipeline(name=pipeline))


def request_naming(method: str, pipeline: str) -> object:
    """A request of method that names pipeline, where its rule looks for one."""
    if method == "ClaimTasks":
        return claim(pipeline)
    if method == "RegisterTasks":
        return porch_pb2.RegisterTasksRequest(pipeline_name=pipeline)
    return porch_pb2.RegisterTaskRequest(
        task=porch_pb2.Task(pipeline=porch_pb2.Pipeline(name=pipeline))
    )


def test_every_method_has_a_rule() -> None:
    methods = porch_pb2.DESCRIPTOR.services_by_name["PorchService"].methods_by_name
    assert set(methods) == set(auth.RULES)


def test_role_matrix() -> None:
    admin, reader = token(Role.ADMIN), token(Role.READER)
    mine, other = token(Role.PIPELINE, "p1"), token(Role.PIPELINE, "p2")
    for method, rule in auth.RULES.items():
        request = request_naming(method, "p1")
        outcomes = {}
        for name, who in (("admin", admin), ("reader", reader), ("mine", mine), ("other", other)):
            try:
                auth.authorize(method, who, request)
                outcomes[name] = True
            except PermissionDenied:
                outcomes[name] = False
        expected = {
            auth.Access.READ: {"admin": True, "reader": True, "mine": True, "other": True},
            auth.Access.ADMIN: {"admin": True, "reader": False, "mine": False, "other": False},
            auth.Access.WRITE: {"admin": False, "reader": False, "mine": True, "other": False},
        }[rule.access]
        assert outcomes == expected, method


def test_the_role_alone_refuses_what_no_request_would_allow() -> None:
    # check_role runs before the request is read (for the HTTP gateway, before
    # its body arrives): it refuses exactly where authorize refuses even the
    # request most in the token's favour, one naming the token's own pipeline.
    for method in auth.RULES:
        for who in (token(Role.ADMIN), token(Role.READER), token(Role.PIPELINE, "p1")):
            try:
                auth.check_role(method, who)
                admitted = True
            except PermissionDenied:
                admitted = False
            try:
                auth.authorize(method, who, request_naming(method, "p1"))
                allowed = True
            except PermissionDenied:
                allowed = False
            assert admitted == allowed, (method, who.role)
    with pytest.raises(PermissionDenied, match="RegisterTasks needs a pipeline's token; this is"):
        auth.check_role("RegisterTasks", token(Role.READER))


def test_wrong_pipeline_names_both_pipelines() -> None:
    with pytest.raises(PermissionDenied, match="'p2', not 'p1'"):
        auth.authorize("ClaimTasks", token(Role.PIPELINE, "p2"), claim("p1"))


@pytest.mark.parametrize("role", [Role.PIPELINE, Role.ADMIN])
def test_a_refusal_quotes_a_name_the_caller_sent_with_its_unprintables_escaped(
    role: Role,
) -> None:
    # Checked before the name is: raw, it could retitle or recolour the
    # terminal that prints the error, or reorder its text.
    name = "x\x1b]0;pwned\x07\x1b[31mRED\u202e\n"
    with pytest.raises(PermissionDenied) as refused:
        auth.authorize("ClaimTasks", token(role, "p2"), claim(name))
    message = refused.value.args[0]
    assert "'x\\x1b]0;pwned\\x07\\x1b[31mRED\\u202e\\n'" in message
    assert message.isprintable()


@pytest.mark.parametrize(
    ("method", "role", "message"),
    [
        (
            "CreatePipeline",
            Role.PIPELINE,
            "CreatePipeline needs an admin token; this is a pipeline token of pipeline 'p1'$",
        ),
        ("CreateToken", Role.READER, "CreateToken needs an admin token; this is a reader token$"),
        ("ClaimTasks", Role.ADMIN, "needs a token of pipeline 'p1'; this is an admin token"),
        ("ClaimTasks", Role.READER, "needs a token of pipeline 'p1'; this is a reader token"),
    ],
)
def test_a_refusal_names_the_role_needed_and_the_one_given(
    method: str, role: Role, message: str
) -> None:
    request = claim("p1") if method == "ClaimTasks" else porch_pb2.CreatePipelineRequest()
    with pytest.raises(PermissionDenied, match=message):
        auth.authorize(method, token(role, "p1" if role is Role.PIPELINE else None), request)
