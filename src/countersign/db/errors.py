"""The one translator of driver errors into domain errors.

PostgreSQL errors are read by SQLSTATE, SQLite errors by their result code name, so that the
decision does not hang on the wording of a message:

- lost or refused connections, a server shutting down or starting (class 08, 57P01-57P03),
  too many connections or other resource limits (53), system errors (58), a deadlock (40P01),
  a serialization failure (40001), a statement timeout or cancel (57014), a lock not available
  (55P03), a busy, locked, read-only or unreadable SQLite file → ``Unavailable``: retryable,
  answered 503 with ``Retry-After``;
- an integrity violation → ``Conflict``;
- anything else is returned as it is: a bug, which callers log with its traceback.

The translated error never carries the driver's text (it may quote SQL or values); the
original stays chained for the log.
"""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from countersign.domain.errors import Conflict, CountersignError, Unavailable

RETRYABLE_SQLSTATES = frozenset({"40P01", "40001", "57014", "55P03", "57P01", "57P02", "57P03"})
"""Deadlock, serialization failure, statement timeout, lock not available, admin shutdown,
crash shutdown, cannot connect now."""
RETRYABLE_SQLSTATE_CLASSES = frozenset({"08", "53", "58"})
"""Connection exceptions, insufficient resources, system errors."""
RETRYABLE_SQLITE_CODES = (
    "SQLITE_BUSY",
    "SQLITE_LOCKED",
    "SQLITE_READONLY",
    "SQLITE_IOERR",
    "SQLITE_CANTOPEN",
    "SQLITE_FULL",
    "SQLITE_PROTOCOL",
)

_BUSY = "the database is busy; try again"
_UNREACHABLE = "the database cannot be reached right now; try again"
_LOST = "the connection to the database was lost; try again"


def translate_error(exc: SQLAlchemyError | OSError) -> CountersignError | SQLAlchemyError:
    """The domain error for a driver error (an unknown one is returned as it is)."""
    if isinstance(exc, IntegrityError):
        return Conflict("the request conflicts with data that already exists")
    if isinstance(exc, PoolTimeoutError):
        return Unavailable("the database has no free connection right now; try again")
    if isinstance(exc, OSError):
        return Unavailable(_UNREACHABLE)
    if not isinstance(exc, DBAPIError):
        return exc
    sqlstate = sqlstate_of(exc)
    if sqlstate is not None:
        if sqlstate in {"40P01", "40001", "55P03"}:
            return Unavailable(_BUSY)
        if sqlstate == "57014":
            return Unavailable("the database took too long to answer; try again")
        if sqlstate in RETRYABLE_SQLSTATES or sqlstate[:2] in RETRYABLE_SQLSTATE_CLASSES:
            return Unavailable(_UNREACHABLE)
    code = sqlite_code_of(exc)
    if code is not None and code.startswith(RETRYABLE_SQLITE_CODES):
        if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return Unavailable(_BUSY)
        if code.startswith("SQLITE_READONLY"):
            return Unavailable("the database cannot be written right now; try again")
        return Unavailable(_UNREACHABLE)
    if exc.connection_invalidated:
        return Unavailable(_LOST)
    if _is_connection_failure(exc):
        return Unavailable(_UNREACHABLE)
    return exc


def is_retryable(exc: BaseException) -> bool:
    """Whether a driver error is a transient one (what ``translate_error`` makes Unavailable)."""
    if not isinstance(exc, SQLAlchemyError | OSError):
        return False
    return isinstance(translate_error(exc), Unavailable)


def sqlstate_of(exc: DBAPIError) -> str | None:
    """The PostgreSQL SQLSTATE of a driver error, if it has one."""
    for error in _chain(exc.orig):
        for attribute in ("sqlstate", "pgcode"):
            value = getattr(error, attribute, None)
            if isinstance(value, str) and len(value) == 5:
                return value
    return None


def sqlite_code_of(exc: DBAPIError) -> str | None:
    """The SQLite result code name (e.g. ``SQLITE_BUSY``) of a driver error, if it has one."""
    for error in _chain(exc.orig):
        value = getattr(error, "sqlite_errorname", None)
        if isinstance(value, str):
            return value
    text = str(exc.orig).lower()
    # Older drivers give no code; these are SQLite's own fixed messages.
    if "database is locked" in text or "database table is locked" in text:
        return "SQLITE_BUSY"
    if "readonly database" in text or "read-only" in text:
        return "SQLITE_READONLY"
    if "disk i/o error" in text:
        return "SQLITE_IOERR"
    return None


def _is_connection_failure(exc: DBAPIError) -> bool:
    for error in _chain(exc.orig):
        if isinstance(error, OSError | ConnectionError):
            return True
        name = type(error).__name__
        # asyncpg's errors for a connection that closed under a statement.
        if name in {"ConnectionDoesNotExistError", "InterfaceError", "InternalClientError"} and (
            "connection" in str(error).lower() or "closed" in str(error).lower()
        ):
            return True
    return False


def _chain(error: BaseException | None) -> list[BaseException]:
    seen: list[BaseException] = []
    while error is not None and error not in seen and len(seen) < 8:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen
