"""Migrations: one set for both databases, reversible, free of drift, and extension-free."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.util import CommandError
from sqlalchemy import (
    JSON,
    Connection,
    DateTime,
    Integer,
    String,
    Uuid,
    delete,
    func,
    insert,
    inspect,
    select,
    update,
)
from sqlalchemy import column as sa_column
from sqlalchemy import table as sa_table
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import create_async_engine

from countersign.config import normalise_database_url
from countersign.db import migrations
from countersign.db.tables import Base
from tests.support.databases import TestDatabase
from tests.support.postgres import PostgresServer, unique_name

TABLES = {
    "users",
    "identities",
    "api_keys",
    "access_tokens",
    "agents",
    "sessions",
    "messages",
    "model_messages",
    "runs",
    "events",
    "approvals",
    "idempotency_keys",
}


async def _tables(url: str) -> set[str]:
    engine = create_async_engine(normalise_database_url(url))
    try:
        async with engine.connect() as connection:
            names = await connection.run_sync(lambda sync: inspect(sync).get_table_names())
    finally:
        await engine.dispose()
    return set(names) - {"alembic_version"}


async def test_upgrade_downgrade_upgrade(empty_database: TestDatabase) -> None:
    """Head → base → head works on an empty database and leaves exactly the domain tables."""
    engine = create_async_engine(normalise_database_url(empty_database.url))
    try:
        await migrations.upgrade(engine)
        assert await migrations.current_revision(engine) == migrations.head_revision()
        assert await _tables(empty_database.url) == TABLES

        await migrations.downgrade(engine, "base")
        assert await migrations.current_revision(engine) is None
        assert await _tables(empty_database.url) == set()

        await migrations.upgrade(engine)
        assert await migrations.current_revision(engine) == migrations.head_revision()
        assert await _tables(empty_database.url) == TABLES
    finally:
        await engine.dispose()


def _drift(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


async def test_models_match_migrations(database: TestDatabase) -> None:
    """Autogenerate against the migrated database finds nothing to change (no drift)."""
    engine = create_async_engine(normalise_database_url(database.url))
    try:
        async with engine.connect() as connection:
            drift = await connection.run_sync(_drift)
    finally:
        await engine.dispose()
    assert drift == []


def test_ids_have_no_database_default() -> None:
    """Every id is made by the application: no column relies on a database function."""
    for table in Base.metadata.sorted_tables:
        for column in table.columns:
            assert column.server_default is None, f"{table.name}.{column.name}"


@pytest.mark.backends("postgres")
async def test_migrations_need_no_extension(backend: str, postgres_server: PostgresServer) -> None:
    """The startup incident: a role that may not create extensions migrates and serves anyway."""
    role, database = unique_name("cs_role"), unique_name("cs_noext")
    password = "role-password-1"
    await postgres_server.execute(
        f"CREATE ROLE {role} LOGIN PASSWORD '{password}' NOSUPERUSER NOCREATEDB NOCREATEROLE"
    )
    await postgres_server.create_database(database)
    try:
        # The role may create tables in public, but has no CREATE on the database, so it
        # cannot create even a trusted extension (and uuid-ossp is not installed at all).
        await postgres_server.execute(
            f"GRANT USAGE, CREATE ON SCHEMA public TO {role}", database=database
        )
        url = postgres_server.url(database, user=role, password=password)
        as_role = await asyncpg.connect(dsn=url, timeout=10)
        try:
            with pytest.raises(asyncpg.PostgresError):
                await as_role.execute('CREATE EXTENSION IF NOT EXISTS "uuid-ossp"')
        finally:
            await as_role.close()

        engine = create_async_engine(normalise_database_url(url))
        try:
            await migrations.upgrade(engine)
            assert await migrations.current_revision(engine) == migrations.head_revision()
        finally:
            await engine.dispose()
        assert await _tables(url) == TABLES
        extensions = await postgres_server.fetchval(
            "SELECT count(*) FROM pg_extension WHERE extname <> 'plpgsql'", database=database
        )
        assert extensions == 0
    finally:
        await postgres_server.drop_database(database)
        await postgres_server.execute(f"DROP ROLE IF EXISTS {role}")


async def test_0003_keeps_every_row_and_guards_its_downgrade(empty_database: TestDatabase) -> None:
    """Making users.email nullable rebuilds ``users`` on SQLite: the rows that point at users
    (which cascade on delete) all survive, the email stays unique, several users may have no
    email, and the downgrade refuses while such users exist instead of deleting them."""
    users, api_keys, identities = (
        Base.metadata.tables[name] for name in ("users", "api_keys", "identities")
    )
    now = datetime.now(UTC)
    user_id = uuid.uuid4()
    engine = create_async_engine(normalise_database_url(empty_database.url))
    try:
        await migrations.upgrade(engine, "0002")
        # users as revision 0002 has it (the model has grown columns since).
        users_0002 = sa_table(
            "users",
            sa_column("id", Uuid()),
            sa_column("email", String()),
            sa_column("password_hash", String()),
            sa_column("created_at", DateTime(timezone=True)),
        )
        async with engine.begin() as connection:
            await connection.execute(
                insert(users_0002).values(
                    id=user_id, email="kept@example.test", password_hash="h", created_at=now
                )
            )
            await connection.execute(
                insert(api_keys).values(
                    id=uuid.uuid4(),
                    user_id=user_id,
                    name="k",
                    prefix="0123456789ab",
                    key_hash="x",
                    created_at=now,
                )
            )
            await connection.execute(
                insert(identities).values(
                    id=uuid.uuid4(), user_id=user_id, provider="p", subject="s", created_at=now
                )
            )
        await migrations.upgrade(engine)

        async with engine.begin() as connection:
            for table in (users, api_keys, identities):
                assert await connection.scalar(select(func.count()).select_from(table)) == 1
            for _ in range(2):
                await connection.execute(
                    insert(users).values(id=uuid.uuid4(), email=None, created_at=now)
                )
        with pytest.raises(IntegrityError):
            async with engine.begin() as connection:
                await connection.execute(
                    insert(users).values(id=uuid.uuid4(), email="kept@example.test", created_at=now)
                )

        await migrations.downgrade(engine, "0003")  # the revisions after it first
        with pytest.raises(CommandError, match="2 user"):
            await migrations.downgrade(engine, "0002")
        assert await migrations.current_revision(engine) == "0003"
        async with engine.begin() as connection:
            await connection.execute(delete(users).where(users.c.email.is_(None)))
        await migrations.downgrade(engine, "0002")
        assert await migrations.current_revision(engine) == "0002"
        async with engine.begin() as connection:
            for table in (users, api_keys, identities):
                assert await connection.scalar(select(func.count()).select_from(table)) == 1
    finally:
        await engine.dispose()


def _message(text: str) -> dict[str, Any]:
    """A model message as pydantic-ai stores it (enough of one for the migration)."""
    return {"kind": "request", "parts": [{"part_kind": "user-prompt", "content": text}]}


async def test_0005_moves_histories_to_rows_and_back(empty_database: TestDatabase) -> None:
    """Each session's history becomes its model messages, stored once: the newest succeeded
    run's history, then what a run still going adds; older and failed runs' copies go. The
    downgrade gives every run with a checkpoint its whole history back."""
    users, agents, sessions = (
        Base.metadata.tables[name] for name in ("users", "agents", "sessions")
    )
    runs_0004 = sa_table(
        "runs",
        sa_column("id", Uuid()),
        sa_column("session_id", Uuid()),
        sa_column("status", String()),
        sa_column("attempt", Integer()),
        sa_column("history", JSON()),
        sa_column("last_seq", Integer()),
        sa_column("checkpoint_seq", Integer()),
        sa_column("created_at", DateTime(timezone=True)),
        sa_column("updated_at", DateTime(timezone=True)),
    )
    runs_0005 = sa_table("runs", sa_column("id", Uuid()), sa_column("history_seq", Integer()))
    runs_back = sa_table("runs", sa_column("id", Uuid()), sa_column("history", JSON()))
    model_messages = Base.metadata.tables["model_messages"]
    now = datetime.now(UTC)
    user_id, agent_id, session_id, other_session = (uuid.uuid4() for _ in range(4))
    a, b, c, d = (_message(text) for text in "abcd")
    old, newest, failed, waiting = (uuid.uuid4() for _ in range(4))
    engine = create_async_engine(normalise_database_url(empty_database.url))
    try:
        await migrations.upgrade(engine, "0004")
        async with engine.begin() as connection:
            await connection.execute(
                insert(users).values(id=user_id, email="m@x.test", created_at=now)
            )
            await connection.execute(
                insert(agents).values(
                    id=agent_id,
                    owner_id=None,
                    name="a",
                    model="demo",
                    instructions="",
                    tools=[],
                    is_default=True,
                    created_at=now,
                    updated_at=now,
                )
            )
            for sid in (session_id, other_session):
                await connection.execute(
                    insert(sessions).values(
                        id=sid,
                        owner_id=user_id,
                        agent_id=agent_id,
                        title="t",
                        status="active",
                        created_at=now,
                        updated_at=now,
                    )
                )
            for number, (run_id, sid, status, history) in enumerate(
                [
                    (old, session_id, "succeeded", [a]),
                    (newest, session_id, "succeeded", [a, b]),
                    (failed, session_id, "failed", [a, b, d]),
                    (waiting, session_id, "awaiting_approval", [a, b, c]),
                    (uuid.uuid4(), other_session, "queued", None),
                ]
            ):
                await connection.execute(
                    insert(runs_0004).values(
                        id=run_id,
                        session_id=sid,
                        status=status,
                        attempt=1,
                        history=history,
                        last_seq=0,
                        checkpoint_seq=0,
                        created_at=now.replace(microsecond=number),
                        updated_at=now,
                    )
                )
        await migrations.upgrade(engine)

        async with engine.begin() as connection:
            rows = (
                await connection.execute(
                    select(
                        model_messages.c.session_id,
                        model_messages.c.seq,
                        model_messages.c.run_id,
                        model_messages.c.data,
                    ).order_by(model_messages.c.session_id, model_messages.c.seq)
                )
            ).all()
            assert [(row.session_id, row.seq, row.run_id, row.data) for row in rows] == [
                (session_id, 1, newest, a),
                (session_id, 2, newest, b),
                (session_id, 3, waiting, c),
            ]
            seqs = dict((await connection.execute(select(runs_0005))).all())
            assert seqs[newest] == 2
            assert seqs[waiting] == 3
            assert seqs[old] is None
            assert seqs[failed] is None

        await migrations.downgrade(engine, "0004")
        async with engine.begin() as connection:
            histories = dict((await connection.execute(select(runs_back))).all())
            assert histories[newest] == [a, b]
            assert histories[waiting] == [a, b, c]
            assert histories[failed] is None
    finally:
        await engine.dispose()


async def test_0006_adds_approval_fields_and_puts_edits_back_on_downgrade(
    empty_database: TestDatabase,
) -> None:
    """Existing approvals get ``asked_because`` = "policy ask" and no ``decided_arguments``;
    the downgrade puts edited arguments back into ``arguments``, where 0005 kept them."""
    users, agents, sessions = (
        Base.metadata.tables[name] for name in ("users", "agents", "sessions")
    )
    runs = sa_table(  # as 0005 left it (later revisions add columns)
        "runs",
        *(
            sa_column(name, type_)
            for name, type_ in (
                ("id", Uuid()),
                ("session_id", Uuid()),
                ("status", String()),
                ("attempt", Integer()),
                ("retries", Integer()),
                ("last_seq", Integer()),
                ("checkpoint_seq", Integer()),
                ("created_at", DateTime(timezone=True)),
                ("updated_at", DateTime(timezone=True)),
            )
        ),
    )
    approvals_0005 = sa_table(
        "approvals",
        sa_column("id", Uuid()),
        sa_column("run_id", Uuid()),
        sa_column("session_id", Uuid()),
        sa_column("tool_call_id", String()),
        sa_column("tool", String()),
        sa_column("arguments", JSON()),
        sa_column("status", String()),
        sa_column("expires_at", DateTime(timezone=True)),
        sa_column("created_at", DateTime(timezone=True)),
    )
    approvals = Base.metadata.tables["approvals"]
    now = datetime.now(UTC)
    user_id, agent_id, session_id, run_id = (uuid.uuid4() for _ in range(4))
    kept, edited = uuid.uuid4(), uuid.uuid4()
    engine = create_async_engine(normalise_database_url(empty_database.url))
    try:
        await migrations.upgrade(engine, "0005")
        async with engine.begin() as connection:
            await connection.execute(
                insert(users).values(id=user_id, email="m@x.test", created_at=now)
            )
            await connection.execute(
                insert(agents).values(
                    id=agent_id,
                    owner_id=None,
                    name="a",
                    model="demo",
                    instructions="",
                    tools=[],
                    is_default=True,
                    created_at=now,
                    updated_at=now,
                )
            )
            await connection.execute(
                insert(sessions).values(
                    id=session_id,
                    owner_id=user_id,
                    agent_id=agent_id,
                    title="t",
                    status="active",
                    created_at=now,
                    updated_at=now,
                )
            )
            await connection.execute(
                insert(runs).values(
                    id=run_id,
                    session_id=session_id,
                    status="awaiting_approval",
                    attempt=1,
                    retries=0,
                    last_seq=0,
                    checkpoint_seq=0,
                    created_at=now,
                    updated_at=now,
                )
            )
            for approval_id in (kept, edited):
                await connection.execute(
                    insert(approvals_0005).values(
                        id=approval_id,
                        run_id=run_id,
                        session_id=session_id,
                        tool_call_id=str(approval_id),
                        tool="write_file",
                        arguments={"path": "proposed.txt"},
                        status="pending",
                        expires_at=now,
                        created_at=now,
                    )
                )
        await migrations.upgrade(engine)
        async with engine.begin() as connection:
            rows = (
                await connection.execute(
                    select(approvals.c.asked_because, approvals.c.decided_arguments)
                )
            ).all()
            assert [tuple(row) for row in rows] == [("policy ask", None)] * 2
            await connection.execute(
                update(approvals)
                .where(approvals.c.id == edited)
                .values(status="approved", decided_arguments={"path": "edited.txt"})
            )
        await migrations.downgrade(engine, "0005")
        async with engine.begin() as connection:
            back = dict(
                (
                    await connection.execute(
                        select(approvals_0005.c.id, approvals_0005.c.arguments)
                    )
                ).all()
            )
            assert back == {kept: {"path": "proposed.txt"}, edited: {"path": "edited.txt"}}
    finally:
        await engine.dispose()
