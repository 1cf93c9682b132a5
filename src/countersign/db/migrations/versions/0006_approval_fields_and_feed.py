"""Approvals keep what the model proposed apart from what a person approved, and say why
they were asked; indexes for the approvals inbox and the per-user live feed.

- ``approvals.decided_arguments``: the arguments as approved when a person edited them (null
  otherwise); ``approvals.arguments`` stays what the model proposed. Until now an edit
  replaced ``arguments``; those rows keep the edited arguments there (what was proposed is not
  known any more) and get no ``decided_arguments``.
- ``approvals.asked_because``: why the call waits for a person (``policy ask`` for every
  approval so far).
- ``ix_approvals_status_id``: a user's pending approvals across sessions, oldest first.
- ``ix_runs_updated_at``: what changed lately, for ``GET /me/events``.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 21:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("approvals") as batch:
        batch.add_column(sa.Column("decided_arguments", JSON, nullable=True))
        batch.add_column(
            sa.Column("asked_because", sa.String(200), nullable=False, server_default="policy ask")
        )
    # The default only fills the rows there are: new ones always say why (ids and values come
    # from the application, never from a database default).
    with op.batch_alter_table("approvals") as batch:
        batch.alter_column("asked_because", server_default=None)
    op.create_index("ix_approvals_status_id", "approvals", ["status", "id"])
    op.create_index("ix_runs_updated_at", "runs", ["updated_at"])


def downgrade() -> None:
    op.drop_index("ix_runs_updated_at", table_name="runs")
    op.drop_index("ix_approvals_status_id", table_name="approvals")
    # An edit's arguments go back where they used to be kept.
    op.execute(
        "UPDATE approvals SET arguments = decided_arguments WHERE decided_arguments IS NOT NULL"
    )
    with op.batch_alter_table("approvals") as batch:
        batch.drop_column("asked_because")
        batch.drop_column("decided_arguments")
