"""Runs count how often a shutdown handed them back.

- ``runs.handbacks``: how often a stopping process let the run go (a graceful stop). The
  first ``COUNTERSIGN_RUN_MAX_ATTEMPTS`` of them are free; later ones count as retries, so a
  run that every stop cuts off (a model call that never ends, a process stopped by a
  liveness probe each time) still ends after a bounded number of tries.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 23:50:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Existing runs start at 0; the default only fills the rows there are (the application
    # writes every column itself).
    with op.batch_alter_table("runs") as batch:
        batch.add_column(
            sa.Column("handbacks", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )
    with op.batch_alter_table("runs") as batch:
        batch.alter_column("handbacks", existing_type=sa.Integer(), server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("handbacks")
