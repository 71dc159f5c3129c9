"""Where a running server's CPU goes, thread by thread: user and system time, context switches.

Watches one process (by PID, or the first whose command line holds a given
text) for a while and prints, per thread name, the share of a core each
kind of thread used in user and in system time, and how often a second
its threads gave up the CPU to wait (voluntary context switches) or were
taken off it while still runnable (involuntary ones: preempted). The
process's main thread is shown as MAIN. Divide by the benchmark's calls a
second for figures per call. Run it beside a benchmark, e.g.:

    python bench/threads.py --match "porch serve" --after 8 --seconds 12 &
    python bench/register.py --tasks 40000

Threads are grouped by their name in /proc (grpc names its own, such as
event_engine; Python's threads keep the process's name). A thread that
ends while it is watched is not counted. --match takes the process with
the lowest PID whose command line holds the text: with `porch serve
--workers 2` that is the supervisor, so give a worker's --pid instead.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from _common import print_table

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Counters:
    """One thread's (or group's) counters: CPU seconds and context switches."""

    user: float = 0.0
    system: float = 0.0
    waits: int = 0  # voluntary context switches
    preempted: int = 0  # involuntary ones

    def add(self, other: Counters, sign: int = 1) -> None:
        self.user += sign * other.user
        self.system += sign * other.system
        self.waits += sign * other.waits
        self.preempted += sign * other.preempted


def find(match: str) -> int:
    """The PID of the first process whose command line holds match, leaving
    out this script and any shell that started it (their command lines name it)."""
    for entry in sorted(Path("/proc").iterdir(), key=_pid_order):
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if match in command and Path(__file__).name not in command:
            return int(entry.name)
    raise SystemExit(f"threads: no process's command line holds {match!r}")


def snapshot(pid: int) -> dict[int, tuple[str, Counters]]:
    """Each live thread's name and counters so far."""
    threads = {}
    for thread in _threads(pid):
        try:
            name = "MAIN" if thread == pid else _read(pid, thread, "comm").strip()
            stat = _read(pid, thread, "stat")
            status = _read(pid, thread, "status")
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        counts = dict(line.split(":", 1) for line in status.splitlines() if "ctxt_switches" in line)
        threads[thread] = (
            name,
            Counters(
                int(fields[11]) / TICKS,
                int(fields[12]) / TICKS,
                int(counts["voluntary_ctxt_switches"]),
                int(counts["nonvoluntary_ctxt_switches"]),
            ),
        )
    return threads


def watch(pid: int, seconds: float) -> tuple[dict[str, tuple[int, Counters]], float]:
    """Per thread name: how many threads, and what they used in `seconds`."""
    before = snapshot(pid)
    start = time.perf_counter()
    time.sleep(seconds)
    after = snapshot(pid)
    elapsed = time.perf_counter() - start
    groups: dict[str, tuple[int, Counters]] = {}
    for thread, (name, counters) in after.items():
        count, total = groups.get(name, (0, Counters()))
        total.add(counters)
        if thread in before:
            total.add(before[thread][1], -1)
        groups[name] = (count + 1, total)
    return groups, elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--pid", type=int)
    which.add_argument("--match", help="text in the process's command line")
    parser.add_argument("--after", type=float, default=0.0, help="seconds to wait first")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds to watch")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.after < 0:
        parser.error("--seconds must be above 0 and --after at least 0")
    time.sleep(args.after)
    pid = args.pid if args.pid is not None else find(args.match)
    if not Path(f"/proc/{pid}").exists():
        raise SystemExit(f"threads: no process {pid}")
    groups, elapsed = watch(pid, args.seconds)
    rows = [
        (
            name,
            count,
            counters.user / elapsed * 100,
            counters.system / elapsed * 100,
            counters.waits / elapsed,
            counters.preempted / elapsed,
        )
        for name, (count, counters) in sorted(
            groups.items(), key=lambda item: -(item[1][1].user + item[1][1].system)
        )
    ]
    print_table(
        f"process {pid}, {elapsed:.1f} s: per thread name, % of a core and switches a second",
        ["threads", "count", "user %", "system %", "waits/s", "preempted/s"],
        rows,
    )


def _pid_order(entry: Path) -> tuple[int, str]:
    return (int(entry.name), "") if entry.name.isdigit() else (0, entry.name)


def _threads(pid: int) -> Iterator[int]:
    try:
        names = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        raise SystemExit(f"threads: process {pid} has ended") from None
    return (int(name) for name in names)


def _read(pid: int, thread: int, name: str) -> str:
    return Path(f"/proc/{pid}/task/{thread}/{name}").read_text()


if __name__ == "__main__":
    main()
