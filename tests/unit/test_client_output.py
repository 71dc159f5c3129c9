"""What the porch command prints: one line per answer or event, whatever
the text it carries."""

from __future__ import annotations

import json
import re

import pytest

from porch_server import client
from porch_stubs.v1 import porch_pb2 as pb

# Text that would end a line (for Python's str.splitlines, a terminal, or a
# JavaScript reader), start a terminal control sequence (U+009B, the C1 CSI),
# or make what follows read backwards.
FORGING = 'a\u2028b\u2029c\x85d\x9b2Je\u202egnp\u202c\nf"\\'


def event(message: str, description: str) -> pb.Event:
    return pb.Event(
        cursor="0.8",
        pipeline_name="p1",
        task_input_id="ab" * 32,
        kind=pb.Event.STATUS_CHANGED,
        old_status=pb.Task.RUNNING,
        new_status=pb.Task.FAILED,
        token_description=description,
        message=message,
    )


def test_an_events_line_stays_one_line_of_what_it_says() -> None:
    line = client._event_line(event(FORGING, f"wrapper{FORGING}"))

    assert len(line.splitlines()) == 1 and line.isprintable(), line
    assert " STATUS_CHANGED RUNNING->FAILED by wrapper" in line
    assert line.endswith(" cursor=0.8")
    # The message is still JSON, and reads back as it was sent.
    quoted = re.search(r' (".*") cursor=', line)
    assert quoted is not None and json.loads(quoted[1]) == FORGING


def test_json_output_stays_one_line_of_the_same_json(capsys: pytest.CaptureFixture[str]) -> None:
    client._print(event(FORGING, f"wrapper{FORGING}"))

    [line] = capsys.readouterr().out.splitlines()
    assert line.isprintable(), line
    printed = json.loads(line)
    assert (printed["message"], printed["token_description"]) == (FORGING, f"wrapper{FORGING}")
