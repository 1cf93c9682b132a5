"""Model messages stored once each: ``model_messages`` replaces ``runs.history``.

Until now every run stored the whole conversation so far (``runs.history``), so storage and
the cost of a turn grew with the square of a session's length. Now each message of the
agent's conversation is one row of ``model_messages`` (per session, ``seq`` 1..n), written
when it happens, and a run keeps only ``history_seq``: how far its checkpoint reaches.

``runs.retries`` counts the claims of a run whose process stopped or let it go (a decision's
re-queue is not a retry), so that ``COUNTERSIGN_RUN_MAX_ATTEMPTS`` bounds retries only.

Existing data: a session's history is the one its newest succeeded run stored; a run still
going (queued, running or waiting for approval) adds what its own history has beyond that.
Histories of older or failed runs were superseded and are not kept. The downgrade rebuilds
``runs.history`` for every run with a checkpoint.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 18:00:00
"""

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TIMESTAMP = sa.DateTime(timezone=True)
ACTIVE = ("queued", "running", "awaiting_approval")

model_messages = sa.table(
    "model_messages",
    sa.column("session_id", sa.Uuid()),
    sa.column("seq", sa.Integer()),
    sa.column("run_id", sa.Uuid()),
    sa.column("data", JSON),
    sa.column("created_at", TIMESTAMP),
)
runs = sa.table(
    "runs",
    sa.column("id", sa.Uuid()),
    sa.column("session_id", sa.Uuid()),
    sa.column("status", sa.String()),
    sa.column("history", JSON),
    sa.column("history_seq", sa.Integer()),
    sa.column("created_at", TIMESTAMP),
)


def upgrade() -> None:
    op.create_table(
        "model_messages",
        sa.Column("session_id", sa.Uuid(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Uuid(), nullable=False),
        sa.Column("data", JSON, nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.id"],
            name=op.f("fk_model_messages_run_id_runs"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["sessions.id"],
            name=op.f("fk_model_messages_session_id_sessions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("session_id", "seq", name=op.f("pk_model_messages")),
    )
    with op.batch_alter_table("model_messages", schema=None) as batch_op:
        batch_op.create_index("ix_model_messages_run_id", ["run_id"], unique=False)
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("history_seq", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("retries", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.alter_column("retries", existing_type=sa.Integer(), server_default=None)

    _move_histories_to_rows()

    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("history")


def _move_histories_to_rows() -> None:
    connection = op.get_bind()
    now = datetime.now(UTC)
    sessions = connection.execute(
        sa.select(runs.c.session_id).where(runs.c.history.is_not(None)).distinct()
    ).scalars()
    for session_id in list(sessions):
        rows = connection.execute(
            sa.select(runs.c.id, runs.c.status, runs.c.history)
            .where(runs.c.session_id == session_id, runs.c.history.is_not(None))
            .order_by(runs.c.created_at)
        ).all()
        # A JSON null (what an unset history may be stored as) is no history either.
        rows = [row for row in rows if _history(row.history)]
        succeeded = [row for row in rows if row.status == "succeeded"]
        active = [row for row in rows if row.status in ACTIVE]
        stored: list[Any] = []
        if succeeded:
            newest = succeeded[-1]
            stored = _history(newest.history)
            _insert(connection, session_id, newest.id, stored, start=0, now=now)
            _set_seq(connection, newest.id, len(stored))
        for run in active:
            history = _history(run.history)
            # Runs always extend the session's history; should one not, it starts over.
            start = len(stored) if history[: len(stored)] == stored else 0
            if start == 0 and stored:
                continue  # cannot be placed after what is stored; left without a checkpoint
            _insert(connection, session_id, run.id, history[start:], start=start, now=now)
            _set_seq(connection, run.id, len(history))


def _history(value: Any) -> list[Any]:
    loaded = json.loads(value) if isinstance(value, str) else value
    return list(loaded or [])


def _insert(
    connection: sa.Connection,
    session_id: Any,
    run_id: Any,
    messages: list[Any],
    *,
    start: int,
    now: datetime,
) -> None:
    if messages:
        connection.execute(
            model_messages.insert(),
            [
                {
                    "session_id": session_id,
                    "seq": start + index + 1,
                    "run_id": run_id,
                    "data": message,
                    "created_at": now,
                }
                for index, message in enumerate(messages)
            ],
        )


def _set_seq(connection: sa.Connection, run_id: Any, seq: int) -> None:
    connection.execute(runs.update().where(runs.c.id == run_id).values(history_seq=seq))


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("history", JSON, nullable=True))
    connection = op.get_bind()
    checkpoints = connection.execute(
        sa.select(runs.c.id, runs.c.session_id, runs.c.history_seq).where(
            runs.c.history_seq.is_not(None)
        )
    ).all()
    for run in checkpoints:
        history = connection.execute(
            sa.select(model_messages.c.data)
            .where(
                model_messages.c.session_id == run.session_id,
                model_messages.c.seq <= run.history_seq,
            )
            .order_by(model_messages.c.seq)
        ).scalars()
        connection.execute(runs.update().where(runs.c.id == run.id).values(history=[*history]))
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_column("retries")
        batch_op.drop_column("history_seq")
    with op.batch_alter_table("model_messages", schema=None) as batch_op:
        batch_op.drop_index("ix_model_messages_run_id")
    op.drop_table("model_messages")
