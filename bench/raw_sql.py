"""The database limit: porch's task lifecycle as plain SQL through psycopg2.

W processes each loop: claim K PENDING tasks (one CTE with FOR UPDATE SKIP
LOCKED, the CLAIMED events written in the same statement, one transaction),
then for each task one transaction per status change (RUNNING, then DONE),
each writing its event row in the same statement. That is one commit per
change, on porch's own schema, with nothing between the client and
PostgreSQL: what porch's server could at best approach.

    python bench/raw_sql.py [--db-url URL] [--tasks N] [--clients W] [--batch K]
"""

from __future__ import annotations

import argparse
import time

import psycopg2
from _common import (
    DEFAULT_DB_URL,
    Timer,
    add_json_option,
    check_claims,
    fresh_database,
    percentile,
    print_table,
    psycopg2_dsn,
    run_clients,
    write_json,
)

SETUP = """
INSERT INTO pipeline (name, uri, version, create_time) VALUES ('raw', 'bench', '1', now());
INSERT INTO task (pipeline_id, task_input_id, task_input, status, create_time, update_time)
SELECT 1, md5(n::text) || md5((-n)::text), '{"n":' || n || '}', 'PENDING', now(), now()
FROM generate_series(1, %(tasks)s) AS n ORDER BY n;
"""

CLAIM = """
WITH candidates AS (
    SELECT id FROM task WHERE pipeline_id = 1 AND status = 'PENDING'
    ORDER BY id LIMIT %(batch)s FOR UPDATE SKIP LOCKED
), claimed AS (
    UPDATE task SET status = 'CLAIMED', update_time = now(), claim_time = now(),
        claimed_by_token_id = 1, claim_number = claim_number + 1
    WHERE id IN (SELECT id FROM candidates) RETURNING *
), events AS (
    INSERT INTO event (time, task_id, pipeline_id, kind, old_status, new_status, token_id,
        token_description)
    SELECT now(), id, pipeline_id, 'CLAIMED', 'PENDING', 'CLAIMED', 1, 'raw' FROM claimed
)
SELECT id, task_input_id FROM claimed ORDER BY id
"""

CHANGE = """
WITH current AS (
    SELECT id, status FROM task WHERE pipeline_id = 1 AND task_input_id = %(key)s FOR UPDATE
), changed AS (
    UPDATE task SET status = %(new)s, update_time = now()
    FROM current WHERE task.id = current.id AND current.status = %(old)s
    RETURNING task.*, current.status AS old_status
), events AS (
    INSERT INTO event (time, task_id, pipeline_id, kind, old_status, new_status, token_id,
        token_description)
    SELECT now(), id, pipeline_id, 'STATUS_CHANGED', old_status, status, 1, 'raw' FROM changed
)
SELECT id FROM changed
"""


def client(dsn: str, batch: int) -> tuple[float, float, list[str], dict[str, list[float]]]:
    """Claim batches until none is left; move each task to RUNNING, then DONE."""
    connection = psycopg2.connect(dsn)
    cursor = connection.cursor()
    timer = Timer()
    claimed: list[str] = []
    start = time.time()
    while True:
        with timer("claim"):
            cursor.execute(CLAIM, {"batch": batch})
            rows = cursor.fetchall()
            connection.commit()
        if not rows:
            break
        for _, key in rows:
            claimed.append(key)
            for old, new in (("CLAIMED", "RUNNING"), ("RUNNING", "DONE")):
                with timer("change"):
                    cursor.execute(CHANGE, {"key": key, "old": old, "new": new})
                    if cursor.fetchone() is None:
                        raise RuntimeError(f"task {key} was not {old}")
                    connection.commit()
    connection.close()
    return start, time.time(), claimed, dict(timer.latencies)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the benchmark; print and return its figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--db-url", default=DEFAULT_DB_URL, help="re-created: all data is lost")
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--clients", type=int, nargs="+", default=[8, 1])
    parser.add_argument("--batch", type=int, default=10, help="tasks per claim")
    add_json_option(parser)
    args = parser.parse_args(argv)
    figures: dict[str, float] = {}
    rows = []
    for clients in args.clients:
        dsn = psycopg2_dsn(fresh_database(args.db_url))
        with psycopg2.connect(dsn) as connection, connection.cursor() as cursor:
            cursor.execute(SETUP, {"tasks": args.tasks})
        results = run_clients(client, [(dsn, args.batch)] * clients)
        check_claims([key for result in results for key in result[2]], args.tasks)
        seconds = max(r[1] for r in results) - min(r[0] for r in results)
        timer = Timer()
        for result in results:
            timer.merge(result[3])
        changes = len(timer.latencies["change"])
        commits = changes + len(timer.latencies["claim"])
        figures[f"tasks_per_s_{clients}"] = args.tasks / seconds
        rows.append(
            (
                clients,
                args.tasks / seconds,
                commits / args.tasks,
                percentile(timer.latencies["claim"], 50) * 1000,
                percentile(timer.latencies["change"], 50) * 1000,
                percentile(timer.latencies["change"], 99) * 1000,
            )
        )
    print_table(
        f"raw SQL lifecycle through psycopg2: {args.tasks} tasks, claim {args.batch}, "
        "one commit per change",
        ["processes", "tasks/s", "commits/task", "claim p50 ms", "change p50 ms", "change p99 ms"],
        rows,
    )
    write_json(args.json, figures)
    return figures


if __name__ == "__main__":
    main()
