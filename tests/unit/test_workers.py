"""`--workers`: extra processes that fail are replaced, more slowly each time
they fail soon after starting; those that stop with 0 are not."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from porch_server.cli import _extra_workers


def start_and_exit(code: int, starts: str) -> None:
    with Path(starts).open("a") as file:
        file.write("started\n")
    sys.exit(code)


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def porch_log() -> Iterator[Kept]:
    # On porch's logger, not the root: another test's set-up may stop propagation.
    kept, log = Kept(), logging.getLogger("porch")
    level, log.level = log.level, logging.INFO
    log.addHandler(kept)
    try:
        yield kept
    finally:
        log.removeHandler(kept)
        log.level = level


def wait_for(condition: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_worker_that_fails_is_replaced_after_a_growing_delay(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    with porch_log() as kept, _extra_workers(start_and_exit, (3, str(starts)), 1):
        wait_for(lambda: len(kept.messages) == 2)  # two failures: two replacements asked
    assert [message.rsplit("another", 1)[1] for message in kept.messages] == [
        " in 1 s",
        " in 2 s",
    ]
    # The first, and the one started 1 s after it failed; the block ended
    # before the second replacement's 2 s were up.
    assert len(starts.read_text().splitlines()) == 2


def test_a_worker_that_stops_with_0_is_not_replaced(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    with porch_log() as kept, _extra_workers(start_and_exit, (0, str(starts)), 1):
        wait_for(lambda: bool(kept.messages))
    assert len(kept.messages) == 1 and kept.messages[0].endswith(" stopped")
    assert len(starts.read_text().splitlines()) == 1
