"""Run event counters: ``runs.last_seq`` and ``runs.checkpoint_seq``.

``last_seq`` numbers a run's events with one fenced UPDATE instead of a SELECT max(seq);
``checkpoint_seq`` marks how far the stored history reaches, so that recovery can tell a tool
call the history already contains from one whose outcome is unknown.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 11:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("last_seq", "checkpoint_seq")


def upgrade() -> None:
    # Existing runs get their events' count; the temporary default is dropped again, because
    # the application writes every column itself.
    with op.batch_alter_table("runs", schema=None) as batch_op:
        for name in COLUMNS:
            batch_op.add_column(
                sa.Column(name, sa.Integer(), nullable=False, server_default=sa.text("0"))
            )
    op.execute(
        "UPDATE runs SET last_seq = "
        "(SELECT coalesce(max(events.seq), 0) FROM events WHERE events.run_id = runs.id)"
    )
    with op.batch_alter_table("runs", schema=None) as batch_op:
        for name in COLUMNS:
            batch_op.alter_column(name, existing_type=sa.Integer(), server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("runs", schema=None) as batch_op:
        for name in reversed(COLUMNS):
            batch_op.drop_column(name)
