"""Access tokens, and users without an email.

``access_tokens`` holds the hashes of the opaque tokens that ``POST /auth/login`` hands out.
``users.email`` becomes nullable: an account made from a provider that gives no email (Kakao,
say) is keyed by its identity (provider + subject). The unique constraint stays; NULLs do not
clash with each other on either database.

On SQLite the ``users`` change rebuilds the table (batch mode). Migrations run on a connection
without ``PRAGMA foreign_keys=ON`` (SQLite's default), so dropping the old table does not
cascade to the rows that point at it.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from alembic.util import CommandError

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "access_tokens",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.Column("expires_at", TIMESTAMP, nullable=False),
        sa.Column("revoked_at", TIMESTAMP, nullable=True),
        sa.Column("last_used_at", TIMESTAMP, nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_access_tokens_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_access_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_access_tokens_token_hash")),
    )
    with op.batch_alter_table("access_tokens", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_access_tokens_user_id"), ["user_id"], unique=False)

    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.alter_column("email", existing_type=sa.String(length=320), nullable=True)


def downgrade() -> None:
    # Accounts without an email cannot go back to a NOT NULL column: they (and everything
    # they own) would have to be deleted, so the downgrade refuses instead of losing data.
    connection = op.get_bind()
    without_email = connection.scalar(sa.text("SELECT count(*) FROM users WHERE email IS NULL"))
    if without_email:
        raise CommandError(
            f"{without_email} user(s) have no email, and below revision 0003 every user needs "
            "one; give them an email (or delete them) first"
        )
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.alter_column("email", existing_type=sa.String(length=320), nullable=False)

    with op.batch_alter_table("access_tokens", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_access_tokens_user_id"))

    op.drop_table("access_tokens")
