"""The `porch` command as an operator uses it: set-up, tokens, serve, TLS,
workers, the gateway alone, and a database that goes away."""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import importlib.metadata
import itertools
import json
import logging
import multiprocessing
import os
import random
import re
import resource
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import httpx
import psycopg2
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

import gateway
from porch_server import cli, client
from porch_server.auth import hash_secret, new_secret
from porch_server.cli import FILE_LIMIT
from porch_server.db import migrate
from porch_server.db.engine import make_engine
from porch_server.interceptor import DATABASE_STOPPED
from porch_server.models import SYSTEM, Pipeline, Role
from porch_server.store import Store
from porch_stubs.v1 import porch_pb2 as pb
from porch_stubs.v1 import porch_pb2_grpc

from .conftest import run_sql, start_porch, start_server, stop_server

PORCH = [sys.executable, "-m", "porch_server"]
UPGRADE_PG = ["db", "upgrade", "--db-url", "postgresql://x@h/d"]


def connect(pg_url: str) -> Any:
    """A psycopg2 connection of its own to the test database at pg_url."""
    return psycopg2.connect(
        make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    )


def porch(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [*PORCH, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_token_whose_secret_could_not_be_written_is_revoked(sqlite_url: str) -> None:
    # Nobody could use it, and nobody was told its id to revoke it.
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [*PORCH, "token", "create", "--admin", "--description", "ops", "--db-url", sqlite_url],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert done.stderr == (
        "porch: could not write the new token's secret (No space left on device): token 1,"
        " which nobody could have had, was revoked\n"
    )
    [listed] = porch("token", "list", "--all", "--db-url", sqlite_url).splitlines()
    token_id, role, _, created, revoked, description = listed.split("\t")
    assert (token_id, role, description) == ("1", "ADMIN", "ops") and revoked >= created
    # With stdout closed (>&-), none is made: Python would drop the secret unsaid.
    # (Nor is a task claimed, nor anything done but serving.)
    create = [*PORCH, "token", "create", "--admin", "--description", "ops", "--db-url", sqlite_url]
    closed = subprocess.run(
        ["sh", "-c", 'exec "$@" >&-', "sh", *create], capture_output=True, text=True, timeout=60
    )
    assert (closed.returncode, closed.stderr) == (
        1,
        "porch: stdout is closed: nothing was done, as its output would be lost\n",
    )
    assert len(porch("token", "list", "--all", "--db-url", sqlite_url).splitlines()) == 1


def test_token_commands_work_on_the_database(sqlite_url: str) -> None:
    created = subprocess.run(
        [*PORCH, "token", "create", "--admin", "--description", "ops", "--db-url", sqlite_url],
        capture_output=True,
        text=True,
    )
    # The secret alone on stdout, for $(...); what was made, with its id, on stderr.
    secret = created.stdout
    assert len(secret.strip()) >= 43 and "\n" not in secret.strip()
    assert created.stderr == "porch: created ADMIN token 1: ops\n"
    porch("token", "create", "--reader", "--description", "dash", "--db-url", sqlite_url)
    listing = porch("token", "list", "--db-url", sqlite_url)
    assert secret.strip() not in listing
    rows = [line.split("\t") for line in listing.splitlines()]
    assert [row[:3] + row[4:] for row in rows] == [
        ["1", "ADMIN", "-", "-", "ops"],
        ["2", "READER", "-", "-", "dash"],
    ]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row[3]) for row in rows)
    assert "porch: revoked token" in porch("token", "revoke", "1", "--db-url", sqlite_url)
    again = porch("token", "revoke", "1", "--db-url", sqlite_url)
    assert re.fullmatch(
        r"porch: token 1 \(ops\) was already revoked on \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\n", again
    ), again
    assert "ops" not in porch("token", "list", "--db-url", sqlite_url)
    everything = porch("token", "list", "--all", "--db-url", sqlite_url)
    revoked = everything.splitlines()[0].split("\t")
    assert revoked[0] == "1" and revoked[4] >= revoked[3] and revoked[5] == "ops"
    failed = subprocess.run(
        [
            *PORCH,
            "token",
            "create",
            "--pipeline",
            "nope",
            "--description",
            "d",
            "--db-url",
            sqlite_url,
        ],
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 1 and "pipeline 'nope' not found" in failed.stderr


def _pipeline_p_and_its_token(sqlite_url: str) -> str:
    """The secret of a new token of a new pipeline p's wrapper, "loader"."""
    store = Store(make_engine(sqlite_url))
    try:
        store.create_pipeline(Pipeline(name="p", uri="u", version="1"))
        secret = new_secret()
        store.create_token(Role.PIPELINE, "p", "loader", hash_secret(secret))
    finally:
        store.close()
    return secret


def test_token_list_shows_one_pipelines_tokens(sqlite_url: str) -> None:
    store = Store(make_engine(sqlite_url))
    try:
        for name in ("p1", "p2"):
            store.create_pipeline(Pipeline(name=name, uri="u", version="1"))
    finally:
        store.close()
    for number, name in enumerate(("p1", "p2", "p1"), start=1):
        made = ["token", "create", "--pipeline", name, "--description", "cron"]
        created = subprocess.run(
            [*PORCH, *made, "--db-url", sqlite_url], capture_output=True, text=True
        )
        assert (
            created.stderr == f"porch: created PIPELINE token {number} of pipeline {name}: cron\n"
        )
    listing = porch("token", "list", "--pipeline", "p1", "--db-url", sqlite_url)
    assert [line.split("\t")[:3] for line in listing.splitlines()] == [
        ["1", "PIPELINE", "p1"],
        ["3", "PIPELINE", "p1"],
    ]
    failed = subprocess.run(
        [*PORCH, "token", "list", "--pipeline", "p3", "--db-url", sqlite_url],
        capture_output=True,
        text=True,
    )
    assert failed.returncode == 1 and "pipeline 'p3' not found" in failed.stderr


@pytest.mark.postgres
def test_events_prune_says_why_older_events_are_kept(pg_url: str) -> None:
    store = Store(make_engine(pg_url))
    holding = connect(pg_url)
    try:
        store.create_pipeline(Pipeline(name="p", uri="u", version="1"))
        # A transaction open since before the events were written: streams
        # must see any event it may still write before them.
        holding.cursor().execute("SELECT pg_current_xact_id()")
        store.register_tasks("p", [{"n": 1}, {"n": 2}], SYSTEM)
        held = porch("events", "prune", "--older-than-days", "0", "--db-url", pg_url)
        assert held.startswith("porch: deleted 0 event(s) older than "), held
        assert "porch: 2 older event(s) kept, so that no stream misses one" in held
        assert "transaction still open on the PostgreSQL server, in any database" in held
        holding.rollback()
        # Other transactions on the server (other tests', say) hold events
        # back too while they are open, but not for long.
        deleted = 0
        deadline = time.monotonic() + 30
        while deleted < 2 and time.monotonic() < deadline:
            done = porch("events", "prune", "--older-than-days", "0", "--db-url", pg_url)
            deleted += int(re.match(r"porch: deleted (\d+) event", done).group(1))  # type: ignore[union-attr]
        assert deleted == 2 and "kept" not in done, done
    finally:
        holding.close()
        store.close()


def test_a_new_sqlite_file_is_its_owners_alone(tmp_path: Path) -> None:
    made, kept = tmp_path / "new.db", tmp_path / "kept.db"
    kept.touch(mode=0o644)
    kept.chmod(0o644)  # whatever the umask
    for path in (made, kept):
        porch("db", "upgrade", "--db-url", f"sqlite:///{path}")
    assert made.stat().st_mode & 0o777 == 0o600
    assert kept.stat().st_mode & 0o777 == 0o644  # a file that exists keeps its mode
    porch("token", "create", "--admin", "--description", "ops", "--db-url", f"sqlite:///{made}")
    # SQLite's -wal and -shm files, which last as long as a connection does.
    reading = sqlite3.connect(made)
    try:
        reading.execute("SELECT count(*) FROM task").fetchone()
        modes = {path.name: path.stat().st_mode & 0o777 for path in tmp_path.glob("new.db*")}
    finally:
        reading.close()
    assert modes == {"new.db": 0o600, "new.db-wal": 0o600, "new.db-shm": 0o600}


def test_sqlite_urls_with_driver_options_still_work(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}?timeout=60"
    assert "porch: database schema is at" in porch("db", "upgrade", "--db-url", url)
    porch("token", "create", "--admin", "--description", "ops", "--db-url", url)
    assert "\tADMIN\t-\t" in porch("token", "list", "--db-url", url)
    assert [path.name for path in tmp_path.iterdir() if "a.db" in path.name] == ["a.db"]


def test_a_description_from_elsewhere_stays_on_its_line(sqlite_url: str) -> None:
    # Descriptions with line breaks are refused now; one imported may still have one.
    refused = subprocess.run(
        [*PORCH, "token", "create", "--admin", "--description", "a\nb", "--db-url", sqlite_url],
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 1 and "line breaks" in refused.stderr
    engine = make_engine(sqlite_url)
    store = Store(engine)
    try:
        store.create_token(Role.READER, None, "old\tone\nfrom npg_porch", "0" * 64)
    finally:
        store.close()
        engine.dispose()

    [line] = porch("token", "list", "--db-url", sqlite_url).splitlines()
    assert line.split("\t")[5:] == ["old\\x09one\\x0afrom npg_porch"]


def test_npg_porch_environment_names_are_honoured(tmp_path: Path) -> None:
    env = {**os.environ, "DB_URL": f"sqlite:///{tmp_path / 'npg.db'}"}
    env.pop("PORCH_DB_URL", None)
    porch("db", "upgrade", env=env, cwd=tmp_path)
    porch("token", "create", "--admin", "--description", "ops", env=env, cwd=tmp_path)
    assert (tmp_path / "npg.db").exists() and not (tmp_path / "porch.db").exists()


def test_a_sqlite_file_that_cannot_be_used_is_named(tmp_path: Path) -> None:
    (tmp_path / "notes.db").write_text("not a database\n")
    (tmp_path / "folder.db").mkdir()
    for name, said in (("notes.db", "refused: file is not a database"), ("folder.db", "unable")):
        done = subprocess.run(
            [*PORCH, "token", "list", "--db-url", f"sqlite:///{name}"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert done.returncode == 1, done.stderr
        assert f" database {tmp_path / name}" in done.stderr and said in done.stderr, done.stderr


def _journal_mode(path: Path) -> str:
    with contextlib.closing(sqlite3.connect(path)) as connection:
        [mode] = connection.execute("PRAGMA journal_mode").fetchone()
    return str(mode)


def test_db_upgrade_and_serve_refuse_another_programs_tables_plainly(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    url = f"sqlite:///{path}"
    run_sql(url, "CREATE TABLE task (task_id INTEGER PRIMARY KEY, state TEXT)")
    for command in (["db", "upgrade"], ["serve", "--grpc-port", "0", "--no-http"]):
        done = subprocess.run(
            [*PORCH, *command, "--db-url", url], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 1, done.stderr
        # serve logs its start first: the refusal is the last line.
        assert done.stderr.splitlines()[-1].startswith(
            "porch: the database already holds tables porch would create (task) with no record"
        ), done.stderr
        assert "Traceback" not in done.stderr
    # The file refused is left as it was, in its own journal mode.
    assert _journal_mode(path) == "delete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.db"]
    # porch's own file is put in WAL mode, which it keeps.
    porch("db", "upgrade", "--db-url", f"sqlite:///{tmp_path / 'porch.db'}")
    assert _journal_mode(tmp_path / "porch.db") == "wal"


def test_commands_refuse_npg_porchs_tables_plainly_on_postgresql(postgres_server: Any) -> None:
    url = postgres_server.create_database()
    try:
        run_sql(
            url,
            "CREATE TABLE task (task_id INTEGER PRIMARY KEY)",
            "CREATE TABLE event (event_id INTEGER PRIMARY KEY)",
        )
        # Commands that would only open the store say the same, not to upgrade.
        for command in (
            ["db", "upgrade"],
            ["serve", "--grpc-port", "0", "--no-http"],
            ["token", "list"],
        ):
            done = subprocess.run(
                [*PORCH, *command, "--db-url", url], capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 1, done.stderr
            last = done.stderr.splitlines()[-1]
            assert last.startswith("porch: schema "), done.stderr
            assert "already holds tables porch would create (event, task)" in last
            assert "--db-schema" in last
            assert "Traceback" not in done.stderr
        # A schema of porch's own that is not there yet holds nothing that clashes.
        done = subprocess.run(
            [*PORCH, "token", "list", "--db-url", url, "--db-schema", "porch"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1, done.stderr
        assert "schema porch, is not at the latest migration" in done.stderr
    finally:
        postgres_server.drop_database(url)


def test_commands_name_a_migration_this_porch_does_not_know(postgres_server: Any) -> None:
    url = postgres_server.create_database()
    try:
        migrate.upgrade(url)
        run_sql(url, "UPDATE alembic_version SET version_num = '9999'")
        for command in (["token", "list"], ["serve", "--grpc-port", "0", "--no-http"]):
            done = subprocess.run(
                [*PORCH, *command, "--db-url", url], capture_output=True, text=True, timeout=60
            )
            assert done.returncode != 0
            assert "records migration '9999', which this porch does not know" in done.stderr
            assert "run `porch db upgrade`" not in done.stderr
    finally:
        postgres_server.drop_database(url)


def _refusal(*command: str) -> str:
    """The last line a porch command that must fail wrote, checked for a traceback."""
    done = subprocess.run([*PORCH, *command], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    return done.stderr.splitlines()[-1]


def test_a_search_path_with_no_schema_to_use_is_named(postgres_server: Any) -> None:
    url = postgres_server.create_database()
    name = make_url(url).database
    try:
        run_sql(url, f'ALTER DATABASE "{name}" SET search_path = nowhere')
        for command in (["db", "upgrade"], ["serve", "--grpc-port", "0", "--no-http"]):
            last = _refusal(*command, "--db-url", url)
            assert last.startswith(
                "porch: the database has no schema to hold porch's tables: none on the "
                "search_path (nowhere) exists"
            ), last
            assert "--db-schema" in last
        # The way it names works.
        porch("db", "upgrade", "--db-url", url, "--db-schema", "porch")
        porch("token", "list", "--db-url", url, "--db-schema", "porch")
    finally:
        postgres_server.drop_database(url)


def test_a_search_path_in_the_urls_options_is_the_one_used(postgres_server: Any) -> None:
    url = postgres_server.create_database()

    def on_path(path: str) -> str:
        options = {"options": f"-c search_path={path}"}
        return make_url(url).update_query_dict(options).render_as_string(hide_password=False)

    try:
        run_sql(url, "CREATE SCHEMA s1")
        last = _refusal("db", "upgrade", "--db-url", on_path("nowhere"))
        assert "none on the search_path (nowhere) exists" in last, last
        porch("db", "upgrade", "--db-url", on_path("s1"))
        porch("token", "create", "--admin", "--description", "ops", "--db-url", on_path("s1"))
        engine = make_engine(url)
        try:
            with engine.connect() as connection:
                where = connection.exec_driver_sql(
                    "SELECT table_schema FROM information_schema.tables WHERE table_name = 'token'"
                ).scalars()
                assert [*where] == ["s1"]
        finally:
            engine.dispose()
    finally:
        postgres_server.drop_database(url)


def test_a_role_that_may_not_migrate_is_told_which_right_it_lacks(
    postgres_server: Any,
) -> None:
    url = postgres_server.create_database()
    role = f"porch_test_role_{os.getpid()}"
    run_sql(url, f'CREATE ROLE "{role}" LOGIN')
    weak = make_url(url).set(username=role).render_as_string(hide_password=False)
    try:
        # PostgreSQL 15 lets no one but its owner create in the public schema.
        last = _refusal("db", "upgrade", "--db-url", weak)
        assert last.startswith(
            "porch: the database refused porch's migration: permission denied for schema public."
            " Nothing was changed."
        ), last
        assert f"Grant the role porch connects as ({role}) CREATE on porch's schema" in last
        last = _refusal("db", "upgrade", "--db-url", weak, "--db-schema", "mine")
        assert last.startswith(
            "porch: the database refused to let porch create schema mine: permission denied"
            " for database"
        ), last
        assert f'CREATE SCHEMA "mine" AUTHORIZATION "{role}"' in last
        engine = make_engine(url)
        with engine.connect() as connection:
            made = connection.exec_driver_sql(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname IN ('public', 'mine')"
            ).scalar()
            schemas = connection.exec_driver_sql(
                "SELECT count(*) FROM pg_namespace WHERE nspname = 'mine'"
            ).scalar()
        engine.dispose()
        assert (made, schemas) == (0, 0)
        # Given the schema it names, the role migrates and serves.
        run_sql(url, f'CREATE SCHEMA mine AUTHORIZATION "{role}"')
        porch("db", "upgrade", "--db-url", weak, "--db-schema", "mine")
        porch("token", "list", "--db-url", weak, "--db-schema", "mine")
    finally:
        postgres_server.drop_database(url)
        run_sql(postgres_server.base_url, f'DROP ROLE IF EXISTS "{role}"')


def test_token_and_events_commands_make_no_database_of_their_own(tmp_path: Path) -> None:
    # Run from a directory other than the server's, they would otherwise
    # make tokens the server never hears of.
    for command in (
        ["token", "create", "--admin", "--description", "ops"],
        ["token", "list"],
        ["events", "prune", "--older-than-days", "30"],
    ):
        done = subprocess.run(
            [*PORCH, *command], capture_output=True, text=True, timeout=60, cwd=tmp_path
        )
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith("porch: no database at sqlite:///porch.db: give the")
    assert not (tmp_path / "porch.db").exists()


@pytest.mark.parametrize("made_by", ["another program", "touch"])
def test_commands_put_no_tables_in_a_sqlite_file_that_is_not_porchs(
    tmp_path: Path, made_by: str
) -> None:
    # A --db-url mistyped to another program's file, or an empty one.
    path = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(path)) as other:
        if made_by == "another program":
            other.execute("CREATE TABLE foo (n INTEGER)")
            other.commit()
    before = path.read_bytes()
    url = f"sqlite:///{path}"
    for command in (
        ["token", "create", "--admin", "--description", "ops"],
        ["token", "list"],
        ["events", "prune", "--older-than-days", "30"],
    ):
        done = subprocess.run(
            [*PORCH, *command, "--db-url", url], capture_output=True, text=True, timeout=60
        )
        assert (done.returncode, done.stdout) == (1, ""), done.stderr
        assert done.stderr == (
            f"porch: {url} is not a porch database (it records no migration of porch's): give"
            " the --db-url that porch serve uses, or make one with `porch db upgrade`. Nothing"
            " was changed.\n"
        )
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.db"]
    # Asked for, porch's tables go beside the other program's.
    porch("db", "upgrade", "--db-url", url)
    porch("token", "list", "--db-url", url)


def test_serve_refuses_an_out_of_date_postgresql_schema(postgres_server: Any) -> None:
    url = postgres_server.create_database()
    try:
        done = subprocess.run(
            [*PORCH, "serve", "--db-url", url, "--grpc-port", "0", "--no-http"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode != 0
        assert "not at the latest migration" in done.stderr and "porch db upgrade" in done.stderr
        # With no schema named, porch's tables may be in one that was forgotten.
        assert "name it with --db-schema (or PORCH_DB_SCHEMA) instead" in done.stderr
        # A schema is named, with its option: a misspelt one would be made anew.
        schema = ["--db-schema", "elsewhere"]
        listed = subprocess.run(
            [*PORCH, "token", "list", "--db-url", url, *schema],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ", schema elsewhere, is not at the latest migration" in listed.stderr
        assert "with the same --db-url and --db-schema" in listed.stderr
        assert "PORCH_DB_SCHEMA" not in listed.stderr
        # A password given as a query parameter is not shown either.
        secret = subprocess.run(
            [*PORCH, "token", "list", "--db-url", f"{url}?password=s3cret&sslmode=disable"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "?password=***&sslmode=disable is not at the latest" in secret.stderr
        assert "s3cret" not in secret.stderr
        assert migrate.head_revision() in porch("db", "upgrade", "--db-url", url)
        engine = make_engine(url)
        assert migrate.is_at_head(engine)
        engine.dispose()
        # porch's tables found there, at an older migration: its schema was not forgotten.
        with psycopg2.connect(
            make_url(url).set(drivername="postgresql").render_as_string(False)
        ) as db:
            db.cursor().execute("UPDATE alembic_version SET version_num = '0002'")
        behind = subprocess.run(
            [*PORCH, "token", "list", "--db-url", url], capture_output=True, text=True, timeout=60
        )
        assert "is not at the latest migration" in behind.stderr
        assert "--db-schema" not in behind.stderr
    finally:
        postgres_server.drop_database(url)


def test_serve_prints_the_first_admin_token_once_and_stops_on_sigterm(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'p.db'}"
    process, target = start_server(url)
    try:
        with grpc.insecure_channel(target) as channel:
            health = channel.unary_unary("/grpc.health.v1.Health/Check")
            assert health(b"", timeout=10) is not None
    finally:
        stop_server(process)
    # Revoking every admin token is not undone by the next start.
    porch("token", "revoke", "--db-url", url, "1")
    again, _ = start_server(url)
    again.terminate()
    assert again.stdout is not None
    rest = again.stdout.read()
    again.wait(timeout=30)
    again.stdout.close()
    assert "first admin token" not in rest
    assert porch("token", "list", "--all", "--db-url", url).count("ADMIN") == 1


def test_serve_raises_its_open_file_limit_to_what_the_system_allows(sqlite_url: str) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # the server inherits it
    try:
        process, _ = start_server(sqlite_url)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        limits = Path(f"/proc/{process.pid}/limits").read_text()
        [files] = [line.split()[3:5] for line in limits.splitlines() if "open files" in line]
        wanted = FILE_LIMIT if hard == resource.RLIM_INFINITY else min(hard, FILE_LIMIT)
        assert files == [str(wanted), "unlimited" if hard == resource.RLIM_INFINITY else str(hard)]
    finally:
        stop_server(process)


def test_tls_on_the_grpc_port(sqlite_url: str, tmp_path: Path) -> None:
    from porch_server.config import TLS

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(tmp_path / "server.pem")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    porch_server = start_porch(sqlite_url, tls=TLS(tmp_path / "cert.pem", tmp_path / "key.pem"))
    try:
        credentials = grpc.ssl_channel_credentials(ca.cert_pem.bytes())
        with grpc.secure_channel(
            porch_server.target.replace("127.0.0.1", "localhost"), credentials
        ) as channel:
            client = porch_pb2_grpc.PorchServiceStub(channel)
            listed = client.ListPipelines(
                pb.ListPipelinesRequest(),
                metadata=[("authorization", f"Bearer {porch_server.admin}")],
            )
            assert list(listed.pipelines) == []
        with grpc.insecure_channel(porch_server.target) as plain, pytest.raises(grpc.RpcError):
            porch_pb2_grpc.PorchServiceStub(plain).ListPipelines(
                pb.ListPipelinesRequest(), timeout=3
            )
        # The CLI without --tls says what the closed connection may mean.
        listing = [*PORCH, "pipeline", "list", "--target", porch_server.target]
        env = {**os.environ, "PORCH_TOKEN": porch_server.admin}
        done = subprocess.run(listing, capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 1 and "give --tls)" in done.stderr, done.stderr
        ca.cert_pem.write_to_path(tmp_path / "ca.pem")
        # TLS to a server that serves plain connections: OpenSSL's words alone.
        plain = start_porch(sqlite_url)
        try:
            tls_to_plain = [*PORCH, "pipeline", "list", "--target", plain.target, "--tls"]
            done = subprocess.run(tls_to_plain, capture_output=True, text=True, timeout=60, env=env)
        finally:
            plain.server.stop()
        assert done.returncode == 1, done.stderr
        assert (
            "(the server does not speak TLS: if it serves plain connections, leave out --tls)"
            in (done.stderr)
        ), done.stderr
        verified = [*listing, "--tls-ca", str(tmp_path / "ca.pem")]
        done = subprocess.run(verified, capture_output=True, text=True, timeout=60, env=env)
        assert done.returncode == 0, done.stderr
    finally:
        porch_server.server.stop()


def test_the_cli_and_the_gateway_present_client_certificates(
    sqlite_url: str, tmp_path: Path
) -> None:
    from porch_server.config import TLS

    ca = trustme.CA()
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    server = ca.issue_cert("localhost")
    server.private_key_pem.write_to_path(tmp_path / "key.pem")
    server.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    client = ca.issue_cert("wrapper@example.org")
    pems = ("ca.pem", "client.pem", "client-key.pem")
    client.cert_chain_pems[0].write_to_path(tmp_path / pems[1])
    client.private_key_pem.write_to_path(tmp_path / pems[2])
    tls = TLS(tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem")
    porch_server = start_porch(sqlite_url, tls=tls)
    target = porch_server.target.replace("127.0.0.1", "localhost")
    try:
        ca_file, cert_file, key_file = (str(tmp_path / name) for name in pems)
        common = ["--target", target, "--token", porch_server.admin, "--tls-ca", ca_file]
        pem = ["--tls-cert", cert_file, "--tls-key", key_file]
        porch("pipeline", "create", "mtls", "--uri", "u", "--version", "1", *common, *pem)
        assert json.loads(porch("pipeline", "get", "mtls", *common, *pem))["uri"] == "u"
        refused = subprocess.run(
            [*PORCH, "pipeline", "get", "mtls", *common], capture_output=True, text=True
        )
        assert refused.returncode != 0 and "UNAVAILABLE" in refused.stderr
        assert "give --tls-cert and --tls-key)" in refused.stderr, refused.stderr
        half = subprocess.run(
            [*PORCH, "pipeline", "get", "mtls", *common, *pem[:2]], capture_output=True, text=True
        )
        assert "--tls-cert and --tls-key go together" in half.stderr
        # One its client CA did not sign: said "Socket closed" alone.
        stranger = trustme.CA().issue_cert("stranger@example.org")
        stranger.cert_chain_pems[0].write_to_path(tmp_path / "stranger.pem")
        stranger.private_key_pem.write_to_path(tmp_path / "stranger-key.pem")
        foreign = ["--tls-cert", str(tmp_path / "stranger.pem")]
        foreign += ["--tls-key", str(tmp_path / "stranger-key.pem")]
        refused = subprocess.run(
            [*PORCH, "pipeline", "get", "mtls", *common, *foreign], capture_output=True, text=True
        )
        assert refused.returncode == 1 and "UNAVAILABLE" in refused.stderr
        assert "one its client CA did not sign, or expired; check --tls-cert)" in refused.stderr

        upstream = ["--target", target, "--target-tls-ca", ca_file]
        # Without a certificate, the gateway says so as it starts.
        log = tmp_path / "gateway.log"
        with running_gateway(*upstream, log=log):
            _wait_for_text(log, "cannot be reached now")
        warned = log.read_text()
        assert f"the server at {target} cannot be reached now (UNAVAILABLE: " in warned
        assert "give --target-tls-cert and --target-tls-key); requests are answered 503" in warned
        upstream += ["--target-tls-cert", cert_file, "--target-tls-key", key_file]
        with running_gateway(*upstream, log=log) as http_port:
            answer = httpx.get(
                f"http://127.0.0.1:{http_port}/pipelines/mtls",
                headers={"Authorization": f"Bearer {porch_server.admin}"},
            )
        assert answer.status_code == 200 and answer.json()["uri"] == "u"
        assert "cannot be reached" not in log.read_text()
    finally:
        porch_server.server.stop()


def test_workers_share_one_port_and_the_gateway_runs_alone(pg_url: str) -> None:
    admin = porch("token", "create", "--admin", "--description", "ops", "--db-url", pg_url).strip()
    port = _free_port()
    process, target = start_server(pg_url, "--workers", "2", "--grpc-port", str(port))
    try:
        metadata = [("authorization", f"Bearer {admin}")]
        with grpc.insecure_channel(target) as channel:
            client = porch_pb2_grpc.PorchServiceStub(channel)
            request = pb.CreatePipelineRequest(pipeline=pb.Pipeline(name="w", uri="u", version="1"))
            client.CreatePipeline(request, metadata=metadata)
        with running_gateway("--target", target, "--workers", "2") as http_port:
            answer = httpx.get(
                f"http://127.0.0.1:{http_port}/pipelines/w",
                headers={"Authorization": f"Bearer {admin}"},
            )
            assert answer.status_code == 200 and answer.json()["uri"] == "u"
            health = httpx.get(f"http://127.0.0.1:{http_port}/healthz").json()
            assert health == {"status": "SERVING"}
    finally:
        stop_server(process)


@contextlib.contextmanager
def running_gateway(*flags: str, log: Path | None = None) -> Iterator[int]:
    """`porch gateway` with flags on a free HTTP port, until the block ends;
    what it logs written to log (anew) if given."""
    http_port = _free_port()
    with contextlib.ExitStack() as stack:
        errors = stack.enter_context(log.open("w")) if log else subprocess.DEVNULL
        gateway = subprocess.Popen(
            [*PORCH, "gateway", *flags, "--http-port", str(http_port)],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
    assert gateway.stdout is not None
    try:
        assert "HTTP gateway on" in gateway.stdout.readline()
        yield http_port
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
        gateway.stdout.close()


def _wait_for_text(path: Path, text: str, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while text not in path.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)


def _workers_of(pid: int) -> set[int]:
    """The worker processes of a `porch serve`, not multiprocessing's helper."""
    workers = set()
    # Each thread's children are listed apart: replacements come from another thread.
    for thread in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            for child in (thread / "children").read_text().split():
                if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                    workers.add(int(child))
    return workers


def _running(pid: int) -> bool:
    """Whether a process runs: it exists, and is not a zombie left unreaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def _serve_logging_to(
    log: Path, db_url: str, *flags: str
) -> tuple[subprocess.Popen[str], int, str]:
    """`porch serve --no-http` with flags on a free gRPC port, logging to log:
    the process, its port and an admin token."""
    admin = porch("token", "create", "--admin", "--description", "ops", "--db-url", db_url).strip()
    port = _free_port()
    with log.open("w") as errors:
        process = subprocess.Popen(
            [*PORCH, "serve", "--db-url", db_url, "--no-http", "--grpc-port", str(port), *flags],
            stdout=subprocess.PIPE,
            stderr=errors,
            text=True,
        )
    return process, port, admin


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc (Linux)")
def test_a_worker_that_dies_is_replaced(pg_url: str, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    process, port, admin = _serve_logging_to(log, pg_url, "--workers", "3")
    try:
        assert process.stdout is not None
        assert "gRPC listening" in process.stdout.readline()
        deadline = time.monotonic() + 30
        while len(first := _workers_of(process.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(first) == 2
        killed = min(first)
        os.kill(killed, signal.SIGKILL)
        replaced = False
        while not replaced and time.monotonic() < deadline:
            time.sleep(0.1)
            now = _workers_of(process.pid)
            replaced = killed not in now and len(now) == 2
        assert replaced, now
        for _ in range(6):  # new connections, spread over the processes
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                porch_pb2_grpc.PorchServiceStub(channel).ListPipelines(
                    pb.ListPipelinesRequest(), metadata=[("authorization", f"Bearer {admin}")]
                )
        assert f"worker process {killed} ended with exit code -9; starting another" in (
            log.read_text()
        )
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0
        assert process.stdout is not None
        process.stdout.close()
    assert not any(Path(f"/proc/{worker}").exists() for worker in now)


def _wait_for_lock_waiters(db_url: str, seconds: float = 10) -> None:
    """Wait until sessions wait for locks on the database, and no more begin to."""
    database = make_url(db_url).database
    query = (
        "SELECT count(*) FROM pg_stat_activity"
        f" WHERE datname = '{database}' AND wait_event_type = 'Lock'"
    )
    engine = make_engine(db_url)
    try:
        deadline, seen, steady_since = time.monotonic() + seconds, -1, time.monotonic()
        while time.monotonic() < deadline:
            with engine.connect() as connection:
                count = connection.exec_driver_sql(query).scalar()
            if count != seen:
                seen, steady_since = count, time.monotonic()
            elif count and time.monotonic() - steady_since > 0.5:
                return
            time.sleep(0.05)
        assert seen > 0, "no call reached the database's locks"
    finally:
        engine.dispose()


def test_every_worker_stops_taking_calls_when_the_first_process_does(
    pg_url: str, tmp_path: Path
) -> None:
    # Calls held in flight in every process (each waits for a task locked
    # here): the first process's grace period is then not over at once.
    log, flags = tmp_path / "serve.log", ["--workers", "2", "--shutdown-grace-seconds", "30"]
    process, port, admin = _serve_logging_to(log, pg_url, *flags)
    holder = make_engine(pg_url)
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for _ in range(16)]
    try:
        assert process.stdout is not None
        # Both processes listening, their signal handlers set.
        assert all("gRPC listening" in process.stdout.readline() for _ in range(2))
        metadata = [("authorization", f"Bearer {admin}")]
        client = porch_pb2_grpc.PorchServiceStub(channels[0])
        pipeline = pb.Pipeline(name="w", uri="u", version="1")
        client.CreatePipeline(pb.CreatePipelineRequest(pipeline=pipeline), metadata=metadata)
        wrapper = client.CreateToken(
            pb.CreateTokenRequest(pipeline_name="w", description="wrapper"), metadata=metadata
        ).token
        tasks = []
        for n in range(len(channels)):
            task = pb.Task(pipeline=pb.Pipeline(name="w"))
            task.task_input.update({"n": n})
            request = pb.RegisterTaskRequest(task=task)
            wrapping = [("authorization", f"Bearer {wrapper}")]
            tasks.append(client.RegisterTask(request, metadata=wrapping).task)
        with holder.begin() as connection:
            connection.exec_driver_sql("SELECT 1 FROM task FOR UPDATE")
            waiting = []
            for channel, task in zip(channels, tasks, strict=True):
                update = pb.Task(pipeline=task.pipeline, task_input_id=task.task_input_id)
                update.status = pb.Task.CANCELLED
                call = porch_pb2_grpc.PorchServiceStub(channel).UpdateTask.future(
                    pb.UpdateTaskRequest(task=update),
                    metadata=[("authorization", f"Bearer {wrapper}")],
                )
                waiting.append(call)
            _wait_for_lock_waiters(pg_url)  # calls in flight, in both processes most likely
            process.terminate()
            deadline = time.monotonic() + 5
            stopping = "shutting down: finishing calls in flight"
            while log.read_text().count(stopping) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert log.read_text().count(stopping) == 2, log.read_text()
        # Made once the lock went, or (a call that had not arrived) refused as the server stopped.
        codes = [call.exception(timeout=30) and call.code() for call in waiting]
        assert set(codes) <= {None, grpc.StatusCode.UNAVAILABLE} and codes.count(None) >= 2
        assert process.wait(timeout=30) == 0
    finally:
        for channel in channels:
            channel.close()
        holder.dispose()
        if process.poll() is None:
            process.kill()
        assert process.stdout is not None
        process.stdout.close()


def test_workers_stopped_while_one_is_replaced_all_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    spawn = multiprocessing.get_context("spawn").Process
    start, starts, replacing = spawn.start, [], threading.Event()

    def slow_start(process: Any) -> None:
        starts.append(process)
        if len(starts) > 1:  # the replacement of the worker that failed
            replacing.set()
            time.sleep(0.5)
        start(process)

    monkeypatch.setattr(spawn, "start", slow_start)
    with cli._extra_workers(os._exit, (1,), 1) as stop:  # a worker that fails at once
        assert replacing.wait(30)
        stop()  # while the replacement starts
        for process in starts:
            process.join(10)
        assert not any(process.is_alive() for process in starts)
    assert len(starts) == 2


def test_workers_refuse_a_port_another_server_shares(sqlite_url: str) -> None:
    # As another `--workers` deployment holds it: listening with SO_REUSEPORT.
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        flags = ["--workers", "2", "--no-http", "--grpc-port", str(port)]
        done = subprocess.run(
            [*PORCH, "serve", "--db-url", sqlite_url, *flags],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode != 0
    assert f"cannot serve on 127.0.0.1 port {port}: Address already in use: --workers" in (
        done.stderr
    ), done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc (Linux)")
def test_workers_end_with_the_process_that_started_them(pg_url: str, tmp_path: Path) -> None:
    flags = ["--no-http", "--grpc-port", str(_free_port()), "--workers", "2"]
    printed = tmp_path / "printed"
    with printed.open("w") as output:
        process = subprocess.Popen(
            [*PORCH, "serve", "--db-url", pg_url, *flags],
            stdout=output,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + 30
    while not (workers := _workers_of(process.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    while "gRPC listening" not in printed.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    [worker] = workers
    process.kill()  # no chance to stop its workers
    process.wait(timeout=30)
    while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = Path(f"/proc/{worker}").exists()
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive, "the worker outlived its parent"


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_signal_ends_the_grace_period_at_once(
    sqlite_url: str, tmp_path: Path, workers: int
) -> None:
    # As a second Ctrl-C does: to the whole process group, workers and all
    # (each worker also gets its parent's SIGTERM between the two).
    secret = _pipeline_p_and_its_token(sqlite_url)
    port = _free_port()
    flags = ["--no-http", "--grpc-port", str(port), "--workers", str(workers)]
    logged = tmp_path / "stderr"
    with logged.open("w") as stderr:
        process = subprocess.Popen(
            [*PORCH, "serve", "--db-url", sqlite_url, *flags, "--shutdown-grace-seconds", "120"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            start_new_session=True,
        )
    pending = threading.Event()

    def never_sent() -> Iterator[bytes]:
        pending.wait(60)
        return
        yield

    channels = []
    try:
        assert process.stdout is not None
        assert "gRPC listening" in "".join(process.stdout.readline() for _ in range(2))
        deadline = time.monotonic() + 30
        while len(_workers_of(process.pid)) < workers - 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        worker_pids = _workers_of(process.pid)
        calls = []
        # Calls left waiting for their requests, on connections of their own:
        # some reach each process (SO_REUSEPORT shares them out).
        for _ in range(4 * workers):
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            channels.append(channel)
            grpc.channel_ready_future(channel).result(timeout=30)
            register = channel.stream_unary("/porch.v1.PorchService/RegisterTasks")
            metadata = [("authorization", f"Bearer {secret}")]
            calls.append(register.future(never_sent(), metadata=metadata, timeout=60))
        time.sleep(0.5)
        os.killpg(process.pid, signal.SIGINT)
        time.sleep(1.0)
        assert process.poll() is None, "a call in flight has a grace period of 120 s"
        second = time.monotonic()
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=20) == 1
        assert time.monotonic() - second < 15
        for call in calls:
            assert call.exception(timeout=20).code() == grpc.StatusCode.UNAVAILABLE
        deadline = time.monotonic() + 10
        while any(_running(pid) for pid in worker_pids):
            assert time.monotonic() < deadline, "a worker outlived the second signal"
            time.sleep(0.1)
    finally:
        pending.set()
        for channel in channels:
            channel.close()
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        assert process.stdout is not None
        process.stdout.close()
    assert "signalled again while stopping: stopping now" in logged.read_text()


def _h2_request(port: int, path: bytes) -> None:
    """Send one HTTP/2 gRPC request for path, whatever its bytes (a gRPC
    client sends only text), and read what comes back for a second."""

    def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
        return (
            len(payload).to_bytes(3, "big")
            + bytes([kind, flags])
            + stream.to_bytes(4, "big")
            + payload
        )

    def header(name: bytes, value: bytes) -> bytes:  # a literal, not indexed; short
        return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value

    fields = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path),
        (b":authority", b"porch"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]
    block = b"".join(header(name, value) for name, value in fields)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b""))
        sock.sendall(frame(1, 4, 1, block) + frame(0, 1, 1, b"\x00" * 5))
        sock.settimeout(1)
        with contextlib.suppress(OSError):
            while sock.recv(65536):
                pass


@pytest.mark.parametrize("stuck", [False, True])
def test_a_grpc_server_that_stops_of_its_own_accord_ends_its_process(
    sqlite_url: str, tmp_path: Path, stuck: bool
) -> None:
    # grpc.aio's serving loop fails on a method name that is not UTF-8 and
    # stops the server: the process would go on with its port refusing
    # every connection. It ends, exit code 1, for its supervisor to restart;
    # a write still waiting for the database's lock then is abandoned with
    # it, as at any stop, not made later.
    logged = tmp_path / "stderr"
    serve = ["serve", "--db-url", sqlite_url, *ZERO_PORTS]
    with logged.open("w") as stderr:
        process = subprocess.Popen(
            [*PORCH, *serve, "--shutdown-grace-seconds", "1"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    locker = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
    threads = concurrent.futures.ThreadPoolExecutor(1)
    try:
        assert process.stdout is not None
        lines = "".join(process.stdout.readline() for _ in range(3))
        port = int(re.search(r"gRPC listening on \S+:(\d+)", lines).group(1))  # type: ignore[union-attr]
        http = lines.split("HTTP gateway on ")[1].split()[0].rstrip("/")
        admin = lines.split("(shown only now): ")[1].split()[0]
        if stuck:
            locker.execute("BEGIN IMMEDIATE")
            threads.submit(
                httpx.post,
                f"{http}/v1/pipelines",
                json={"name": "stuck", "uri": "https://example.org/p", "version": "1"},
                headers={"Authorization": f"Bearer {admin}"},
                timeout=60,
            )
            time.sleep(1)  # its statement waits for the lock
        started = time.monotonic()
        _h2_request(port, b"/\xff\xfe/x")
        assert process.wait(timeout=30) == 1
        assert time.monotonic() - started < 15, "it waited for the lock"
        if stuck:
            locker.execute("ROLLBACK")  # the lock released: a write left would go on now
        made = locker.execute("SELECT count(*) FROM pipeline WHERE name = 'stuck'").fetchone()
        assert made == (0,)
    finally:
        threads.shutdown(wait=False)
        locker.close()
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stdout is not None
        process.stdout.close()
    assert "the gRPC server stopped serving of its own accord" in logged.read_text()


def test_watch_fails_at_once_when_the_server_cannot_be_reached() -> None:
    # Like every other command; once it has been connected, it reconnects.
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    started = time.monotonic()
    done = subprocess.run(
        [*PORCH, "watch", "--target", f"127.0.0.1:{port}", "--token", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert "UNAVAILABLE" in done.stderr and "reconnecting" not in done.stderr
    assert time.monotonic() - started < 30


def test_a_watch_ends_as_soon_as_its_reader_leaves(sqlite_url: str) -> None:
    # `porch watch | head -1` on a quiet stream ends with head, not at the
    # next event (which may be hours away).
    secret = _pipeline_p_and_its_token(sqlite_url)
    process, target = start_server(sqlite_url)
    try:
        porch("task", "register", "--pipeline", "p", "--target", target, "--token", secret, "{}")
        watch = subprocess.Popen(
            [*PORCH, "watch", "--after", "0.0", "--target", target, "--token", secret],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert watch.stdout is not None and watch.stderr is not None
        try:
            assert " p " in watch.stdout.readline()  # the one event: the stream is open
            watch.stdout.close()
            assert watch.wait(timeout=20) == 141
        finally:
            watch.kill()
            _, errors = watch.communicate(timeout=60)
        assert errors == ""
    finally:
        stop_server(process)


def test_version_and_every_option_has_help() -> None:
    assert porch("--version").strip() == f"porch {importlib.metadata.version('porch')}"
    for command in (
        ["pipeline", "create"],
        ["pipeline", "list"],
        ["task", "register"],
        ["task", "claim"],
        ["task", "update"],
        ["task", "events"],
        ["token", "revoke"],
        ["events", "prune"],
    ):
        text = porch(*command, "--help")
        options = text[text.index("options:") :]
        # An option or argument without help is a line of its name alone, not
        # followed by its help on the next line (argparse's for long names).
        lines = [*text.splitlines(), ""]
        bare = [
            line
            for line, after in itertools.pairwise(lines)
            if re.fullmatch(r"  \S+( [A-Z_]+)?", line) and not after.startswith(" " * 10)
        ]
        assert not bare, (command, bare)
        assert "-h, --help" in options


def test_openapi_command_prints_the_document() -> None:
    document = json.loads(porch("openapi"))
    assert document["openapi"].startswith("3.1")
    assert "TaskStateEnum" in document["components"]["schemas"]


def test_task_register_reads_stdin_in_batches_and_checks_it_first(sqlite_url: str) -> None:
    secret = _pipeline_p_and_its_token(sqlite_url)
    process, target = start_server(sqlite_url)
    try:

        def register(lines: str, token: str = secret) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*PORCH, "task", "register", "--pipeline", "p", "-", "--target", target],
                input=lines,
                capture_output=True,
                text=True,
                timeout=120,
                env={**os.environ, "PORCH_TOKEN": token},
            )

        # Nothing to register (a cron run with nothing new) is no error.
        assert (register("").returncode, register("").stdout) == (0, "")
        # A bad line stops the command before anything is sent, and is named:
        # one that is not JSON, or one the server would refuse.
        bad = register('{"n": 1}\n\n{"n": 2\n')
        assert bad.returncode == 1 and bad.stdout == ""
        assert bad.stderr.startswith("porch: line 3 of stdin: the task input is not JSON: ")
        assert bad.stderr.endswith(", got '{\"n\": 2\\n'\n"), bad.stderr
        late = "".join(f'{{"n": {n}}}\n' for n in range(1500)) + '{"n": NaN}\n'
        refused = register(late)
        assert refused.returncode == 1 and refused.stdout == ""
        assert refused.stderr == (
            "porch: line 1501 of stdin: the task input is not JSON: NaN (at n) is not a JSON"
            " number; JSON has no NaN or infinity, got '{\"n\": NaN}\\n'\n"
        ), refused.stderr
        inexact = register('{"n": 1}\n{"ids": [1, 9007199254740993]}\n')
        assert inexact.returncode == 1 and inexact.stdout == ""
        assert inexact.stderr.startswith(
            "porch: line 2 of stdin: ids[1]: the integer 9007199254740993 would be stored as "
            "9007199254740992"
        ), inexact.stderr
        # A key given twice: which value was meant? The gateway refuses it too.
        twice = register('{"n": 1}\n{"n": 2, "m": {"k": 1, "k": 2}}\n')
        assert twice.returncode == 1 and twice.stdout == ""
        assert (
            twice.stderr == "porch: line 2 of stdin: the task input names 'k' twice in one object\n"
        )
        long = register('{"n": 1}\n{"n": 1' + "0" * 5000 + "}\n")
        assert long.returncode == 1 and long.stdout == ""
        assert long.stderr.startswith(
            "porch: line 2 of stdin: the task input holds a number too long to read: the"
            " integer 1000"
        ), long.stderr
        assert "(5001 digits) is past any number a field or a JSON value holds" in long.stderr
        tiny = register('{"n": 1}\n{"n": 1e-400}\n')
        assert (tiny.returncode, tiny.stdout) == (1, "")
        assert tiny.stderr == (
            "porch: line 2 of stdin: the number 1e-400 is too small for a double, which would"
            " hold it as 0; send it as a string\n"
        )
        deep = register('{"n": 1}\n{"a": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
        assert (deep.returncode, deep.stdout) == (1, "")
        assert deep.stderr == "porch: line 2 of stdin: the task input nests too deeply\n"
        assert register('{"n": 1}').stdout.count('"created": true') == 1  # nothing sent before
        # An empty input is one too, as it is over HTTP.
        empty = register("{}\n")
        assert empty.returncode == 0 and '"created": true' in empty.stdout, empty.stderr
        update = ["task", "update", "--pipeline", "p", "--input", "{}", "--status", "CANCELLED"]
        cancelled = subprocess.run(
            [*PORCH, *update, "--target", target],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PORCH_TOKEN": secret},
        )
        assert '"status": "CANCELLED"' in cancelled.stdout, cancelled.stderr
        # More than one call carries, and a token read from a file with its
        # line break: every task is registered, each answer printed.
        many = "".join(json.dumps({"n": n, "pad": "x" * 2000}) + "\n" for n in range(2500))
        done = register(many, secret + "\r\n")
        assert done.returncode == 0, done.stderr
        answers = [json.loads(line) for line in done.stdout.splitlines()]
        assert [a["task"]["task_input"]["n"] for a in answers] == list(range(2500))
        assert all(a["created"] for a in answers)
        # A reader that leaves at once (`| head -1`) does not cut it short.
        reader_gone = subprocess.Popen(
            [*PORCH, "task", "register", "--pipeline", "p", "-", "--target", target],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PORCH_TOKEN": secret},
        )
        assert reader_gone.stdout is not None
        reader_gone.stdout.close()
        more = "".join(json.dumps({"more": n}) + "\n" for n in range(2500))
        _, errors = reader_gone.communicate(more, timeout=120)
        assert (reader_gone.returncode, errors) == (141, "")
        again = register(more)
        assert again.stdout.count('"created": false') == 2500, again.stderr
    finally:
        stop_server(process)


def test_a_token_file_keeps_the_token_off_the_command_line(sqlite_url: str, tmp_path: Path) -> None:
    # A flag's value is there for anyone on the machine to read in ps; a
    # file's contents are not.
    secret = _pipeline_p_and_its_token(sqlite_url)
    held = tmp_path / "token"
    held.write_text(secret + "\n")
    wrong = tmp_path / "wrong"
    wrong.write_text(new_secret())
    for path in (held, wrong):  # as the README makes them: others would be warned of
        path.chmod(0o600)
    process, target = start_server(sqlite_url)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PORCH_TOKEN")}

        def get(*flags: str, **more: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*PORCH, "pipeline", "get", "p", "--target", target, *flags],
                capture_output=True,
                text=True,
                timeout=60,
                env={**env, **more},
            )

        for done in (get("--token-file", str(held)), get(PORCH_TOKEN_FILE=str(held))):
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["name"] == "p"
        refused = get("--token-file", str(wrong))
        assert refused.returncode == 1
        assert refused.stderr.startswith("porch: UNAUTHENTICATED: "), refused.stderr
        # The flag comes before the environment, whichever form either takes.
        assert get("--token-file", str(held), PORCH_TOKEN="x").returncode == 0
        assert get("--token", secret, PORCH_TOKEN_FILE=str(wrong)).returncode == 0
    finally:
        stop_server(process)


def test_a_token_file_that_cannot_be_used_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def metadata(*flags: str) -> tuple[tuple[str, str], ...]:
        args = cli._parser().parse_args(["pipeline", "get", "p", *flags])
        return client._metadata(args)

    def refused(message: str, *flags: str) -> None:
        with pytest.raises(SystemExit) as caught:
            metadata(*flags)
        assert caught.value.code == message

    def held(name: str, data: bytes) -> str:
        (tmp_path / name).write_bytes(data)
        return str(tmp_path / name)

    def q(path: object) -> str:  # as messages show a path
        return shlex.quote(str(path))

    alone = "; it should hold the token alone"
    characters = " holds white space, control or non-ASCII characters, which no porch token has"
    not_shown = ": No such file or directory; its value, not shown, looks like a token itself"
    assert metadata() == ()
    missing = str(tmp_path / "missing")
    refused(
        f"porch: cannot read --token-file {q(missing)}: No such file or directory",
        "--token-file",
        missing,
    )
    refused(
        f"porch: cannot read --token-file {q(tmp_path)}: Is a directory",
        "--token-file",
        str(tmp_path),
    )
    empty = held("empty", b" \r\n")
    refused(
        f"porch: --token-file {q(empty)} is empty{alone}",
        "--token-file",
        empty,
    )
    # As large as a token file may be, then a byte more; and a device that
    # never ends, read no further than that.
    assert metadata("--token-file", held("full", b"t" * 4096)) == (
        ("authorization", "Bearer " + "t" * 4096),
    )
    over = held("over", b"t" * 4097)
    refused(
        f"porch: --token-file {q(over)} is larger than 4,096 bytes{alone}",
        "--token-file",
        over,
    )
    refused(
        f"porch: --token-file /dev/zero is larger than 4,096 bytes{alone}",
        "--token-file",
        "/dev/zero",
    )
    # Line breaks and spaces around the token go; other white space stays and is refused.
    assert metadata("--token-file", held("crlf", b"  tok\r\n\n")) == (
        ("authorization", "Bearer tok"),
    )
    for name, data in (("two", b"first\nsecond\n"), ("nbsp", b"tok\xa0\n"), ("sep", b"tok\x1c")):
        path = held(name, data)
        refused(
            f"porch: the token in --token-file {q(path)}{characters}",
            "--token-file",
            path,
        )
    spaced = held("a name with spaces", b"\n")
    assert q(spaced) == f"'{spaced}'"
    refused(
        f"porch: --token-file {q(spaced)} is empty{alone}",
        "--token-file",
        spaced,
    )
    # A token given where a file's path goes is not shown.
    secret = new_secret().lstrip("-")
    refused(
        f"porch: cannot read --token-file{not_shown}, which goes in --token",
        "--token-file",
        secret,
    )

    # The environment: each variable, an empty one unset.
    monkeypatch.setenv("PORCH_TOKEN_FILE", secret)
    refused(f"porch: cannot read $PORCH_TOKEN_FILE{not_shown}, which goes in $PORCH_TOKEN")
    monkeypatch.setenv("PORCH_TOKEN_FILE", empty)
    refused(f"porch: the file $PORCH_TOKEN_FILE names ({q(empty)}) is empty{alone}")
    monkeypatch.setenv("PORCH_TOKEN_FILE", missing)
    refused(
        f"porch: cannot read the file $PORCH_TOKEN_FILE names ({q(missing)}):"
        " No such file or directory"
    )
    monkeypatch.setenv("PORCH_TOKEN_FILE", held("env", b"from-file\n"))
    assert metadata() == (("authorization", "Bearer from-file"),)
    monkeypatch.setenv("PORCH_TOKEN", " \n")  # blank: unset
    assert metadata() == (("authorization", "Bearer from-file"),)
    monkeypatch.setenv("PORCH_TOKEN", "abc")
    refused(
        "porch: both $PORCH_TOKEN and $PORCH_TOKEN_FILE are set; unset one"
        " (or give --token or --token-file, which come first)"
    )
    # A flag comes first, whichever variables are set.
    assert metadata("--token", "def") == (("authorization", "Bearer def"),)
    assert metadata("--token-file", held("flag", b"ghi")) == (("authorization", "Bearer ghi"),)
    monkeypatch.setenv("PORCH_TOKEN_FILE", "")
    assert metadata() == (("authorization", "Bearer abc"),)
    monkeypatch.setenv("PORCH_TOKEN", "a\tb")
    refused(f"porch: the token in $PORCH_TOKEN{characters}")


def test_a_token_file_others_may_read_is_warned_of(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # As ssh warns of a key: the call goes on, and the warning says how to mend it.
    held = tmp_path / "a token"
    held.write_bytes(b"tok\n")
    args = cli._parser().parse_args(["pipeline", "get", "p", "--token-file", str(held)])
    for mode, warned in ((0o600, False), (0o400, False), (0o640, True), (0o604, True)):
        held.chmod(mode)
        assert client._metadata(args) == (("authorization", "Bearer tok"),)
        err = capsys.readouterr().err
        if warned:
            assert err == (
                f"porch: warning: --token-file '{held}' may be read by other users of this"
                f" machine (mode 0{mode:o}); `chmod 600 '{held}'` keeps the token its owner's\n"
            )
        else:
            assert err == ""
    # Not a file that has a mode of its own: a pipe, as in --token-file <(pass show porch).
    read, write = os.pipe()
    os.write(write, b"piped\n")
    os.close(write)
    piped = cli._parser().parse_args(["pipeline", "get", "p", "--token-file", f"/dev/fd/{read}"])
    try:
        assert client._metadata(piped) == (("authorization", "Bearer piped"),)
    finally:
        os.close(read)
    assert capsys.readouterr().err == ""
    # A path chmod would take for an option is named so that it is not.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-t").write_bytes(b"tok\n")
    (tmp_path / "-t").chmod(0o644)
    dashed = cli._parser().parse_args(["pipeline", "get", "p", "--token-file=-t"])
    client._metadata(dashed)
    assert "`chmod 600 ./-t` keeps" in capsys.readouterr().err
    # One whose reader could not mend it is not warned of: another user's
    # file (a secret mounted for the service, say).
    held.chmod(0o644)
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(held).st_uid + 1)
    assert client._metadata(args) == (("authorization", "Bearer tok"),)
    assert capsys.readouterr().err == ""


def test_output_to_a_reader_that_left_ends_quietly() -> None:
    # As in `porch task list | head -1`: the reader is gone before porch writes.
    process = subprocess.Popen(
        [*PORCH, "openapi"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    process.stdout.close()
    _, errors = process.communicate(timeout=60)
    assert (process.returncode, errors) == (141, "")


def test_token_list_to_a_reader_that_left_ends_quietly(sqlite_url: str) -> None:
    porch("token", "create", "--admin", "--description", "ops", "--db-url", sqlite_url)
    process = subprocess.Popen(
        [*PORCH, "token", "list", "--db-url", sqlite_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    process.stdout.close()
    _, errors = process.communicate(timeout=60)
    assert (process.returncode, errors) == (141, "")


def test_a_vanished_database_is_unavailable(postgres_server: Any, pg_template: str) -> None:
    url = postgres_server.create_database(template=pg_template)
    running = start_porch(url)
    try:
        admin = running.stub(running.admin)
        admin.ListPipelines(pb.ListPipelinesRequest())
        postgres_server.drop_database(url)
        with pytest.raises(grpc.RpcError) as raised:
            admin.GetPipeline(pb.GetPipelineRequest(name="p"))
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        assert "database" in raised.value.details()  # type: ignore[attr-defined]
    finally:
        running.server.stop()


def _free_port() -> int:
    """A port free now, for a server that must be given one (--workers).

    Taken below the range the system hands out for port 0 and for outgoing
    connections, so that no other test's connection takes it before the
    server binds it.
    """
    ranges = Path("/proc/sys/net/ipv4/ip_local_port_range")
    low = int(ranges.read_text().split()[0]) if ranges.exists() else 0
    for _ in range(100 if low > 2048 else 0):
        port = random.randrange(max(1024, low - 12_000), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # elsewhere, any the system gives
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_ports_in_use_or_out_of_range_are_one_line_errors(sqlite_url: str) -> None:
    def serve(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*PORCH, "serve", "--db-url", sqlite_url, *flags],
            capture_output=True,
            text=True,
            timeout=60,
        )

    wrapped = serve("--grpc-port", "99999")
    assert wrapped.returncode == 2 and "not a port number from 0 to 65535" in wrapped.stderr
    process, target = start_server(sqlite_url)
    try:
        taken = serve("--grpc-port", target.rsplit(":", 1)[1], "--no-http")
        assert taken.returncode == 1, taken.stderr
        in_use = f"porch: cannot serve on 127.0.0.1 port {target.rsplit(':', 1)[1]}: Address"
        assert in_use in taken.stderr, taken.stderr
    finally:
        stop_server(process)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        busy = serve("--grpc-port", "0", "--http-port", str(port))
    assert busy.returncode == 1, busy.stderr
    assert f"porch: cannot serve on 127.0.0.1 port {port}: Address already in use" in busy.stderr
    assert "Traceback" not in busy.stderr + taken.stderr


def test_a_missing_ca_file_is_a_one_line_error() -> None:
    done = subprocess.run(
        [*PORCH, "pipeline", "list", "--tls-ca", "/nonexistent/ca.pem", "--token", "x"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == "porch: --tls-ca /nonexistent/ca.pem: No such file or directory"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["serve", "--lease-sweep-seconds", "0"], "not a positive number: '0'"),
        (["serve", "--watch-poll-seconds", "nan"], "not a finite number: 'nan'"),
        (["serve", "--watch-keepalive-seconds", "-1"], "not a positive number: '-1'"),
        (["serve", "--event-retention-days", "-1"], "not a number of days above 0 and at"),
        (["serve", "--event-retention-days", "0"], "above 0 and at most 36500: '0'"),
        (["events", "prune", "--older-than-days", "1e9"], "not a number of days from 0"),
        (["serve", "--db-url", "notaurl"], "not a database URL: 'notaurl'"),
        (["db", "upgrade", "--db-url", "u:SECRETPW@h/x"], "not a database URL: 'u:***@h/x'"),
        (["serve", "--db-url", "postgresql+pg8000://u@h/d"], "unsupported database URL"),
        (["serve", "--db-url", "nonsense://x"], "unsupported database URL"),
        (["serve", "--no-http", "--http-port", "9000"], "ask for no HTTP port and for one"),
        (["pipeline", "list", "--target", "127.0.0.1"], "expected HOST:PORT"),
        (["pipeline", "list", "--target", "http://127.0.0.1:50051"], "expected HOST:PORT"),
        (["gateway", "--target", "127.0.0.1:99999"], "expected HOST:PORT"),
        (["task", "update", "--pipeline", "p", "--id", "x", "--status", "CLAIMED"], "choice"),
        (["serve", "--tls-client-ca", "ca.pem"], "--tls-cert and --tls-key go together"),
        (["serve", "--workers", "2", "--grpc-port", "50999", "--http-port", "0"], "fixed"),
        (["serve", "--shutdown-grace-seconds", "0"], "not a positive number: '0'"),
        (["serve", "--max-streams", "0"], "--max-streams: not a whole number from 1 to 1,000,000"),
        (["serve", "--max-streams-per-token", "x"], "--max-streams-per-token: not a whole"),
        (
            ["serve", "--max-streams", "5", "--max-streams-per-token", "6"],
            "--max-streams-per-token 6 is more than --max-streams 5",
        ),
        (
            ["task", "claim", "--pipeline", "p", "--lease", "2592001", "--target", "h:1"],
            "got 2,592,001\n",
        ),
        (["task", "claim", "--pipeline", "p", "--lease", "0", "--target", "h:1"], "got 0\n"),
        (["task", "claim", "--pipeline", "p", "--lease", "-0.5", "--target", "h:1"], "got -0.5\n"),
        (["serve", "--db-pool-size", "0"], "not a whole number from 1 to 1,000: '0'"),
        (["serve", "--db-pool-size", "2.5"], "not a whole number from 1 to 1,000: '2.5'"),
        (["gateway", "--target", "h:1", "--shutdown-grace-seconds", "inf"], "not a finite"),
        (["gateway", "--target", "h:1", "--target-tls-key", "k.pem"], "go together"),
        (["serve", "--host", "no-such-host.invalid"], "--host no-such-host.invalid: "),
        (["serve", "--host", ""], "--host is empty"),
        (["gateway", "--target", "h:1", "--host", "192.0.2.1"], "Cannot assign requested address"),
        (["serve", "--log-config", "missing.json"], "--log-config missing.json: No such file"),
        (["serve", "--tls-cert", "c.pem", "--tls-key", "k.pem"], "--tls-cert c.pem: No such file"),
        (["serve", "--grpc-port", "8088", "--http-port", "8088"], "are both 8088: give two"),
        (["serve", "--db-url", "sqlite://"], "sqlite:// names no database file"),
        (["db", "upgrade", "--db-url", "sqlite:///:memory:"], "names no database file"),
        (["db", "upgrade", "--db-url", "sqlite:///file::memory:?uri=true"], "a SQLite URI file"),
        (["serve", "--db-url", "sqlite:///porch.db?mode=memory"], "names no database file"),
        (["token", "list", "--db-url", "sqlite:///file:p.db?uri=true"], "porch does not open"),
        (["token", "list", "--db-url", "sqlite:///porch.db?uri=1&cache=private"], "URI filename"),
        (["serve", "--db-url", "postgresql://u@h/d?port=x"], "d?port=x (Received non-integer"),
        ([*UPGRADE_PG, "--db-schema", "pg_x"], "pg_*"),
        ([*UPGRADE_PG, "--db-schema", "information_schema"], "keeps pg_* and information_schema"),
        ([*UPGRADE_PG, "--db-schema", "a" * 64], "at most 63 characters"),
        (["token", "list", "--db-url", "postgresql://x@h/d?bogus=1"], "the database refused: inv"),
        (
            ["token", "list", "--db-url", "postgresql://u:pw@h:abc/d"],
            "u:***@h:abc/d' (invalid literal",
        ),
        (["task", "claim", "--pipeline", "p", "--lease", "inf"], "not a finite number: 'inf'"),
        (["task", "claim", "--pipeline", "p", "--lease", "nan"], "not a finite number: 'nan'"),
        (
            [
                "task",
                "update",
                "--pipeline",
                "p",
                "--id",
                "a" * 64,
                "--status",
                "DONE",
                "--claim-number",
                "0",
            ],
            "not a claim's number (a whole number from 1 to 2,147,483,647): '0'",
        ),
        (
            ["task", "register", "--pipeline", "p", "--token", "two words", "{}"],
            "the token given by --token holds white space",
        ),
        (["pipeline", "list", "--token-file", ""], "argument --token-file: an empty path"),
        (
            ["pipeline", "list", "--token", "t", "--token-file", "t"],
            "argument --token-file: not allowed with argument --token",
        ),
    ],
)
def test_option_values_that_cannot_work_are_refused_in_one_line(
    flags: list[str], message: str, tmp_path: Path
) -> None:
    done = subprocess.run(
        [*PORCH, *flags], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert done.returncode in (1, 2), done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "porch.db").exists() or flags[0] == "events"


def test_the_shutdown_grace_is_the_operators() -> None:
    from porch_server.cli import _config, _parser

    assert _config(_parser().parse_args(["serve"])).grace_seconds == 10
    args = _parser().parse_args(["serve", "--shutdown-grace-seconds", "120"])
    assert _config(args).grace_seconds == 120


def test_a_tokens_share_of_the_streams_follows_the_streams_kept() -> None:
    from porch_server.cli import _config, _parser

    def share(*flags: str) -> int:
        return _config(_parser().parse_args(["serve", *flags])).max_streams_per_token

    assert share() == 1_000
    assert (share("--max-streams", "50"), share("--max-streams", "5")) == (5, 1)
    assert share("--max-streams", "50", "--max-streams-per-token", "50") == 50


@contextlib.contextmanager
def _listings_waiting_on_a_lock(
    pg_url: str, grace: float = 1
) -> Iterator[tuple[subprocess.Popen[str], grpc.Channel, Any, Any]]:
    """A stopping server (see _stopping_server) with a ListPipelines call over
    gRPC and a GET /v1/pipelines over HTTP, both waiting for a lock on the
    pipeline table: the process, a channel to it, the gRPC call's future and
    the HTTP answer's."""
    store = Store(make_engine(pg_url))
    secret = new_secret()
    store.create_token(Role.ADMIN, None, "admin", hash_secret(secret))
    store.close()
    with _stopping_server(pg_url, grace) as (process, locker):
        assert process.stdout is not None and process.stderr is not None
        lines = [process.stdout.readline() for _ in range(2)]
        target, http = lines[0].split()[-1], lines[1].split()[-1].rstrip("/")
        metadata = (("authorization", f"Bearer {secret}"),)
        with (
            grpc.insecure_channel(target) as channel,
            concurrent.futures.ThreadPoolExecutor(1) as threads,
        ):
            stub = porch_pb2_grpc.PorchServiceStub(channel)
            stub.ListPipelines(pb.ListPipelinesRequest(), metadata=metadata, timeout=30)
            locker.cursor().execute("LOCK TABLE pipeline IN ACCESS EXCLUSIVE MODE")
            call = stub.ListPipelines.future(pb.ListPipelinesRequest(), metadata=metadata)
            headers = {"Authorization": f"Bearer {secret}"}
            answer = threads.submit(httpx.get, f"{http}/v1/pipelines", headers=headers, timeout=30)
            waiting = (
                "SELECT count(*) FROM pg_locks WHERE NOT granted"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
            _poll(pg_url, waiting, 2)  # both calls' statements wait for the lock
            yield process, channel, call, answer


@pytest.mark.postgres
def test_a_statement_waiting_on_a_lock_does_not_hold_a_stopping_server(pg_url: str) -> None:
    with _listings_waiting_on_a_lock(pg_url) as (process, _, call, answer):
        started = time.monotonic()
        process.terminate()
        # The grace period (1 s), then at most a few seconds more: not
        # as long as the lock is held.
        assert process.wait(timeout=20) == 0
        assert time.monotonic() - started < 10
        with pytest.raises(grpc.RpcError):
            call.result(timeout=10)
        # Over HTTP, the call ended is answered as porch answers errors.
        ended = answer.result(timeout=10)
        assert ended.status_code == 503, ended.text
        assert ended.json()["code"] == grpc.StatusCode.UNAVAILABLE.value[0]
        assert "shutting down" in ended.json()["message"]
        assert process.stderr is not None
        assert "Traceback" not in process.stderr.read()


@pytest.mark.postgres
def test_a_stopping_server_takes_no_grpc_call_while_http_calls_finish(pg_url: str) -> None:
    """Both ports stop taking calls at once, and their calls in flight share
    one grace period: the gRPC port does not go on serving while the HTTP
    port's calls finish, nor get a grace period of its own after them."""
    grace = 4
    with _listings_waiting_on_a_lock(pg_url, grace) as (process, channel, call, answer):
        health = health_pb2_grpc.HealthStub(channel)
        started = time.monotonic()
        process.terminate()
        time.sleep(1)  # well within the grace period
        try:
            checked = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as error:  # turned away: as good
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
        else:
            assert checked.status != health_pb2.HealthCheckResponse.SERVING
        assert process.wait(timeout=30) == 0
        # One grace period and the statements' cancel, not two grace periods.
        assert time.monotonic() - started < 2 * grace, time.monotonic() - started
        with pytest.raises(grpc.RpcError):
            call.result(timeout=10)
        assert answer.result(timeout=10).status_code == 503
        assert process.stderr is not None
        log = process.stderr.read()
        assert "Traceback" not in log
        # Each access line says what its client was told.
        assert "ListPipelines CANCELLED" not in log, log


@pytest.mark.postgres
def test_a_server_stopped_at_once_leaves_no_statement_waiting_in_postgresql(pg_url: str) -> None:
    # Its connections gone with it, PostgreSQL ends their statements within
    # about a second (client_connection_check_interval), rather than keep
    # them waiting for the lock, and run them once it is released.
    waiting = (
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'porch'"
        " AND datname = current_database()"
    )
    with _listings_waiting_on_a_lock(pg_url, grace=60) as (process, _, call, answer):
        process.terminate()
        time.sleep(0.5)
        assert process.poll() is None, "in its grace period, the lock still held"
        process.terminate()
        assert process.wait(timeout=20) == 1
        stopped = time.monotonic()
        _poll(pg_url, waiting, 0, seconds=10)
        assert time.monotonic() - stopped < 8, "its statements waited on for the lock"
        with pytest.raises(grpc.RpcError):
            call.result(timeout=10)
        with pytest.raises(httpx.HTTPError):
            answer.result(timeout=10)


@pytest.mark.postgres
@pytest.mark.parametrize("method", ["UpdateTask", "RegisterTask", "RegisterTasks"])
def test_a_write_cut_at_the_end_of_the_grace_period_is_not_made_later(
    pg_url: str, method: str
) -> None:
    """A stopping server cuts the calls left when its grace period ends, and
    their clients are told UNAVAILABLE: a statement of theirs waiting for a
    lock must not commit once it is released. An update and a registration
    run on asyncpg's connections, each in its batch's task; a batch
    registration on a thread's psycopg2 connection."""
    store = Store(make_engine(pg_url))
    store.create_pipeline(Pipeline("cut", "u", "1"))
    secret = new_secret()
    store.create_token(Role.PIPELINE, "cut", "wrapper", hash_secret(secret))
    store.create_token(Role.ADMIN, None, "admin", hash_secret(new_secret()))  # none printed
    store.close()
    with _stopping_server(pg_url) as (process, locker):
        assert process.stdout is not None and process.stderr is not None
        target = process.stdout.readline().split()[-1]
        metadata = (("authorization", f"Bearer {secret}"),)
        pipeline = pb.Pipeline(name="cut")
        with grpc.insecure_channel(target) as channel:
            stub = porch_pb2_grpc.PorchServiceStub(channel)
            for n in (0, 1):
                first = pb.Task(pipeline=pipeline)
                first.task_input.update({"n": n})
                stub.RegisterTask(pb.RegisterTaskRequest(task=first), metadata=metadata, timeout=30)
            claim = pb.ClaimTasksRequest(pipeline=pipeline, num_tasks=2)
            done, claimed = stub.ClaimTasks(claim, metadata=metadata, timeout=30).tasks
            # Each statement prepared already, as on a server that has run a while:
            # else it would wait for the lock while being prepared, not yet run.
            done.status = pb.Task.DONE
            stub.UpdateTask(pb.UpdateTaskRequest(task=done), metadata=metadata, timeout=30)
            # Reads go on; every write to the task table waits.
            locker.cursor().execute("LOCK TABLE task IN SHARE MODE")
            second = pb.Task(pipeline=pipeline)
            second.task_input.update({"n": 2})
            claimed.status = pb.Task.DONE
            requests = {
                "UpdateTask": pb.UpdateTaskRequest(task=claimed),
                "RegisterTask": pb.RegisterTaskRequest(task=second),
                "RegisterTasks": pb.RegisterTasksRequest(pipeline_name="cut", tasks=[second]),
            }
            call = getattr(stub, method).future(requests[method], metadata=metadata)
            waiting = (
                "SELECT count(*) FROM pg_locks WHERE NOT granted"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
            _poll(pg_url, waiting, 1)  # the call's statement waits for the lock
            process.terminate()
            assert process.wait(timeout=30) == 0
            with pytest.raises(grpc.RpcError) as raised:
                call.result(timeout=10)
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        locker.rollback()  # the lock released: a statement left running would go on now
        others = (
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name LIKE 'porch%'"
        )
        _poll(pg_url, others, 0)  # the server's sessions, ended or done
        cursor = locker.cursor()
        cursor.execute("SELECT status FROM task ORDER BY id")
        assert cursor.fetchall() == [("DONE",), ("CLAIMED",)]
        cursor.execute("SELECT count(*) FROM event")
        assert cursor.fetchone() == (5,)  # created and claimed each, the one done
        locker.rollback()
        log = process.stderr.read()
        assert "Traceback" not in log
        # The access line says what the client was told.
        assert f"{method} UNAVAILABLE" in log, log


def _poll(pg_url: str, query: str, wanted: int, seconds: float = 30) -> None:
    """Wait until the count query gives wanted, each time in a transaction of
    its own: PostgreSQL reads pg_stat_activity once a transaction."""
    deadline = time.monotonic() + seconds
    watcher = connect(pg_url)
    watcher.autocommit = True
    try:
        while True:
            with watcher.cursor() as cursor:
                cursor.execute(query)
                (count,) = cursor.fetchone()
            if count == wanted or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        watcher.close()
    assert count == wanted, (query, count)


@contextlib.contextmanager
def _stopping_server(pg_url: str, grace: float = 1) -> Iterator[tuple[subprocess.Popen[str], Any]]:
    """`porch serve` on pg_url with a grace period of 1 s (or grace), its
    first lines unread, and a psycopg2 connection of the test's own to lock
    tables with."""
    serve = ["serve", "--db-url", pg_url, *ZERO_PORTS, "--shutdown-grace-seconds", str(grace)]
    # No lease sweep to wait for a lock beside the tests' own calls.
    serve += ["--lease-sweep-seconds", "3600"]
    process = subprocess.Popen(
        [*PORCH, *serve], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    locker = connect(pg_url)
    try:
        yield process, locker
    finally:
        locker.rollback()
        locker.close()
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()
        process.stderr.close()


def connections_under_load(pg_url: str, *flags: str) -> int:
    """The connections a server holds to its database with 200 calls waiting on a lock.

    The task table is locked while the calls arrive, so every call the
    server starts holds its connection until the count is taken, however
    slowly the machine lets the calls overlap.
    """
    process, target = start_server(pg_url, *flags)
    store = Store(make_engine(pg_url))
    counting = connect(pg_url)
    counting.autocommit = True
    locking = connect(pg_url)
    try:
        secret = new_secret()
        store.create_token(Role.ADMIN, None, "admin", hash_secret(secret))
        store.close()
        metadata = (("authorization", f"Bearer {secret}"),)

        def connections() -> tuple[int, int]:
            """The server's connections, and how many of them wait on the lock."""
            cursor = counting.cursor()
            cursor.execute(
                "SELECT count(*), count(*) FILTER (WHERE wait_event_type = 'Lock')"
                " FROM pg_stat_activity WHERE datname = current_database()"
                " AND pid NOT IN (pg_backend_pid(), %s)",
                (locking.get_backend_pid(),),
            )
            total, waiting = cursor.fetchone()
            return int(total), int(waiting)

        with grpc.insecure_channel(target) as channel:
            stub = porch_pb2_grpc.PorchServiceStub(channel)
            request = pb.CreatePipelineRequest(pipeline=pb.Pipeline(name="p", uri="u", version="1"))
            with contextlib.suppress(grpc.RpcError):  # made by the first server already
                stub.CreatePipeline(request, metadata=metadata)
            locking.cursor().execute("LOCK TABLE task IN ACCESS EXCLUSIVE MODE")
            listing = pb.ListTasksRequest(pipeline_name="p")
            calls = [stub.ListTasks.future(listing, metadata=metadata) for _ in range(200)]
            # The count settles once every connection the server will open
            # waits on the lock: calls have reached the lock, and for a second
            # the count has not moved.
            counts = [connections()]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and (
                counts[-1][1] == 0 or len(counts) < 10 or counts[-10] != counts[-1]
            ):
                time.sleep(0.1)
                counts.append(connections())
            locking.rollback()
            for call in calls:
                call.result(timeout=30)
        return counts[-1][0]
    finally:
        locking.close()
        counting.close()
        stop_server(process)


@pytest.mark.postgres
def test_db_pool_size_bounds_a_servers_connections(pg_url: str) -> None:
    assert connections_under_load(pg_url) > 3 * 2 + 1
    assert connections_under_load(pg_url, "--db-pool-size", "2") <= 3 * 2 + 1


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


ZERO_PORTS = ["--grpc-port", "0", "--http-port", "0"]


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_serve_on_an_ipv6_address(sqlite_url: str) -> None:
    process = subprocess.Popen(
        [*PORCH, "serve", "--db-url", sqlite_url, "--host", "::1", *ZERO_PORTS],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        lines = [process.stdout.readline() for _ in range(3)]
        grpc_line, http_line = lines[1], lines[2]
        assert grpc_line.startswith("porch: gRPC listening on [::1]:"), lines
        assert http_line.startswith("porch: HTTP gateway on http://[::1]:"), lines
        target = grpc_line.split()[-1]
        with grpc.insecure_channel(target) as channel:
            stub = porch_pb2_grpc.PorchServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.ListPipelines(pb.ListPipelinesRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = httpx.get(http_line.split()[-1] + "healthz", timeout=10)
        assert health.json() == {"status": "SERVING"}
    finally:
        if process.stdout is not None:
            process.stdout.close()
        stop_server(process)


def test_serving_beyond_loopback_without_tls_is_warned_of(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    logged = tmp_path / "stderr"
    with logged.open("w") as stderr:
        process = subprocess.Popen(
            [*PORCH, "serve", "--db-url", sqlite_url, "--host", "0.0.0.0", *ZERO_PORTS],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        try:
            assert process.stdout is not None
            assert "gRPC listening" in "".join(process.stdout.readline() for _ in range(2))
        finally:
            stop_server(process)
    warning = "serving on 0.0.0.0 without TLS: tokens and tasks cross the network in clear text"
    assert warning in logged.read_text()
    tls = cli.TLS(tmp_path / "cert.pem", tmp_path / "key.pem", None)
    with caplog.at_level(logging.WARNING, logger="porch"):
        for quiet in (("127.0.0.1", None), ("localhost", None), ("::1", None), ("0.0.0.0", tls)):
            cli._warn_if_in_clear(*quiet)
        assert caplog.messages == []
        cli._warn_if_in_clear("0.0.0.0", None)
    assert [warning in message for message in caplog.messages] == [True]


def test_a_certificate_clients_refuse_or_soon_will_is_warned_of_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = trustme.CA()
    now = datetime.now(UTC).replace(microsecond=0)

    def issued(name: str, begins: timedelta, ends: timedelta) -> Path:
        cert = ca.issue_cert("porch.example.org", not_before=now + begins, not_after=now + ends)
        path = tmp_path / f"{name}.pem"
        cert.cert_chain_pems[0].write_to_path(path)
        return path

    def day(moment: timedelta) -> str:
        return (now + moment).strftime("%Y-%m-%d %H:%M UTC")

    year = timedelta(days=365)
    expired = issued("expired", -year, timedelta(days=-1))
    early = issued("early", timedelta(days=2), year)
    ending = issued("ending", -year, timedelta(days=3, hours=1))
    fine = issued("fine", -year, year)
    authority = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(authority)
    key = tmp_path / "key.pem"
    assert cli.TLS(fine, key, authority).warnings() == []
    assert cli.TLS(issued("at-the-edge", -year, timedelta(days=15)), key).warnings() == []
    assert cli.TLS(expired, key).warnings() == [
        f"--tls-cert {expired}: its certificate expired on {day(timedelta(days=-1))}:"
        " clients will refuse it"
    ]
    assert cli.TLS(early, key).warnings() == [
        f"--tls-cert {early}: its certificate is not valid until {day(timedelta(days=2))}:"
        " clients will refuse it until then"
    ]
    assert cli.TLS(ending, key, expired).warnings() == [
        f"--tls-cert {ending}: its certificate expires on"
        f" {day(timedelta(days=3, hours=1))}, in 3 days",
        f"--tls-client-ca {expired}: its certificate expired on {day(timedelta(days=-1))}:"
        " client certificates it signed are refused",
    ]
    hour = issued("hour", -year, timedelta(minutes=50))
    assert cli.TLS(hour, key).warnings() == [
        f"--tls-cert {hour}: its certificate expires on {day(timedelta(minutes=50))}, in 1 hour"
    ]
    named = tmp_path / "named.pem"
    ca.issue_cert(
        "porch.example.org", common_name="porch", not_after=now + timedelta(days=-1)
    ).cert_chain_pems[0].write_to_path(named)
    assert cli.TLS(named, key).warnings() == [
        f"--tls-cert {named}: its certificate (CN=porch) expired on {day(timedelta(days=-1))}:"
        " clients will refuse it"
    ]
    # Every certificate of a chain, and of a bundle of CAs, is looked at.
    chain = tmp_path / "chain.pem"
    chain.write_bytes(fine.read_bytes() + expired.read_bytes())
    authorities = tmp_path / "authorities.pem"
    authorities.write_bytes(ca.cert_pem.bytes() + early.read_bytes())
    assert cli.TLS(chain, key, authorities).warnings() == [
        f"--tls-cert {chain}: its certificate 2 expired on {day(timedelta(days=-1))}:"
        " clients will refuse it",
        f"--tls-client-ca {authorities}: its certificate 2 is not valid until"
        f" {day(timedelta(days=2))}: client certificates it signed are refused until then",
    ]
    # A file that holds no certificate is named by the check of the files.
    (tmp_path / "junk.pem").write_text("junk")
    assert cli.TLS(tmp_path / "junk.pem", key, tmp_path / "none.pem").warnings() == []
    with caplog.at_level(logging.WARNING, logger="porch"):
        cli._warn_if_in_clear("0.0.0.0", cli.TLS(expired, key))
    assert [" expired on " in message for message in caplog.messages] == [True]


def test_a_gateway_passing_tokens_beyond_loopback_without_tls_is_warned_of(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Its callers may reach it over HTTPS: the hop to its server is the one
    # a reader on the way would see.
    quiet = [
        "127.0.0.1:50051",
        "localhost:50051",
        "[::1]:50051",
        "dns:///localhost:50051",
        "dns:localhost:50051",
        "ipv4:127.0.0.1:50051,127.0.0.2:50051",
        "ipv6:[::1]:50051",
        "0.0.0.0:50051",
        "[::]:50051",
        "[::ffff:127.0.0.1]:50051",
        "unix:/run/porch.sock",
        "xds:///porch",
        "no-such-host.invalid:50051",  # not known now: the start's own check says so
    ]
    loud = [
        "192.0.2.2:50051",
        "dns:///192.0.2.2:50051",
        "dns://8.8.8.8/192.0.2.2:50051",
        "ipv4:127.0.0.1:50051,192.0.2.2:50051",
        "ipv6:[2001:db8::1]:50051",
        "[2001:db8::1]:50051",
    ]
    with caplog.at_level(logging.WARNING, logger="porch"):
        for target in quiet:
            cli._warn_if_target_in_clear(target, None)
        for target in loud:
            cli._warn_if_target_in_clear(target, gateway.ClientTLS())
        assert caplog.messages == []
        for target in loud:
            cli._warn_if_target_in_clear(target, None)
    warning = "without TLS: callers' tokens and tasks cross the network in clear text"
    assert [
        f"passing calls to {target} " in message
        for target, message in zip(loud, caplog.messages, strict=True)
    ] == [True] * len(loud)
    assert all(warning in message for message in caplog.messages)


A_PAIR = ["--tls-cert", "a-cert.pem", "--tls-key", "a-key.pem"]
A_KEY = ["--target-tls-key", "a-key.pem"]


def test_tls_files_that_cannot_be_used_are_named_at_start(tmp_path: Path) -> None:
    ca = trustme.CA()
    for name, cert in (("a", ca.issue_cert("localhost")), ("b", ca.issue_cert("localhost"))):
        cert.cert_chain_pems[0].write_to_path(tmp_path / f"{name}-cert.pem")
        cert.private_key_pem.write_to_path(tmp_path / f"{name}-key.pem")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    cases = [
        (["serve", "--tls-cert", "junk.pem", "--tls-key", "a-key.pem"], "--tls-cert junk.pem: "),
        (["serve", "--tls-cert", "a-cert.pem", "--tls-key", "junk.pem"], "--tls-key junk.pem: "),
        (
            ["serve", "--tls-cert", "a-cert.pem", "--tls-key", "b-key.pem"],
            "--tls-key b-key.pem is not the key of --tls-cert a-cert.pem",
        ),
        (
            ["serve", *A_PAIR, "--tls-client-ca", "junk.pem"],
            "--tls-client-ca junk.pem: not PEM CA certificates",
        ),
        (["pipeline", "list", "--tls-ca", "junk.pem"], "--tls-ca junk.pem: not PEM CA"),
        (
            ["gateway", "--target", "h:1", "--target-tls-cert", "b-cert.pem", *A_KEY],
            "--target-tls-key a-key.pem is not the key of --target-tls-cert b-cert.pem",
        ),
        (
            ["gateway", "--target", "h:1", "--tls-cert", "a-cert.pem", "--tls-key", "b-key.pem"],
            "--tls-key b-key.pem is not the key of --tls-cert a-cert.pem",
        ),
        (["gateway", "--target", "h:1", *A_PAIR, "--tls-client-ca", "no.pem"], "--tls-client-ca"),
    ]
    for flags, message in cases:
        done = subprocess.run(
            [*PORCH, *flags], capture_output=True, text=True, timeout=60, cwd=tmp_path
        )
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith(f"porch: {message}"), done.stderr
    assert not (tmp_path / "porch.db").exists()


async def test_the_gateway_says_as_it_starts_that_its_server_does_not_serve(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from grpc_health.v1 import health

    from porch_server import web
    from porch_server.cli import _check_target

    server = grpc.aio.server()
    checker = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        target = f"127.0.0.1:{port}"
        for status, warned in (("SERVING", False), ("NOT_SERVING", True)):
            await checker.set("", health_pb2.HealthCheckResponse.ServingStatus.Value(status))
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="porch"):
                await _check_target(web.gateway_options(target))
            said = f"the server at {target} answers NOT_SERVING now" in caplog.text
            assert said == warned, caplog.text
    finally:
        await server.stop(None)


class _Unanswering(grpc.GenericRpcHandler):
    """A server's handlers that answer no unary call until released, and
    refuse every stream at once; each notes the time its call had left."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.time_left: dict[str, float | None] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method.rsplit("/", 1)[-1]
        if method == "WatchEvents":
            return grpc.unary_stream_rpc_method_handler(functools.partial(self._refuse, method))
        return grpc.unary_unary_rpc_method_handler(functools.partial(self._hold, method))

    def _hold(self, method: str, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.time_left[method] = context.time_remaining()
        self.released.wait(60)
        return b""

    def _refuse(
        self, method: str, request: bytes, context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        self.time_left[method] = context.time_remaining()
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "refused")
        yield b""


@pytest.fixture
def unanswering() -> Iterator[tuple[_Unanswering, str]]:
    """A gRPC server that does not answer, and its target."""
    handlers = _Unanswering()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(4), handlers=(handlers,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield handlers, f"127.0.0.1:{port}"
    finally:
        handlers.released.set()
        server.stop(None)


def test_a_call_without_an_answer_in_time_is_named_and_ends_the_command(
    unanswering: tuple[_Unanswering, str],
) -> None:
    handlers, target = unanswering
    env = {**os.environ, "PORCH_TIMEOUT": "30"}
    for flags, method in (
        (["task", "claim", "--pipeline", "p", "--timeout", "0.5"], "ClaimTasks"),
        (["pipeline", "list", "--timeout", "0.5"], "ListPipelines"),
    ):
        started = time.monotonic()
        done = subprocess.run(
            [*PORCH, *flags, "--target", target],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert done.returncode == 1, done.stderr
        assert done.stderr == (
            f"porch: DEADLINE_EXCEEDED: the server took longer than 0.5 s to answer {method}"
            " (--timeout SECONDS, or $PORCH_TIMEOUT, sets how long each call may take)\n"
        )
        assert time.monotonic() - started < 20
        time_left = handlers.time_left[method]
        assert time_left is not None and time_left <= 0.5


def test_every_call_but_a_watch_has_a_deadline(unanswering: tuple[_Unanswering, str]) -> None:
    handlers, target = unanswering
    env = {**os.environ, "PORCH_TIMEOUT": "0.5"}
    claimed = subprocess.run(
        [*PORCH, "task", "claim", "--pipeline", "p", "--target", target],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert "longer than 0.5 s to answer ClaimTasks" in claimed.stderr, claimed.stderr
    watched = subprocess.run(
        [*PORCH, "watch", "--target", target], capture_output=True, text=True, env=env, timeout=60
    )
    assert watched.stderr == "porch: PERMISSION_DENIED: refused\n"
    time_left = handlers.time_left["WatchEvents"]
    assert time_left is None or time_left > 1e9  # gRPC's "infinite future"


def test_the_timeout_comes_from_the_flag_then_the_environment_then_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def deadline(*flags: str) -> float | None:
        args = cli._parser().parse_args(["task", "register", "--pipeline", "p", *flags, "{}"])
        return client._deadline(args)

    monkeypatch.delenv("PORCH_TIMEOUT", raising=False)
    assert deadline() == 60
    monkeypatch.setenv("PORCH_TIMEOUT", "")
    assert deadline() == 60
    monkeypatch.setenv("PORCH_TIMEOUT", "7.5")
    assert deadline() == 7.5
    assert deadline("--timeout", "3") == 3
    assert client._deadline(cli._parser().parse_args(["watch"])) is None
    monkeypatch.setenv("PORCH_TIMEOUT", "soon")
    with pytest.raises(SystemExit, match=r"^porch: \$PORCH_TIMEOUT is not a number: 'soon'$"):
        deadline()


def test_what_is_not_text_is_named_as_such_before_anything_is_sent() -> None:
    # Python's own words were "'utf-8' codec can't encode character".
    not_text = (
        "is not text: a \\uD800 to \\uDFFF escape without its pair, or a byte that is not UTF-8"
    )
    nowhere = ["--target", "127.0.0.1:1"]
    for command, stdin, said in (
        (
            ["register", "--pipeline", "p", '{"a": "\\ud800"}'],
            None,
            f"input 1: '\\ud800' {not_text}",
        ),
        (
            ["register", "--pipeline", "p", "-"],
            b'{"a": "x\xff"}\n',
            f"line 1 of stdin: '\\udcff' {not_text}",
        ),
        (["claim", "--pipeline", b"a\xff"], None, f"'a\\udcff' holds '\\udcff', which {not_text}"),
    ):
        done = subprocess.run(
            [*PORCH, "task", *command, *nowhere], input=stdin, capture_output=True, timeout=60
        )
        assert done.returncode in (1, 2)
        assert done.stderr.decode() == f"porch: {said}\n"


def test_an_answer_a_terminal_cannot_show_is_printed_in_escapes(sqlite_url: str) -> None:
    # The task is registered, or claimed, before its answer is printed: an
    # answer refused for want of a character would leave the claim made and
    # nobody told. JSON comes in JSON's escapes, other text in Python's.
    secret = _pipeline_p_and_its_token(sqlite_url)
    ascii_env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    process, target = start_server(sqlite_url)
    try:
        for command in (
            ["register", "--pipeline", "p", '{"a": "é"}'],
            ["claim", "--pipeline", "p"],
        ):
            done = subprocess.run(
                [*PORCH, "task", *command, "--target", target, "--token", secret],
                capture_output=True,
                timeout=60,
                env=ascii_env,
            )
            assert (done.returncode, done.stderr) == (0, b""), done.stderr
            assert b'"a": "\\u00e9"' in done.stdout
            answer = json.loads(done.stdout)
            assert answer.get("task", answer)["task_input"] == {"a": "é"}  # registered, claimed
        said = 'naïve "q" \u2013 done'
        update = ["--input", '{"a": "é"}', "--status", "RUNNING", "--message", said]
        porch("task", "update", "--pipeline", "p", *update, "--target", target, "--token", secret)
        watch = subprocess.Popen(
            [*PORCH, "watch", "--after", "0.0", "--target", target, "--token", secret],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ascii_env,
        )
        assert watch.stdout is not None
        try:
            lines = [watch.stdout.readline() for _ in range(3)]
        finally:
            watch.kill()
            watch.communicate(timeout=60)
        # A watch line's message is JSON: in JSON's escapes, not Python's.
        message = lines[2].split(b" by loader ", 1)[1].rsplit(b" cursor=", 1)[0]
        assert message == b'"na\\u00efve \\"q\\" \\u2013 done"', lines
        assert json.loads(message) == said
    finally:
        stop_server(process)
    porch("token", "create", "--pipeline", "p", "--description", "café", "--db-url", sqlite_url)
    listed = subprocess.run(
        [*PORCH, "token", "list", "--db-url", sqlite_url],
        capture_output=True,
        timeout=60,
        env=ascii_env,
    )
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[-1].endswith(b"\tcaf\\xe9")


def test_numbers_a_request_cannot_hold_are_named_with_their_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # protobuf refused them as "Value out of range", naming no flag.
    parse = cli._parser().parse_args
    claim = ["task", "claim", "--pipeline", "p"]
    # More than a call claims claims as many as it does, as 20,000 would.
    assert parse([*claim, "-n", "2147483648"]).num_tasks == 2**31 - 1
    assert parse([*claim, "-n", "20000"]).num_tasks == 20_000
    update = ["task", "update", "--pipeline", "p", "--id", "x", "--status", "DONE"]
    for args, named in (
        ([*claim, "-n", "0"], "argument -n/--num-tasks: not a whole number from 1: '0'"),
        (
            [*update, "--claim-number", "2147483648"],
            "argument --claim-number: not a claim's number (a whole number from 1 to"
            " 2,147,483,647): '2147483648'",
        ),
    ):
        with pytest.raises(SystemExit) as refused:
            parse(args)
        assert refused.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1].endswith(named)
    # An empty variable is one not set, as $PORCH_TOKEN and $PORCH_TIMEOUT are.
    monkeypatch.setenv("PORCH_TARGET", "")
    assert cli._parser().parse_args(["task", "list"]).target == "127.0.0.1:50051"


class _StandIn(grpc.GenericRpcHandler):
    """A server that registers the first batch of tasks it is sent; for each
    later batch it calls later(context) first, and for any other unary call
    other(context). A watch gets its bookmark, then other(context)."""

    def __init__(
        self,
        later: Callable[[grpc.ServicerContext], None],
        other: Callable[[grpc.ServicerContext], None],
    ) -> None:
        self.later = later
        self.other = other
        self.first_too = False  # later(context) for the first batch too
        self.batches = 0
        self.watches = 0

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if details.method.endswith("/RegisterTasks"):
            return grpc.unary_unary_rpc_method_handler(
                self._register,
                request_deserializer=pb.RegisterTasksRequest.FromString,
                response_serializer=pb.RegisterTasksResponse.SerializeToString,
            )
        if details.method.endswith("/WatchEvents"):
            return grpc.unary_stream_rpc_method_handler(
                self._watch, response_serializer=pb.Event.SerializeToString
            )
        return grpc.unary_unary_rpc_method_handler(self._other)

    def _register(
        self, request: pb.RegisterTasksRequest, context: grpc.ServicerContext
    ) -> pb.RegisterTasksResponse:
        self.batches += 1
        if self.batches > 1 or self.first_too:
            self.later(context)
        made = [pb.RegisterTaskResponse(task=task, created=True) for task in request.tasks]
        return pb.RegisterTasksResponse(results=made)

    def _watch(self, request: bytes, context: grpc.ServicerContext) -> Iterator[pb.Event]:
        self.watches += 1
        yield pb.Event(kind=pb.Event.BOOKMARK, cursor=f"0.{self.watches}")
        self.other(context)

    def _other(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.other(context)
        return b""


@contextlib.contextmanager
def _stand_in(handlers: _StandIn) -> Iterator[str]:
    """A stand-in server's target, while it runs."""
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(4), handlers=(handlers,))
    target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    try:
        yield target
    finally:
        server.stop(None)


def _register_2500_then_fail(flags: list[str], failure: str) -> None:
    """Register 2,500 tasks, in batches of 1,000, on a stand-in server that
    fails the second batch as failure says: the first is printed, and the
    command says what may have been registered."""
    inputs = "".join(f'{{"n": {n}}}\n' for n in range(2_500))
    done = subprocess.run(
        [*PORCH, "task", "register", "--pipeline", "p", "-", *flags],
        input=inputs,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr == (
        f"{failure} (the 1,000 tasks before it were registered, as printed; the 1,000 it sent"
        " may have been; the 500 after it were not sent: registering them all again changes"
        " nothing for those registered)\n"
    )
    assert done.stdout.count('"created": true') == 1_000


def test_a_register_interrupted_says_what_may_be_registered() -> None:
    # Ctrl-C as the second batch waits for its answer: the first batch's
    # answers were lost, and nothing said what had been registered.
    released = threading.Event()
    handlers = _StandIn(lambda context: released.wait(60), lambda context: None)
    with _stand_in(handlers) as target:
        inputs = "".join(f'{{"n": {n}}}\n' for n in range(2_500))
        command = [*PORCH, "task", "register", "--pipeline", "p", "-", "--target", target]
        with subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ) as process:
            assert process.stdin is not None
            process.stdin.write(inputs)
            process.stdin.close()
            for _ in range(600):
                if handlers.batches == 2:
                    break
                time.sleep(0.05)
            assert handlers.batches == 2
            process.send_signal(signal.SIGINT)
            assert process.stdout is not None and process.stderr is not None
            stdout, stderr = process.stdout.read(), process.stderr.read()
            process.wait(60)
        released.set()
    assert process.returncode == 130
    assert stderr == (
        "porch: interrupted (the 1,000 tasks before it were registered, as printed; the 1,000 it"
        " sent may have been; the 500 after it were not sent: registering them all again"
        " changes nothing for those registered)\n"
    )
    assert stdout.count('"created": true') == 1_000


def test_a_register_that_runs_out_of_time_says_what_may_be_registered() -> None:
    # Later batches are held until released, past the caller's deadline;
    # other calls are refused at once, as by a server whose own statement
    # ran out of time.
    released = threading.Event()

    def too_slow(context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the database took too long")

    with _stand_in(_StandIn(lambda context: released.wait(60), too_slow)) as target:
        try:
            flags = ["--target", target, "--timeout", "1"]
            _register_2500_then_fail(
                flags,
                "porch: DEADLINE_EXCEEDED: the server took longer than 1 s to answer RegisterTasks"
                " (--timeout SECONDS, or $PORCH_TIMEOUT, sets how long each call may take)",
            )
            # A DEADLINE_EXCEEDED the server sends before the caller's time is up
            # is the server's to word.
            refused = subprocess.run(
                [*PORCH, "pipeline", "get", "p", *flags], capture_output=True, text=True, timeout=60
            )
            assert refused.stderr == "porch: DEADLINE_EXCEEDED: the database took too long\n"
        finally:
            released.set()


def test_a_call_the_server_ended_unanswered_is_told_as_such() -> None:
    # As gRPC ends a call that reaches a server as it stops: CANCELLED, with
    # no metadata (porch's own errors carry some).
    def stopped(context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.CANCELLED, "CANCELLED")

    with _stand_in(_StandIn(stopped, stopped)) as target:
        got = subprocess.run(
            [*PORCH, "pipeline", "get", "p", "--target", target],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (got.returncode, got.stderr) == (
            1,
            "porch: CANCELLED: the server ended the call without answering it, most likely as"
            " it stopped; try again\n",
        )
        _register_2500_then_fail(
            ["--target", target],
            "porch: CANCELLED: the server ended the call without answering it, most likely as"
            " it stopped; try again",
        )
        # A watch that was connected reconnects, as after an UNAVAILABLE.
        watch = subprocess.Popen(
            [*PORCH, "watch", "--bookmarks", "--target", target],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert watch.stderr is not None
            line = watch.stderr.readline()
        finally:
            watch.kill()
            watch.communicate(timeout=60)
        assert line == (
            "porch: stream ended (CANCELLED: the server ended the stream, most likely as it"
            " stopped); reconnecting in 1 s after cursor '0.1'\n"
        )

    # A batch its grace cut short, after one made: UNAVAILABLE, and no metadata.
    def cut(context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAVAILABLE, "Cancelling all calls")

    def own(context: grpc.ServicerContext) -> None:  # a server's own, with its metadata
        context.set_trailing_metadata((("x-own", "1"),))
        context.abort(grpc.StatusCode.CANCELLED, "the handler gave up")

    grace_ended = (
        "porch: UNAVAILABLE: the server stopped before the call was done (its shutdown grace ended)"
    )
    with _stand_in(_StandIn(cut, own)) as target:
        _register_2500_then_fail(["--target", target], grace_ended)
        got = subprocess.run(
            [*PORCH, "pipeline", "get", "p", "--target", target],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (got.returncode, got.stderr) == (1, "porch: CANCELLED: the handler gave up\n")
    # The first batch cut short may have been made too, and any other call.
    handlers = _StandIn(cut, cut)
    handlers.first_too = True
    with _stand_in(handlers) as target:
        for command, said in (
            (
                ["task", "register", "--pipeline", "p", '{"n": 1}'],
                f"{grace_ended} (the 1 it sent may have been: registering them all again"
                " changes nothing for those registered)",
            ),
            (
                ["task", "claim", "--pipeline", "p"],
                f"{grace_ended}; what it asked may have been done",
            ),
            (["pipeline", "get", "p"], grace_ended),  # a read: nothing done
        ):
            got = subprocess.run(
                [*PORCH, *command, "--target", target], capture_output=True, text=True, timeout=60
            )
            assert (got.returncode, got.stderr) == (1, f"{said}\n")


def test_a_batch_the_servers_database_left_waiting_may_have_been_registered() -> None:
    # The server ended it as its database stopped answering: its own words,
    # and its own metadata, and what the batch asked may have been done.
    def stopped(context: grpc.ServicerContext) -> None:
        context.set_trailing_metadata((("x-porch-error", "1"),))
        context.abort(grpc.StatusCode.UNAVAILABLE, DATABASE_STOPPED)

    with _stand_in(_StandIn(stopped, stopped)) as target:
        _register_2500_then_fail(["--target", target], f"porch: UNAVAILABLE: {DATABASE_STOPPED}")


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "86401", "soon"])
def test_a_timeout_that_cannot_be_used_is_refused_by_name(value: str) -> None:
    done = subprocess.run(
        [*PORCH, "pipeline", "list", "--timeout", value], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "argument --timeout: not a" in done.stderr and repr(value) in done.stderr
    assert "Traceback" not in done.stderr
