"""`porch db import-npg-porch`: an npg_porch 2 database copied into porch's,
its tokens still working, once and all or nothing."""

from __future__ import annotations

import hashlib
import json
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from sqlalchemy import create_engine, text

from porch_server import cli
from porch_server.auth import hash_secret
from porch_server.db import migrate
from porch_server.db.engine import make_engine, shown_url
from porch_server.models import EventKind, Pipeline, Role
from porch_server.states import State
from porch_server.store import Store
from porch_stubs.v1 import porch_pb2 as pb

from .conftest import run_sql, start_porch

NPG_SCHEMA = "npg_porch"  # npg_porch's own, where DB_SCHEMA is not set
PIPELINE = {"name": "npg_test", "uri": "https://github.com/wtsi-npg/npg_test", "version": "0.1"}
# Tables as npg_porch 2's models make them: times without a time zone (and
# without defaults: npg_porch set them itself), inputs as JSON, a task's id
# its own column.
TABLES = {
    "postgresql": [
        "CREATE TABLE pipeline (pipeline_id SERIAL PRIMARY KEY, name VARCHAR NOT NULL UNIQUE,"
        " repository_uri VARCHAR NOT NULL, version VARCHAR NOT NULL)",
        "CREATE TABLE token (token_id SERIAL PRIMARY KEY, token VARCHAR(32) UNIQUE,"
        " description VARCHAR NOT NULL, pipeline_id INTEGER REFERENCES pipeline,"
        " date_issued TIMESTAMP, date_revoked TIMESTAMP)",
        "CREATE TABLE task (task_id SERIAL PRIMARY KEY, pipeline_id INTEGER REFERENCES pipeline,"
        " job_descriptor VARCHAR, definition JSON, state VARCHAR, created TIMESTAMP,"
        " CONSTRAINT unique_tasks UNIQUE (pipeline_id, job_descriptor))",
        "CREATE TABLE event (event_id SERIAL PRIMARY KEY, task_id INTEGER REFERENCES task,"
        " time TIMESTAMP, change VARCHAR,"
        " token_id INTEGER NOT NULL REFERENCES token)",
    ],
    "sqlite": [
        "CREATE TABLE pipeline (pipeline_id INTEGER PRIMARY KEY, name VARCHAR NOT NULL UNIQUE,"
        " repository_uri VARCHAR NOT NULL, version VARCHAR NOT NULL)",
        "CREATE TABLE token (token_id INTEGER PRIMARY KEY, token VARCHAR(32) UNIQUE,"
        " description VARCHAR NOT NULL, pipeline_id INTEGER REFERENCES pipeline,"
        " date_issued DATETIME, date_revoked DATETIME)",
        "CREATE TABLE task (task_id INTEGER PRIMARY KEY, pipeline_id INTEGER REFERENCES pipeline,"
        " job_descriptor VARCHAR, definition JSON, state VARCHAR, created DATETIME,"
        " CONSTRAINT unique_tasks UNIQUE (pipeline_id, job_descriptor))",
        "CREATE TABLE event (event_id INTEGER PRIMARY KEY, task_id INTEGER REFERENCES task,"
        " time DATETIME, change VARCHAR, token_id INTEGER NOT NULL REFERENCES token)",
    ],
}


def npg_id(definition: str) -> str:
    """The id npg_porch gives an input: its JSON with sorted keys, '/' escaped."""
    data = json.loads(definition)
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":")).replace("/", "\\/")
    return hashlib.sha256(canonical.encode()).hexdigest()


# A task whose input porch reads as the third's: npg_porch kept 100.0 apart.
FLOATED = '{"n": 100.0}'
TWIN_OF_TASK_3 = (
    "INSERT INTO task (pipeline_id, job_descriptor, definition, state, created) VALUES"
    f" (1, '{npg_id(FLOATED)}', '{FLOATED}', 'PENDING', '2024-07-01 11:04:00')"
)


@dataclass
class NpgPorch:
    """An npg_porch 2 database, filled as npg_porch fills it."""

    url: str
    schema: str | None
    tokens: dict[str, int] = field(default_factory=dict)
    _engine: Any = None

    def __post_init__(self) -> None:
        self._engine = create_engine(self.url)
        schema = [f"CREATE SCHEMA {self.schema}"] if self.schema else []
        self.run(*schema, *TABLES[self._engine.dialect.name])

    def run(self, *statements: str, **params: Any) -> None:
        with self._engine.begin() as connection:
            if self.schema:
                connection.exec_driver_sql(f"SET search_path TO {self.schema}")
            for statement in statements:
                connection.execute(text(statement), params)

    def scalar(self, statement: str, **params: Any) -> Any:
        with self._engine.begin() as connection:
            if self.schema:
                connection.exec_driver_sql(f"SET search_path TO {self.schema}")
            return connection.execute(text(statement), params).scalar()

    def pipeline(self, name: str, uri: str, version: str) -> int:
        self.run(
            "INSERT INTO pipeline (name, repository_uri, version) VALUES (:name, :uri, :version)",
            name=name,
            uri=uri,
            version=version,
        )
        return int(self.scalar("SELECT pipeline_id FROM pipeline WHERE name = :n", n=name))

    def token(
        self, description: str, pipeline_id: int | None, issued: str, revoked: str | None = None
    ) -> str:
        secret = uuid.uuid4().hex
        self.run(
            "INSERT INTO token (token, description, pipeline_id, date_issued, date_revoked)"
            " VALUES (:secret, :description, :pipeline_id, :issued, :revoked)",
            secret=secret,
            description=description,
            pipeline_id=pipeline_id,
            issued=issued,
            revoked=revoked,
        )
        self.tokens[secret] = int(
            self.scalar("SELECT token_id FROM token WHERE token = :s", s=secret)
        )
        return secret

    def task(self, pipeline_id: int, definition: str, history: list[tuple[str, str, str]]) -> str:
        """A task with its events, each (time, change, token secret); its
        status the last change's; returns npg_porch's id of it."""
        status = "PENDING"
        for _, change, _ in history:
            if change == "Task claimed":
                status = "CLAIMED"
            elif change.startswith("Task changed"):
                status = change.rpartition(" ")[2].removeprefix("TaskStateEnum.")
        job_descriptor = npg_id(definition)
        self.run(
            "INSERT INTO task (pipeline_id, job_descriptor, definition, state, created)"
            " VALUES (:pipeline_id, :job, :definition, :state, :created)",
            pipeline_id=pipeline_id,
            job=job_descriptor,
            definition=definition,
            state=status,
            created=history[0][0],
        )
        task_id = self.scalar(
            "SELECT task_id FROM task WHERE job_descriptor = :j", j=job_descriptor
        )
        for time, change, secret in history:
            self.run(
                "INSERT INTO event (task_id, time, change, token_id)"
                " VALUES (:task_id, :time, :change, :token_id)",
                task_id=task_id,
                time=time,
                change=change,
                token_id=self.tokens[secret],
            )
        return job_descriptor

    def close(self) -> None:
        self._engine.dispose()


@pytest.fixture
def npg_porch(db_url: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NpgPorch]:
    """An empty npg_porch database beside this test's porch database, of the
    same kind."""
    if db_url.startswith("sqlite"):
        database = NpgPorch(f"sqlite:///{tmp_path / 'npg_porch.db'}", None)
        yield database
        database.close()
        return
    with npg_porch_on_postgresql(request.getfixturevalue("postgres_server")) as database:
        yield database


@contextmanager
def npg_porch_on_postgresql(postgres_server: Any) -> Iterator[NpgPorch]:
    """An empty npg_porch database on PostgreSQL, in npg_porch's own schema,
    with the time zone of a server in London."""
    url = postgres_server.create_database()
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    name = engine.url.database
    with engine.connect() as connection:
        connection.exec_driver_sql(f"ALTER DATABASE \"{name}\" SET timezone = 'Europe/London'")
    engine.dispose()
    database = NpgPorch(url, NPG_SCHEMA)
    try:
        yield database
    finally:
        database.close()
        postgres_server.drop_database(url)


def import_npg(npg: NpgPorch, db_url: str, *flags: str) -> None:
    """Import npg into db_url, its schema (on PostgreSQL) found by default."""
    cli.main(["db", "import-npg-porch", "--from-db-url", npg.url, "--db-url", db_url, *flags])


def at(moment: str, *, london: bool) -> datetime:
    """A time written in npg_porch's database, as porch reads it (London was
    an hour ahead of UTC in July 2024)."""
    written = datetime.fromisoformat(moment).replace(tzinfo=UTC)
    return written.replace(hour=written.hour - 1) if london else written


def test_npg_porchs_database_is_copied_with_its_ids_history_and_tokens(
    npg_porch: NpgPorch, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    npg = npg_porch
    london = npg.schema is not None
    pipeline_id = npg.pipeline(**PIPELINE)
    other_id = npg.pipeline("other", "https://example.org/other", "2.0")
    admin = npg.token("the power user", None, "2024-07-01 09:00:00")
    wrapper = npg.token("my wrapper", pipeline_id, "2024-07-01 10:00:00")
    retired = npg.token("old wrapper", other_id, "2024-07-01 10:30:00", "2024-07-02 08:00:00")
    pending = npg.task(
        pipeline_id, '{"id_run": 45925}', [("2024-07-01 11:00:00", "Created", wrapper)]
    )
    done = npg.task(
        pipeline_id,
        '{"why": "reasons", "to_do": "stuff"}',
        [
            ("2024-07-01 11:01:00", "Created", wrapper),
            ("2024-07-01 11:02:00", "Task claimed", wrapper),
            ("2024-07-01 11:03:00", "Task changed, new status RUNNING", wrapper),
            ("2024-07-01 11:04:00", "Task changed, new status TaskStateEnum.DONE", wrapper),
        ],
    )
    running = npg.task(
        pipeline_id,
        '{"path": "/seq/45925/x.cram", "name": "\\u00e9"}',
        [
            ("2024-07-01 11:05:00", "Created", wrapper),
            ("2024-07-01 11:06:00", "Task claimed", wrapper),
            ("2024-07-01 11:07:00", "Task changed, new status RUNNING", wrapper),
        ],
    )
    floated = npg.task(
        other_id,
        '{"study_id": 100.0, "id_run": 45925}',
        [("2024-07-01 11:08:00", "Created", retired)],
    )

    import_npg(npg, db_url)

    said = capsys.readouterr().out
    assert f"npg_porch's times were read as {'Europe/London' if london else 'UTC'}" in said
    assert "imported 2 pipeline(s), 3 token(s), 4 task(s) and 9 event(s)" in said
    # Only the input npg_porch wrote with a float has a new id: the spec's own.
    porch_id = "ea058ea93114d621c1897f1e47cad245ba2a5b04edbd23a1d61ef502d5d5b76e"
    assert f"task {floated} of pipeline other is task {porch_id} in porch" in said
    assert said.count(" in porch\n") == 1
    assert "1 task(s) have ids of porch's own" in said
    assert running == "221f0396210458adc86f23cbfca4b8deee7b82387515a6e20c0e23bdf156351b"
    assert done == "8cb72a9439dc643d67e859ceca424b9327a9c1abf9c772525df299f656137c22"

    store = Store(make_engine(db_url))
    try:
        first = store.get_task("npg_test", pending)
        assert (first.status, first.claim_number) == (State.PENDING, 0)
        assert first.create_time == first.update_time == at("2024-07-01 11:00:00", london=london)
        finished = store.get_task("npg_test", done)
        assert finished.status is State.DONE
        assert finished.update_time == at("2024-07-01 11:04:00", london=london)
        assert finished.claim_number == 1
        underway = store.get_task("npg_test", running)
        assert underway.status is State.RUNNING
        assert underway.task_input == {"path": "/seq/45925/x.cram", "name": "é"}
        assert underway.claim_time == at("2024-07-01 11:06:00", london=london)
        assert store.get_task("other", porch_id).task_input == {"study_id": 100, "id_run": 45925}

        events = store.list_task_events("npg_test", done, 100, "").items
        assert [(e.kind, e.old_status, e.new_status) for e in events] == [
            (EventKind.CREATED, None, State.PENDING),
            (EventKind.CLAIMED, State.PENDING, State.CLAIMED),
            (EventKind.STATUS_CHANGED, State.CLAIMED, State.RUNNING),
            (EventKind.STATUS_CHANGED, State.RUNNING, State.DONE),
        ]
        assert {e.token_description for e in events} == {"my wrapper"}
        assert events[-1].time == at("2024-07-01 11:04:00", london=london)

        tokens = {secret: store.find_token(hash_secret(secret)) for secret in npg.tokens}
        assert tokens[admin] is not None and tokens[admin].role is Role.ADMIN
        assert tokens[wrapper] is not None and tokens[wrapper].role is Role.PIPELINE
        assert tokens[wrapper].pipeline_name == "npg_test"
        assert tokens[wrapper].token_id == underway.claimed_by_token_id
        assert tokens[retired] is not None
        assert tokens[retired].revoke_time == at("2024-07-02 08:00:00", london=london)
    finally:
        store.close()

    # npg_porch's wrapper token goes on working in porch: it finishes its task.
    porch = start_porch(db_url)
    try:
        client = porch.stub(wrapper)
        task = pb.Task(
            pipeline=pb.Pipeline(name="npg_test"), task_input_id=running, status=pb.Task.DONE
        )
        assert client.UpdateTask(pb.UpdateTaskRequest(task=task)).status == pb.Task.DONE
        with pytest.raises(grpc.RpcError) as refused:
            porch.stub(retired).GetTask(
                pb.GetTaskRequest(pipeline_name="npg_test", task_input_id=done)
            )
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
    finally:
        porch.stop()


def test_a_second_import_adds_only_what_is_new(
    npg_porch: NpgPorch, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    npg = npg_porch
    pipeline_id = npg.pipeline(**PIPELINE)
    wrapper = npg.token("my wrapper", pipeline_id, "2024-07-01 10:00:00")
    first = npg.task(pipeline_id, '{"id_run": 1}', [("2024-07-01 11:00:00", "Created", wrapper)])
    import_npg(npg, db_url)
    capsys.readouterr()
    # npg_porch went on a little: a task finished, a new one came.
    npg.run("UPDATE task SET state = 'DONE'")
    npg.run(
        "INSERT INTO event (task_id, time, change, token_id) SELECT task_id, created,"
        " 'Task changed, new status DONE', 1 FROM task"
    )
    second = npg.task(pipeline_id, '{"id_run": 2}', [("2024-07-01 12:00:00", "Created", wrapper)])

    import_npg(npg, db_url)

    said = capsys.readouterr().out
    assert "imported 0 pipeline(s), 0 token(s), 1 task(s) and 1 event(s)" in said
    assert "left as they were in porch: 1 pipeline(s), 1 token(s), 1 task(s)" in said
    assert "(2 of npg_porch's events of them not copied)" in said
    store = Store(make_engine(db_url))
    try:
        assert store.get_task("npg_test", first).status is State.PENDING
        assert len(store.list_task_events("npg_test", first, 100, "").items) == 1
        assert store.get_task("npg_test", second).status is State.PENDING
    finally:
        store.close()


def test_a_dry_run_counts_and_writes_nothing(
    npg_porch: NpgPorch, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    npg = npg_porch
    pipeline_id = npg.pipeline(**PIPELINE)
    wrapper = npg.token("my wrapper", pipeline_id, "2024-07-01 10:00:00")
    npg.task(pipeline_id, '{"id_run": 1}', [("2024-07-01 11:00:00", "Created", wrapper)])

    import_npg(npg, db_url, "--dry-run")

    said = capsys.readouterr().out
    assert "would import 1 pipeline(s), 1 token(s), 1 task(s) and 1 event(s)" in said
    assert "nothing was written (--dry-run)" in said
    store = Store(make_engine(db_url))
    try:
        assert store.list_pipelines(None, None, 10, "").items == []
        assert store.find_token(hash_secret(wrapper)) is None
    finally:
        store.close()


@pytest.mark.parametrize(
    ("spoil", "named"),
    [
        (
            "UPDATE event SET change = 'Task reset' WHERE change = 'Task claimed'",
            "npg_porch's event 3 records 'Task reset', none of the changes npg_porch 2 records",
        ),
        (
            "UPDATE task SET state = 'LOST' WHERE task_id = 2",
            "npg_porch's task 2 (pipeline 'npg_test') has status 'LOST', not porch's",
        ),
        (
            "UPDATE task SET definition = '[1, 2]' WHERE task_id = 2",
            "npg_porch's task 2 (pipeline 'npg_test') has a definition that is not a JSON object",
        ),
        (
            "UPDATE pipeline SET name = 'a/b'",
            "npg_porch's pipeline 1: pipeline.name must not contain '/' at character 2",
        ),
        (
            "UPDATE pipeline SET repository_uri = 'https://example.org/\u200bnpg'",
            "npg_porch's pipeline 1: pipeline.uri must not contain control characters, line"
            " breaks or format characters: U+200B (ZERO WIDTH SPACE) at character 21",
        ),
        (
            "UPDATE token SET description = 'wrapper \u202eboj'",
            "npg_porch's token 1: description must not contain control characters, line breaks"
            " or bidirectional controls: U+202E (RIGHT-TO-LEFT OVERRIDE) at character 9",
        ),
        (
            "UPDATE token SET token = 'not a token'",
            "npg_porch's token 1 has a secret that is not one porch accepts",
        ),
        (
            TWIN_OF_TASK_3,
            "the source's tasks 3 and 4 of pipeline 'npg_test' are one task for porch",
        ),
    ],
)
def test_bad_rows_are_named_and_nothing_is_imported(
    npg_porch: NpgPorch,
    db_url: str,
    spoil: str,
    named: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    npg = npg_porch
    pipeline_id = npg.pipeline(**PIPELINE)
    wrapper = npg.token("my wrapper", pipeline_id, "2024-07-01 10:00:00")
    npg.task(pipeline_id, '{"n": 1}', [("2024-07-01 11:00:00", "Created", wrapper)])
    npg.task(
        pipeline_id,
        '{"n": 2}',
        [
            ("2024-07-01 11:01:00", "Created", wrapper),
            ("2024-07-01 11:02:00", "Task claimed", wrapper),
        ],
    )
    npg.task(pipeline_id, '{"n": 100}', [("2024-07-01 11:03:00", "Created", wrapper)])
    npg.run(spoil)

    with pytest.raises(SystemExit) as stopped:
        import_npg(npg, db_url)

    assert stopped.value.code == 1
    said = capsys.readouterr().err
    assert named in said
    assert said.rstrip().endswith("; nothing was imported")
    store = Store(make_engine(db_url))
    try:
        assert store.list_pipelines(None, None, 10, "").items == []
    finally:
        store.close()


def test_a_pipeline_porch_has_otherwise_is_refused(
    npg_porch: NpgPorch, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    npg = npg_porch
    npg.pipeline(**PIPELINE)
    store = Store(make_engine(db_url))
    try:
        store.create_pipeline(
            Pipeline(name="npg_test", uri="https://example.org/mine", version="9")
        )
    finally:
        store.close()
    capsys.readouterr()

    with pytest.raises(SystemExit):
        import_npg(npg, db_url)

    assert (
        "pipeline 'npg_test' is in porch already, with uri 'https://example.org/mine' and"
        " version '9', not 'https://github.com/wtsi-npg/npg_test' and '0.1'; nothing was imported"
    ) in capsys.readouterr().err


def test_a_database_that_is_not_npg_porchs_is_named(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    porchs = f"sqlite:///{tmp_path / 'another.db'}"
    migrate.upgrade(porchs)

    # porch's own tables have npg_porch's names, not its columns.
    schema = [] if db_url.startswith("sqlite") else ["--from-db-schema", "public"]
    with pytest.raises(SystemExit):
        cli.main(["db", "import-npg-porch", "--from-db-url", db_url, *schema, "--db-url", porchs])

    said = capsys.readouterr().err
    assert "holds no npg_porch 2 tables: its table 'event' has no column 'event_id'" in said
    assert "nothing was imported" in said


def test_npg_porchs_environment_names_only_the_database_read(
    npg_porch: NpgPorch,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    npg = npg_porch
    npg.pipeline(**PIPELINE)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setenv("DB_URL", npg.url)
    if npg.schema:
        monkeypatch.setenv("DB_SCHEMA", npg.schema)
    schema = ["--from-db-schema", npg.schema] if npg.schema else []

    # With only npg_porch's variables set, porch's database is its default.
    with pytest.raises(SystemExit) as stopped:
        cli.main(["db", "import-npg-porch", "--from-db-url", npg.url, *schema])
    assert "no database at sqlite:///porch.db" in str(stopped.value.code)
    assert "into porch's sqlite:///porch.db\n" in capsys.readouterr().out

    # Named as the same database, it is refused before anything is opened.
    with pytest.raises(SystemExit) as stopped:
        cli.main(
            ["db", "import-npg-porch", "--from-db-url", npg.url, *schema, "--db-url", npg.url]
            + (["--db-schema", npg.schema] if npg.schema else [])
        )
    assert stopped.value.code == 1
    assert "npg_porch's database and porch's are the same" in capsys.readouterr().err


def test_a_history_is_replayed_in_npg_porchs_order_as_porch_would_have_made_it(
    npg_porch: NpgPorch, db_url: str
) -> None:
    npg = npg_porch
    pipeline_id = npg.pipeline(**PIPELINE)
    wrapper = npg.token("my wrapper", pipeline_id, "2024-07-01 10:00:00")
    # Claimed, released, cancelled; written across the hour the clocks went
    # back, so that the later events carry earlier times.
    released = npg.task(
        pipeline_id,
        '{"n": 1}',
        [
            ("2024-10-27 01:50:00", "Created", wrapper),
            ("2024-10-27 01:10:00", "Task claimed", wrapper),
            ("2024-10-27 01:20:00", "Task changed, new status PENDING", wrapper),
            ("2024-10-27 01:30:00", "Task changed, new status CANCELLED", wrapper),
        ],
    )

    import_npg(npg, db_url)

    store = Store(make_engine(db_url))
    try:
        task = store.get_task("npg_test", released)
        events = store.list_task_events("npg_test", released, 100, "").items
    finally:
        store.close()
    assert [(e.kind, e.old_status, e.new_status) for e in events] == [
        (EventKind.CREATED, None, State.PENDING),
        (EventKind.CLAIMED, State.PENDING, State.CLAIMED),
        (EventKind.STATUS_CHANGED, State.CLAIMED, State.PENDING),
        (EventKind.STATUS_CHANGED, State.PENDING, State.CANCELLED),
    ]
    times = [e.time for e in events]
    assert times == sorted(times) and times[0] == task.create_time
    assert (task.status, task.claim_number) == (State.CANCELLED, 1)
    assert (task.claim_time, task.claimed_by_token_id) == (None, None)


@pytest.mark.parametrize(
    ("definition", "named"),
    [
        (
            '{"huge": 1152921504606846977}',
            "task_input.huge: the integer 1152921504606846977 would be stored as"
            " 1152921504606846976",
        ),
        ('{"n": 1' + "0" * 400 + "}", "is past any double"),
        ('{"n": 1' + "0" * 5000 + "}", "its definition cannot be read: Exceeds the limit"),
        ('{"a": ' + "[" * 60 + "]" * 60 + "}", "task_input nests deeper than 32 levels"),
        ('{"a": ' + "[" * 3000 + "]" * 3000 + "}", "task_input nests deeper than 32 levels"),
    ],
)
def test_an_input_porch_would_refuse_or_change_is_named(
    npg_porch: NpgPorch,
    db_url: str,
    definition: str,
    named: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    npg = npg_porch
    pipeline_id = npg.pipeline(**PIPELINE)
    npg.token("my wrapper", pipeline_id, "2024-07-01 10:00:00")
    npg.run(
        "INSERT INTO task (pipeline_id, job_descriptor, definition, state, created)"
        " VALUES (:p, 'x', :d, 'PENDING', '2024-07-01 11:00:00')",
        p=pipeline_id,
        d=definition,
    )

    with pytest.raises(SystemExit):
        import_npg(npg, db_url)

    said = capsys.readouterr().err
    assert said.startswith("porch: npg_porch's task 1 (pipeline 'npg_test'): ")
    assert named in said and said.rstrip().endswith("; nothing was imported")
    assert "Traceback" not in said


def test_odd_rows_npg_porch_allowed_are_imported_and_accounted_for(
    npg_porch: NpgPorch, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    npg = npg_porch
    pipeline_id = npg.pipeline(**PIPELINE)
    wrapper = npg.token("my wrapper", pipeline_id, "2024-07-01 10:00:00")
    floated = npg.task(pipeline_id, '{"n": 2.0}', [("2024-07-01 11:00:00", "Created", wrapper)])
    # An admin token made by hand, undated; an event of no task.
    by_hand = "0123456789abcdef0123456789abcdef"
    npg.run("INSERT INTO token (token, description) VALUES (:s, 'by hand')", s=by_hand)
    npg.run(
        "INSERT INTO event (task_id, time, change, token_id) VALUES (NULL, :t, 'Created', 1)",
        t="2024-07-01 12:00:00",
    )
    before = datetime.now(UTC)

    import_npg(npg, db_url)

    said = capsys.readouterr().out
    assert "imported 1 pipeline(s), 2 token(s), 1 task(s) and 1 event(s)" in said
    assert "porch: 1 of npg_porch's events are of no task there, and were not copied" in said
    store = Store(make_engine(db_url))
    try:
        made = store.find_token(hash_secret(by_hand))
        assert made is not None and made.role is Role.ADMIN
        assert made.create_time >= before
    finally:
        store.close()

    # A second run lists no task as renamed again: it added none.
    import_npg(npg, db_url)
    again = capsys.readouterr().out
    assert f"task {floated} of pipeline npg_test is task" in said
    assert "have ids of porch's own" not in again and floated not in again


def test_a_database_or_schema_not_there_is_named_and_not_made(
    npg_porch: NpgPorch, db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.db"
    for source in (
        ["--from-db-url", f"sqlite:///{missing}"],
        ["--from-db-url", npg_porch.url, "--from-db-schema", "npgporch"],
        ["--from-db-url", "postgresql://postgres@127.0.0.1:1/npg_porch"],
        ["--from-db-url", "not a url"],
        ["--from-db-url", "mysql://root@127.0.0.1/npg_porch"],
    ):
        with pytest.raises(SystemExit) as stopped:
            cli.main(["db", "import-npg-porch", *source, "--db-url", db_url])
        said = capsys.readouterr().err
        assert stopped.value.code == 1, said
        assert said.startswith("porch: ") and said.rstrip().endswith("; nothing was imported")
        assert "Traceback" not in said
        assert "npg_porch" in said or "--from-db-url" in said
    assert not missing.exists()


@pytest.mark.parametrize("directory", ["what?", "a#b", "50%25", "with space", "slashed"])
def test_a_sqlite_file_is_read_wherever_it_is_and_never_made(
    directory: str, sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / directory).mkdir()
    # As a URL names any path: its special characters escaped, and (POSIX
    # allows it) with one slash more in front.
    twice = "/" if directory == "slashed" else ""
    url = f"sqlite:///{twice}{urllib.parse.quote(str(tmp_path / directory))}"
    npg = NpgPorch(f"{url}/npg_porch.db", None)
    npg.pipeline(**PIPELINE)
    npg.close()
    before = sorted(tmp_path.rglob("*"))

    import_npg(npg, sqlite_url, "--dry-run")
    assert "would import 1 pipeline(s)" in capsys.readouterr().out
    missing = ["--from-db-url", f"{url}/x.db", "--db-url", sqlite_url]
    with pytest.raises(SystemExit):
        cli.main(["db", "import-npg-porch", *missing])
    assert "unable to open database file; nothing was imported" in capsys.readouterr().err
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize(
    ("spoil", "named"),
    [
        ("UPDATE task SET created = 'yesterday'", "Invalid isoformat string: 'yesterday'"),
        # SQLite keeps a number where a time was declared; its driver cannot read it.
        ("UPDATE event SET time = 1719828000", "argument must be str"),
    ],
)
def test_a_time_porch_cannot_read_is_named(
    spoil: str, named: str, sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    npg = NpgPorch(f"sqlite:///{tmp_path / 'npg_porch.db'}", None)
    pipeline_id = npg.pipeline(**PIPELINE)
    wrapper = npg.token("my wrapper", pipeline_id, "2024-07-01 10:00:00")
    npg.task(pipeline_id, '{"n": 1}', [("2024-07-01 11:00:00", "Created", wrapper)])
    npg.run(spoil)
    npg.close()

    with pytest.raises(SystemExit):
        import_npg(npg, sqlite_url)

    said = capsys.readouterr().err
    table = spoil.split()[1]
    assert f"holds a value in its table '{table}' that porch cannot read: " in said
    assert named in said and said.rstrip().endswith("; nothing was imported")


def test_npg_porchs_and_porchs_tables_may_share_a_database_in_schemas_of_their_own(
    postgres_server: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    with npg_porch_on_postgresql(postgres_server) as npg:
        npg.pipeline(**PIPELINE)
        migrate.upgrade(npg.url)  # porch's tables in public, npg_porch's in npg_porch

        import_npg(npg, npg.url)

        said = capsys.readouterr().out
        assert f"copying npg_porch's database {shown_url(npg.url)}, schema npg_porch into" in said
        assert "imported 1 pipeline(s)" in said
        with pytest.raises(SystemExit):
            import_npg(npg, npg.url, "--db-schema", "npg_porch")
        assert "npg_porch's database and porch's are the same" in capsys.readouterr().err


def test_an_empty_source_url_is_refused(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        cli.main(["db", "import-npg-porch", "--from-db-url", "", "--db-url", sqlite_url])
    assert "porch: --from-db-url is empty: give npg_porch's database URL" in (
        capsys.readouterr().err
    )


@pytest.mark.postgres
def test_porchs_database_refusing_writes_is_named_as_porchs(
    pg_url: str, npg_porch: NpgPorch, capsys: pytest.CaptureFixture[str]
) -> None:
    npg_porch.pipeline(**PIPELINE)
    name = pg_url.rpartition("/")[2]
    run_sql(pg_url, f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')

    with pytest.raises(SystemExit):
        import_npg(npg_porch, pg_url)

    said = capsys.readouterr().err
    assert said.startswith(
        f"porch: porch's database {shown_url(pg_url)}: the database is read-only"
    )


@pytest.mark.postgres
def test_npg_porchs_connection_lost_after_porchs_commit_is_no_failure(
    postgres_server: Any,
    sqlite_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with npg_porch_on_postgresql(postgres_server) as npg:
        npg.pipeline(**PIPELINE)
        imported = Store.import_records

        def then_lose_npg_porch(store: Store, *args: Any, **kwargs: Any) -> Any:
            counts = imported(store, *args, **kwargs)
            npg.run(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            return counts

        monkeypatch.setattr(Store, "import_records", then_lose_npg_porch)
        import_npg(npg, sqlite_url)

    assert "imported 1 pipeline(s)" in capsys.readouterr().out
