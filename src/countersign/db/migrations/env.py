"""Alembic environment: runs on the connection handed over by ``countersign.db.migrations``."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from countersign.db.tables import Base


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=True,
        compare_type=True,
        transaction_per_migration=False,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "Countersign migrations run through `countersign db upgrade`, not the alembic command."
    )
_run(connection)
