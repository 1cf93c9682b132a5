"""A turn's hot writes on SQLite, each one script (``db/sqlite_script.py``): one hand-off.

The same units of work PostgreSQL writes as one statement each (``RunRepository.start``,
``write``, ``append_many``), as statements that each check for themselves what the
PostgreSQL statement checks once: the start's inserts write only if the session is the
owner's, a batch's writes only if the run is still held under its lease. They run in one
transaction that holds SQLite's write lock, so the checks agree: everything is written, or
nothing. A batch's run is updated last, after the writes that read its ``last_seq`` (the
events' numbers) and its fence (which the update may end: a turn's end releases the lease).
"""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Any

from sqlalchemy import Integer, String, Table, bindparam, delete, func, insert, select, update
from sqlalchemy.sql.elements import BindParameter

from countersign.db.sqlite_script import Step
from countersign.db.tables import (
    AgentRow,
    Base,
    EventRow,
    MessageRow,
    ModelMessageRow,
    RunRow,
    SessionRow,
)
from countersign.domain.events import AssistantReply, EventType, RunBatch
from countersign.domain.models import MessageRole, RunStatus
from countersign.domain.text import storable

_RUNS: Table = Base.metadata.tables[RunRow.__tablename__]
_SESSIONS: Table = Base.metadata.tables[SessionRow.__tablename__]
_AGENTS: Table = Base.metadata.tables[AgentRow.__tablename__]
_MESSAGES: Table = Base.metadata.tables[MessageRow.__tablename__]
_EVENTS: Table = Base.metadata.tables[EventRow.__tablename__]
_MODEL_MESSAGES: Table = Base.metadata.tables[ModelMessageRow.__tablename__]


def _bind(name: str, table: Table, column: str | None = None) -> BindParameter[Any]:
    """A parameter named ``name`` of the type of ``table``'s ``column`` (default: ``name``)."""
    return bindparam(name, type_=table.c[column or name].type)


def _next_message_seq() -> Any:
    return (
        select(func.coalesce(func.max(_MESSAGES.c.seq), 0) + 1)
        .where(_MESSAGES.c.session_id == _bind("session_id", _MESSAGES))
        .scalar_subquery()
    )


# --- A run's start ----------------------------------------------------------------------

_OWNED = (
    select(_SESSIONS.c.id)
    .where(
        _SESSIONS.c.id == _bind("session_id", _SESSIONS, "id"),
        _SESSIONS.c.owner_id == _bind("owner", _SESSIONS, "owner_id"),
    )
    .exists()
)

START_READ = (
    select(
        *_SESSIONS.c,
        *_AGENTS.c,
        select(func.coalesce(func.max(_MODEL_MESSAGES.c.seq), 0))
        .where(_MODEL_MESSAGES.c.session_id == _bind("session_id", _MODEL_MESSAGES))
        .scalar_subquery(),
        select(_MODEL_MESSAGES.c.run_id)
        .where(_MODEL_MESSAGES.c.session_id == _bind("session_id", _MODEL_MESSAGES))
        .order_by(_MODEL_MESSAGES.c.seq.desc())
        .limit(1)
        .scalar_subquery(),
        _next_message_seq(),
    )
    .select_from(_SESSIONS.join(_AGENTS, _AGENTS.c.id == _SESSIONS.c.agent_id))
    .where(
        _SESSIONS.c.id == _bind("session_id", _SESSIONS, "id"),
        _SESSIONS.c.owner_id == _bind("owner", _SESSIONS, "owner_id"),
    )
)
"""The owner's session, its agent, its history's length and last run, the user's message's
``seq``: read first, in the start's transaction (so the numbers hold for its inserts)."""
SESSION_COLUMNS = len(_SESSIONS.c)
AGENT_COLUMNS = len(_AGENTS.c)

_RUN_COLUMNS = [column.name for column in _RUNS.c]
START_RUN = insert(_RUNS).from_select(
    _RUN_COLUMNS,
    select(*[_bind(f"run_{name}", _RUNS, name) for name in _RUN_COLUMNS]).where(_OWNED),
)
"""The run, if the session is the owner's (the unique index on a session's active run
refuses a second: IntegrityError)."""

_MESSAGE_COLUMNS = ["id", "session_id", "role", "content", "run_id", "created_at"]
START_MESSAGE = insert(_MESSAGES).from_select(
    [*_MESSAGE_COLUMNS, "seq"],
    select(
        *[_bind(f"message_{name}", _MESSAGES, name) for name in _MESSAGE_COLUMNS],
        _next_message_seq(),
    ).where(_OWNED),
)
"""The user's message after the session's last, if the session is the owner's."""


def start_steps(run_row: dict[str, Any], message_row: dict[str, Any], *, owner: Any) -> list[Step]:
    """The start's script: ``START_READ`` (its one row, or none), the run, the message."""
    keys = {"session_id": run_row["session_id"], "owner": owner}
    return [
        Step(START_READ, keys),
        Step(START_RUN, {**keys, **{f"run_{name}": value for name, value in run_row.items()}}),
        Step(
            START_MESSAGE,
            {**keys, **{f"message_{name}": value for name, value in message_row.items()}},
        ),
    ]


# --- A run's batch under its lease ------------------------------------------------------

_HELD = (
    select(_RUNS.c.id)
    .where(
        _RUNS.c.id == _bind("run_id", _RUNS, "id"),
        _RUNS.c.owner == _bind("owner", _RUNS),
        _RUNS.c.attempt == _bind("attempt", _RUNS),
        _RUNS.c.status == RunStatus.RUNNING.value,
    )
    .exists()
)
"""Whether the run is still held under the batch's lease (its fence)."""


def _events_insert(data: Any) -> Any:
    """The run's events, numbered on from its ``last_seq`` (not yet moved on), in its
    attempt; only while it is held."""
    return insert(_EVENTS).from_select(
        ["run_id", "seq", "type", "attempt", "data", "created_at"],
        select(
            _bind("run_id", _EVENTS),
            _RUNS.c.last_seq + bindparam("ord", type_=Integer),
            bindparam("type", type_=String),
            _RUNS.c.attempt,
            data,
            _bind("at", _EVENTS, "created_at"),
        ).where(
            _RUNS.c.id == _bind("run_id", _RUNS, "id"),
            _RUNS.c.owner == _bind("owner", _RUNS),
            _RUNS.c.attempt == _bind("attempt", _RUNS),
            _RUNS.c.status == RunStatus.RUNNING.value,
        ),
    )


EVENTS = _events_insert(_bind("data", _EVENTS))
COMPLETED_EVENT = _events_insert(
    func.json_set(
        _bind("data", _EVENTS),
        "$.seq",
        select(_MESSAGES.c.seq)
        .where(_MESSAGES.c.id == _bind("message_id", _MESSAGES, "id"))
        .scalar_subquery(),
    )
)
"""A ``message.completed`` event, with the ``seq`` of the reply written before it."""

REPLY = (
    insert(_MESSAGES)
    .from_select(
        ["id", "session_id", "role", "content", "run_id", "created_at", "seq"],
        select(
            _bind("message_id", _MESSAGES, "id"),
            _bind("session_id", _MESSAGES),
            bindparam("role", MessageRole.ASSISTANT.value, type_=String),
            _bind("content", _MESSAGES),
            _bind("message_run_id", _MESSAGES, "run_id"),
            _bind("at", _MESSAGES, "created_at"),
            _next_message_seq(),
        ).where(_HELD),
    )
    .returning(_MESSAGES.c.seq)
)
"""The assistant's message after the session's last, while the run is held."""

CUT_HISTORY = delete(_MODEL_MESSAGES).where(
    _MODEL_MESSAGES.c.session_id == _bind("session_id", _MODEL_MESSAGES),
    _MODEL_MESSAGES.c.seq > bindparam("messages_after", type_=Integer),
    _HELD,
)
"""The session's model messages past ``messages_after`` (a batch that replaces them)."""

HISTORY = insert(_MODEL_MESSAGES).from_select(
    ["session_id", "seq", "run_id", "data", "created_at"],
    select(
        _bind("session_id", _MODEL_MESSAGES),
        _bind("seq", _MODEL_MESSAGES),
        _bind("message_run_id", _MODEL_MESSAGES, "run_id"),
        _bind("data", _MODEL_MESSAGES),
        _bind("at", _MODEL_MESSAGES, "created_at"),
    ).where(_HELD),
)
"""One model message of the session, while the run is held."""


@functools.cache
def bump(values: frozenset[str], *, checkpoint: bool) -> Any:
    """The run's fenced UPDATE for a batch: ``last_seq`` moved on by its events (and the
    checkpoint, and ``values``), returning the new ``last_seq`` and the attempt; built once
    for each shape."""
    changes: dict[str, Any] = {
        "last_seq": _RUNS.c.last_seq + bindparam("count", type_=Integer),
        "updated_at": _bind("at", _RUNS, "updated_at"),
    }
    if checkpoint:
        changes["checkpoint_seq"] = _RUNS.c.last_seq + bindparam("checkpoint_after", type_=Integer)
    for name in sorted(values):
        changes[name] = _bind(f"set_{name}", _RUNS, name)
    return (
        update(_RUNS)
        .where(
            _RUNS.c.id == _bind("run_id", _RUNS, "id"),
            _RUNS.c.owner == _bind("owner", _RUNS),
            _RUNS.c.attempt == _bind("attempt", _RUNS),
            _RUNS.c.status == RunStatus.RUNNING.value,
        )
        .values(**changes)
        .returning(_RUNS.c.last_seq, _RUNS.c.attempt)
    )


def batch_steps(
    batch: RunBatch, data: list[Any], *, at: datetime, reply: AssistantReply | None
) -> tuple[list[Step], int | None]:
    """A batch's steps (``data``: its events' data, made storable), the run's UPDATE last (so
    ``steps[-1]`` returns its new ``last_seq`` and attempt, or nothing if the lease is gone);
    and the index of the reply's step, whose row is the message's ``seq``."""
    held = {"run_id": batch.run_id, "owner": batch.lease.owner, "attempt": batch.lease.attempt}
    steps: list[Step] = []
    reply_index: int | None = None
    if reply is not None:
        reply_index = len(steps)
        steps.append(
            Step(
                REPLY,
                {
                    **held,
                    "message_id": reply.message_id,
                    "session_id": batch.session_id,
                    "content": storable(reply.content),
                    "message_run_id": batch.run_id,
                    "at": at,
                },
            )
        )
    rows: list[dict[str, Any]] = []
    for ordinal, (event, stored) in enumerate(zip(batch.events, data, strict=True), start=1):
        row = {**held, "ord": ordinal, "type": event.type.value, "data": stored}
        row["at"] = at
        if reply is not None and event.type is EventType.MESSAGE_COMPLETED:
            steps.append(Step(COMPLETED_EVENT, {**row, "message_id": reply.message_id}))
        else:
            rows.append(row)
    if rows:
        steps.append(Step(EVENTS, rows))
    if batch.truncate:
        steps.append(
            Step(
                CUT_HISTORY,
                {**held, "session_id": batch.session_id, "messages_after": batch.messages_after},
            )
        )
    if batch.messages:
        steps.append(
            Step(
                HISTORY,
                [
                    {
                        **held,
                        "session_id": batch.session_id,
                        "seq": batch.messages_after + index,
                        "message_run_id": batch.run_id,
                        "data": storable(message),
                        "at": at,
                    }
                    for index, message in enumerate(batch.messages, start=1)
                ],
            )
        )
    values = storable(batch.values or {})
    changes: dict[str, Any] = {**held, "count": len(batch.events), "at": at}
    if batch.checkpoint_after is not None:
        changes["checkpoint_after"] = batch.checkpoint_after
    changes.update({f"set_{name}": value for name, value in values.items()})
    steps.append(
        Step(bump(frozenset(values), checkpoint=batch.checkpoint_after is not None), changes)
    )
    return steps, reply_index
