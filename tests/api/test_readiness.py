"""/health/ready follows the database for real: a stopped PostgreSQL makes it 503."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from asgi_lifespan import LifespanManager
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from countersign.app import create_app
from countersign.config import normalise_database_url
from tests.conftest import make_settings
from tests.support import postgres
from tests.support.databases import TestDatabase, migrate


@pytest.mark.backends("postgres")
async def test_ready_turns_503_when_postgres_stops(
    backend: str, own_postgres: postgres.PostgresServer
) -> None:
    """Ready → stop the server → 503 with a reason → start it again → ready."""
    await own_postgres.create_database("countersign")
    url = own_postgres.url("countersign")
    await migrate(url)
    app = create_app(make_settings(url))
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cs.test") as client:
            assert (await client.get("/health/ready")).status_code == 200

            own_postgres.stop()
            down = await client.get("/health/ready")
            assert down.status_code == 503
            body = down.json()["error"]
            assert body["code"] == "not_ready"
            assert "cannot be reached" in body["message"]
            assert (await client.get("/health/live")).status_code == 200

            own_postgres.start()
            # Ready again without a restart, once the executor has claimed again (its next
            # poll): until then it says why not.
            async with asyncio.timeout(30):
                while (answer := await client.get("/health/ready")).status_code != 200:
                    assert "executor" in answer.json()["error"]["message"] or (
                        "cannot be reached" in answer.json()["error"]["message"]
                    )
                    await asyncio.sleep(0.05)


async def test_ready_is_503_on_an_unknown_revision(
    backend: str, empty_database: TestDatabase
) -> None:
    """A database stamped with a revision this code does not know is not ready."""
    await migrate(empty_database.url)
    app = create_app(make_settings(empty_database.url))
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cs.test") as client:
            assert (await client.get("/health/ready")).status_code == 200
            # Someone stamps the database with a revision this code does not know.
            engine = create_async_engine(normalise_database_url(empty_database.url))
            async with engine.begin() as connection:
                await connection.execute(text("UPDATE alembic_version SET version_num='ffff'"))
            await engine.dispose()
            response = await client.get("/health/ready")
            assert response.status_code == 503
            assert "ffff" in response.json()["error"]["message"]
