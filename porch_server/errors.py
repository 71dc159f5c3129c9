"""porch's own exceptions, raised by every layer below the transport.

    PorchError
    ├── InvalidArgument      the request itself is wrong
    ├── NotFound             a named pipeline, task or token does not exist
    ├── AlreadyExists        a pipeline name is taken
    ├── FailedPrecondition   the state of a task forbids the change
    ├── OutOfRange           a cursor older than the events kept
    ├── Unauthenticated      missing, unknown, malformed or revoked token
    ├── PermissionDenied     a valid token without the right
    ├── ResourceExhausted    as many streams open as the server keeps
    └── Unavailable          the database cannot be reached
        ├── Locked           a task locked elsewhere, for a write not to wait
        └── TimedOut         (porch_server.db.pgasync) a statement timed out
            └── LockTimedOut     ... waiting for a lock

``service`` maps each to its gRPC status code in one table.
"""

import logging
import time

# A failure that repeats while the database is down (every call, every poll)
# is logged at most this often for each text.
REPEAT_LOG_SECONDS = 10.0
_logged_at: dict[str, float] = {}

# PostgreSQL's read_only_sql_transaction: a standby, or a database or role
# set read-only. porch cannot write until its URL names a primary again.
READ_ONLY_SQLSTATE = "25006"
READ_ONLY_DATABASE = "the database is read-only (a standby?): porch cannot write to it"


class PorchError(Exception):
    """Base of porch's errors; the message is meant for the person calling."""


class InvalidArgument(PorchError):
    """The request is malformed or a value is out of bounds."""


class NotFound(PorchError):
    """A named pipeline, task or token does not exist."""


class AlreadyExists(PorchError):
    """The thing to create exists already."""


class FailedPrecondition(PorchError):
    """The current state forbids the change (e.g. an illegal transition)."""


class OutOfRange(PorchError):
    """A cursor points before the oldest event kept."""


class Unauthenticated(PorchError):
    """No valid token was presented."""


class PermissionDenied(PorchError):
    """The token is valid but lacks the right for this call."""


class ResourceExhausted(PorchError):
    """The server holds as many of something as it keeps (streams, say); the
    call may be retried later."""


class Unavailable(PorchError):
    """The database cannot be reached; the call may be retried.

    The cause, the driver's own words, may name the database's host, port
    and name, and is for the server's log and porch's own commands, not for
    callers: ``status.message_of`` leaves it out of an answer."""

    def __init__(self, message: str, cause: str | None = None) -> None:
        super().__init__(f"{message}: {cause}" if cause else message)
        self.message = message
        self.cause = cause


class Locked(Unavailable):
    """A task is locked by another transaction, and the change or the
    registration was asked not to wait for it."""


# PostgreSQL's lock_not_available: a NOWAIT lock refused, or a lock_timeout.
LOCK_NOT_AVAILABLE = "55P03"
# PostgreSQL's query_canceled: a statement_timeout, or a cancel.
QUERY_CANCELED = "57014"
# The words for a statement PostgreSQL's own lock_timeout ended (a role's, say).
LOCK_TIMED_OUT = "another transaction held a lock longer than PostgreSQL's lock_timeout allows"


def shortened(value: str) -> str:
    """A value the client sent, for a message that quotes it: at most its
    first 64 characters (a task_input_id whole), then "…". A value of any
    length could otherwise make the message too long to send (gRPC's status
    travels in metadata, which clients refuse past 8 to 16 KiB)."""
    return value if len(value) <= 64 else value[:64] + "…"


def first_line(error: BaseException | None) -> str:
    """The first line of error's message: database drivers add hints on lines
    of their own, which an answer or a log line should not carry."""
    return str(error).strip().split("\n", 1)[0]


def due_in_log(text: str) -> bool:
    """Whether a repeated failure's text is due in the log: the first time,
    then at most once every REPEAT_LOG_SECONDS."""
    now = time.monotonic()
    if now - _logged_at.get(text, -REPEAT_LOG_SECONDS) < REPEAT_LOG_SECONDS:
        return False
    if len(_logged_at) > 100:
        _logged_at.clear()
    _logged_at[text] = now
    return True


def warn_now_and_then(logger: logging.Logger, text: str) -> None:
    """Log a repeated failure's text as a warning when it is due_in_log."""
    if due_in_log(text):
        logger.warning("%s", text)
