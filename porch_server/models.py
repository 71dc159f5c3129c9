"""The values that cross porch's layers: small frozen dataclasses, no ORM rows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Generic, TypeVar

from porch_server.states import State

T = TypeVar("T")


class Role(StrEnum):
    """What a token may do; the names are the proto enum's value names."""

    ADMIN = "ADMIN"
    PIPELINE = "PIPELINE"
    READER = "READER"


class EventKind(StrEnum):
    """What an event records; the names are the proto enum's value names."""

    CREATED = "CREATED"
    CLAIMED = "CLAIMED"
    STATUS_CHANGED = "STATUS_CHANGED"
    LEASE_EXPIRED = "LEASE_EXPIRED"


@dataclass(frozen=True, slots=True)
class Pipeline:
    """A kind of pipeline work."""

    name: str
    uri: str
    version: str


@dataclass(frozen=True, slots=True)
class Task:
    """One unit of work of a pipeline, as stored."""

    pipeline: Pipeline
    task_input_id: str
    task_input: dict[str, Any]
    status: State
    create_time: datetime
    update_time: datetime
    claim_time: datetime | None = None
    claimed_by_token_id: str | None = None
    lease_expire_time: datetime | None = None
    claim_number: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    """One change to a task."""

    cursor: str
    time: datetime
    pipeline_name: str
    task_input_id: str
    kind: EventKind
    old_status: State | None
    new_status: State | None
    token_id: str | None
    token_description: str | None
    message: str | None


@dataclass(frozen=True, slots=True)
class Token:
    """A token's metadata; never its secret."""

    token_id: str
    role: Role
    pipeline_name: str | None
    description: str
    create_time: datetime
    revoke_time: datetime | None = None


@dataclass(frozen=True, slots=True)
class Actor:
    """Who makes a change, as recorded in its event."""

    token_id: str | None
    description: str | None


SYSTEM = Actor(token_id=None, description=None)


@dataclass(frozen=True, slots=True)
class Registration:
    """The outcome of registering one task."""

    task: Task
    created: bool


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing; next_page_token is empty on the last page."""

    items: list[T]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class ImportedPipeline:
    """A pipeline read from another tracker's database; key is its id there."""

    key: int
    pipeline: Pipeline
    create_time: datetime


@dataclass(frozen=True, slots=True)
class ImportedToken:
    """A token read from another tracker's database, by the hash of its secret."""

    key: int
    role: Role
    pipeline_key: int | None
    description: str
    secret_hash: str
    create_time: datetime
    revoke_time: datetime | None


@dataclass(frozen=True, slots=True)
class ImportedTask:
    """A task read from another tracker's database, its input already canonical."""

    key: int
    pipeline_key: int
    task_input: str
    task_input_id: str
    status: State
    create_time: datetime
    former_id: str | None = None  # the id it had there, when not porch's


@dataclass(frozen=True, slots=True)
class ImportedEvent:
    """One change to an imported task: its kind, the status it left the task
    in, and the token (by its key there) that made it."""

    task_key: int | None
    time: datetime
    kind: EventKind
    status: State
    token_key: int | None


@dataclass(frozen=True, slots=True)
class ChangedTaskId:
    """An imported task whose id in porch is not the one it had."""

    pipeline_name: str
    former_id: str
    task_input_id: str


@dataclass(frozen=True, slots=True)
class ImportCounts:
    """What an import added, what it found already there and left as it was,
    and what it could not place."""

    pipelines_added: int
    pipelines_found: int
    tokens_added: int
    tokens_found: int
    tasks_added: int
    tasks_found: int
    events_added: int
    events_left: int
    events_of_no_task: int
    changed_ids: tuple[ChangedTaskId, ...]
