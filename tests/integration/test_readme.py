"""The README's wrapper workflow, run as written: the `porch` commands, the
curl calls through the gateway and the Python stubs, each against a fresh
`porch serve` on its embedded SQLite default. Only the addresses change."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
FIRST_ADMIN = re.compile(r"created the first admin token \(shown only now\): (\S+)")
LISTENING = re.compile(r"gRPC listening on \S+:(\d+)")
GATEWAY = re.compile(r"HTTP gateway on (http://[^/\s]+)")


def block(heading: str, language: str) -> str:
    """The first fenced block of language under the README's heading."""
    section = README.read_text().split(f"\n{heading}\n", 1)[1]
    found = re.search(rf"```{language}\n(.*?)```", section, re.DOTALL)
    assert found is not None, f"no {language} block under {heading}"
    return found.group(1)


@dataclass
class Served:
    directory: Path
    grpc: str
    http: str
    admin: str
    env: dict[str, str]

    def run(self, program: list[str], script: str, **env: str) -> str:
        done = subprocess.run(
            program,
            input=script,
            capture_output=True,
            text=True,
            cwd=self.directory,
            env=self.env | env,
            timeout=120,
        )
        assert done.returncode == 0, f"{done.stderr}\n--- output:\n{done.stdout}"
        return done.stdout


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    """`porch serve` as the README starts it, in an empty directory."""
    with serving(tmp_path) as server:
        yield server


@contextmanager
def serving(directory: Path, *options: str) -> Iterator[Served]:
    """`porch serve` with options in directory, its log in serve.log there."""
    bin_dir = str(Path(sys.executable).parent)
    env = os.environ | {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in [name for name in env if name.startswith("PORCH_")]:
        del env[name]  # the README's defaults, not this shell's settings
    with (directory / "serve.log").open("w") as log:
        process = subprocess.Popen(
            ["porch", "serve", "--grpc-port", "0", "--http-port", "0", *options],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            cwd=directory,
            env=env,
        )
    assert process.stdout is not None
    admin = grpc_port = http = None
    for line in process.stdout:
        if found := FIRST_ADMIN.search(line):
            admin = found.group(1)
        if found := LISTENING.search(line):
            grpc_port = found.group(1)
        if found := GATEWAY.search(line):
            http = found.group(1)
            break
    else:
        raise AssertionError(f"porch serve exited with {process.wait()} before serving")
    assert admin is not None and grpc_port is not None, "no first admin token or gRPC port"
    assert http is not None
    target = f"127.0.0.1:{grpc_port}"
    try:
        yield Served(
            directory,
            target,
            http,
            admin,
            env | {"PORCH_TARGET": target},
        )
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
        process.stdout.close()


@pytest.mark.parametrize("log_config", ["the README's", "none"])
def test_the_log_config_that_turns_the_access_log_off(log_config: str, tmp_path: Path) -> None:
    """The README's log config (Configuration) silences the access log and
    keeps porch's other lines as they are by default."""
    options = []
    if log_config == "the README's":
        (tmp_path / "logging.json").write_text(block("## Configuration", "json"))
        options = ["--log-config", "logging.json"]
    with serving(tmp_path, *options) as served:
        served.run(["porch", "pipeline", "list"], "", PORCH_TOKEN=served.admin)
        request = urllib.request.Request(
            f"{served.http}/v1/pipelines", headers={"Authorization": f"Bearer {served.admin}"}
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert answer.status == 200
    written = (tmp_path / "serve.log").read_text()
    assert "uvicorn.error Application startup complete." in written
    assert "porch shutting down: finishing calls in flight" in written
    access_lines = [line for line in written.splitlines() if "ListPipelines OK" in line]
    assert len(access_lines) == (0 if log_config == "the README's" else 2), written


def test_the_porch_command_workflow(served: Served) -> None:
    script = block("### With the `porch` command", "sh")
    watch = "porch watch --pipeline ml_loader"
    assert watch in script
    # And a report naming a claim never made, which is refused.
    stale = '! porch task update --pipeline ml_loader --id "$ID" --claim-number 2 --status PENDING'
    output = served.run(
        ["bash", "-euo", "pipefail"], script.replace(watch, f"{stale} 2> stale.txt")
    )
    refused = (served.directory / "stale.txt").read_text()
    assert "FAILED_PRECONDITION" in refused and "claim 2 of this task was never made" in refused
    lines = [json.loads(line) for line in output.splitlines()]
    events = [line for line in lines if "cursor" in line]
    assert [(e["kind"], e.get("new_status"), e.get("message", "")) for e in events] == [
        ("CREATED", "PENDING", ""),
        ("CLAIMED", "CLAIMED", ""),
        ("STATUS_CHANGED", "RUNNING", "on host a"),
        ("STATUS_CHANGED", "DONE", "loaded 1,203 rows"),
    ]
    # The stream runs until stopped, printing each change as it happens.
    reader = served.env | {"PORCH_TOKEN": served.admin}  # any token may read
    stream = subprocess.Popen(
        watch.split(), stdout=subprocess.PIPE, text=True, cwd=served.directory, env=reader
    )
    try:
        assert stream.stdout is not None
        registered = served.run(
            ["bash", "-eu"],
            "export PORCH_TOKEN=$(porch token create --pipeline ml_loader --description later)\n"
            "sleep 1\n"  # the stream starts from now: let it start first
            """porch task register --pipeline ml_loader '{"id_run": 45927}'\n"""
            """porch task register --pipeline ml_loader '{"id_run": 45927}'\n""",
        )
        first, again = map(json.loads, registered.splitlines())
        # Every field is printed, as the gateway prints it: "created" even when false.
        assert (first["created"], again["created"]) == (True, False)
        task_input_id = first["task"]["task_input_id"]
        line = stream.stdout.readline()
        assert f"ml_loader {task_input_id} CREATED PENDING by later" in line, line
    finally:
        stream.kill()
        stream.communicate()


@pytest.mark.skipif(shutil.which("jq") is None, reason="the README's curl examples use jq")
def test_the_curl_workflow(served: Served) -> None:
    script = block("### With curl through the gateway", "sh")
    address = "PORCH=http://127.0.0.1:8080"
    assert address in script
    # curl leaves a body without a line break; a shell shows the next output
    # on the same line. Each body on its own line, for reading them here.
    separate = 'curl() { command curl "$@"; echo; }\n'
    output = served.run(
        ["bash", "-euo", "pipefail"], separate + script.replace(address, f"PORCH={served.http}")
    )
    assert '"created":true' in output.replace(" ", "")
    assert '"code"' not in output, output  # no error body anywhere
    shown = [line[2:] for line in script.splitlines() if line.startswith('# ["')]
    printed = [line for line in output.splitlines() if line.startswith('["')]
    claimed = [json.loads(line) for line in printed[:2]]
    assert [(status, number) for _, status, number in claimed] == [("CLAIMED", 1)] * 2
    assert printed[2:] == shown and len(shown) == 4


def test_the_python_stubs_workflow(served: Served) -> None:
    code = block("### With the Python stubs", "python")
    output = served.run([sys.executable], code, ADMIN_TOKEN=served.admin).splitlines()
    created, task_input_id = output[0].split()
    assert created == "True" and len(task_input_id) == 64
    assert [line.split()[1:3] for line in output[1:]] == [
        ["CREATED", "PENDING"],
        ["CLAIMED", "CLAIMED"],
        ["STATUS_CHANGED", "RUNNING"],
        ["STATUS_CHANGED", "DONE"],
    ]
