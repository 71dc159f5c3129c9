"""`--workers`: extra processes that fail are replaced, more slowly each time
they fail soon after starting; those that stop with 0 are not."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from porch_server.cli import _extra_workers


def start_and_exit(code: int, starts: str) -> None:
    with Path(starts).open("a") as file:
        file.write("started\n")
    sys.exit(code)


def starts_within(seconds: float, code: int, tmp_path: Path) -> int:
    starts = tmp_path / "starts"
    with _extra_workers(start_and_exit, (code, str(starts)), 1):
        time.sleep(seconds)
    return len(starts.read_text().splitlines())


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_a_worker_that_fails_is_replaced_after_a_growing_delay(tmp_path: Path) -> None:
    kept, log = Kept(), logging.getLogger("porch")
    # Here, not on the root: another test's logging set-up may stop propagation.
    log.addHandler(kept)
    try:
        # Started at once, again 1 s after the first failure, not again within 2 s.
        assert starts_within(2.5, 3, tmp_path) == 2
    finally:
        log.removeHandler(kept)
    delays = [record.getMessage().rsplit("another", 1)[1] for record in kept.records]
    assert delays == [" in 1 s", " in 2 s"] or delays == [" in 1 s"]


def test_a_worker_that_stops_with_0_is_not_replaced(tmp_path: Path) -> None:
    assert starts_within(1.5, 0, tmp_path) == 1
