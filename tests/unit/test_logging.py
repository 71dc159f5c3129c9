"""`porch serve --log-config`: the operator's logging configuration."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from porch_server import interceptor
from porch_server.cli import _setup_logging
from porch_server.errors import first_line


@pytest.fixture
def restored_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    loggers = [
        logger
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]
    disabled = [logger.disabled for logger in loggers]
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:], root.level = handlers, level
    # dictConfig may have silenced them all (disable_existing_loggers).
    for logger, was in zip(loggers, disabled, strict=True):
        logger.disabled = was


def test_a_log_config_that_names_no_logger_keeps_the_access_log(
    tmp_path: Path, restored_logging: None
) -> None:
    written = tmp_path / "porch.log"
    handler = {"class": "logging.FileHandler", "filename": str(written)}
    config = {"version": 1, "handlers": {"file": handler}}
    path = tmp_path / "logging.json"
    path.write_text(json.dumps(config | {"root": {"level": "INFO", "handlers": ["file"]}}))

    _setup_logging(path)
    interceptor.log.info("GetTask OK 0.4ms anonymous")

    assert "GetTask OK" in written.read_text()


def test_a_log_config_may_still_silence_existing_loggers(
    tmp_path: Path, restored_logging: None
) -> None:
    config = {"version": 1, "disable_existing_loggers": True, "root": {"level": "INFO"}}
    path = tmp_path / "logging.json"
    path.write_text(json.dumps(config))

    _setup_logging(path)

    assert interceptor.log.disabled


def test_a_driver_error_is_told_in_its_first_line() -> None:
    # psycopg2's words when PostgreSQL restarts under a pooled connection.
    error = Exception(
        "server closed the connection unexpectedly\n"
        "\tThis probably means the server terminated abnormally\n"
        "\tbefore or while processing the request.\n"
    )
    assert first_line(error) == "server closed the connection unexpectedly"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not JSON: Expecting property name"),
        ("[]", "a logging dictConfig is a JSON object"),
        ('{"version": 2}', "Unsupported version: 2"),
        (
            '{"version": 1, "handlers": {"h": {"class": "nowhere.Handler"}}}',
            "Unable to configure handler 'h' (Cannot resolve 'nowhere.Handler'",
        ),
    ],
)
def test_a_log_config_porch_cannot_use_is_named_with_the_reason(
    text: str, message: str, tmp_path: Path, restored_logging: None
) -> None:
    path = tmp_path / "logging.json"
    path.write_text(text)

    with pytest.raises(ValueError) as refused:
        _setup_logging(path)

    assert str(refused.value).startswith(f"--log-config {path}: {message}"), refused.value
