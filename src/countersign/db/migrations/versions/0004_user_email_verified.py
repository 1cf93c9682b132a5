"""Whether a user's email is known to be theirs.

``users.email_verified``: true for a user an operator made (``countersign user create``) and
for one a provider made from an email it verified; false for a self-service registration,
whose email nobody checked. Only a verified email may link a provider login to an existing
account (see services/identities.py). Existing users start unverified: nothing vouched for
their email yet.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 15:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(
            sa.Column("email_verified", sa.Boolean(), server_default=sa.false(), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.drop_column("email_verified")
