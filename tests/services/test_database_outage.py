"""The database goes away under load and comes back: the server answers 503 meanwhile and
then goes on by itself — no restart, no run left queued or running for good.

The outage is real: a PostgreSQL of the test's own is stopped with a fast shutdown (what
``pg_ctl stop -m fast`` does: open connections are cut, new ones are refused with "the
database system is shutting down") while turns are in flight, and started again on the same
address. On SQLite the file is made read-only (immutable, so that not even root writes it)
and then writable again.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from countersign.app import create_app
from countersign.services import ServiceDeps
from countersign.services.accounts import create_api_key, create_user
from tests.conftest import make_settings
from tests.services.test_runs import wait_until
from tests.support import postgres
from tests.support.databases import TestDatabase, migrate

WAIT = 60.0
ENDED = ("succeeded", "failed", "cancelled")


class Load:
    """Sessions that keep sending demo messages; records every answer's status."""

    def __init__(self, client: httpx.AsyncClient, headers: dict[str, str]) -> None:
        self.client = client
        self.headers = headers
        self.statuses: list[int] = []
        self.runs: list[tuple[str, str]] = []
        self.stopping = False

    async def session(self) -> None:
        session_id: str | None = None
        while not self.stopping:
            try:
                if session_id is None:
                    created = await self.client.post(
                        "/api/v1/sessions", json={}, headers=self.headers
                    )
                    self.statuses.append(created.status_code)
                    if created.status_code == 201:
                        session_id = created.json()["id"]
                    continue
                sent = await self.client.post(
                    f"/api/v1/sessions/{session_id}/messages",
                    json={"content": "a few words to stream back"},
                    headers=self.headers,
                )
                self.statuses.append(sent.status_code)
                if sent.status_code == 202:
                    self.runs.append((session_id, sent.json()["run"]["id"]))
            finally:
                await asyncio.sleep(0.05)


async def run_status(
    client: httpx.AsyncClient, headers: dict[str, str], ids: tuple[str, str]
) -> Any:
    session_id, run_id = ids
    answer = await client.get(f"/api/v1/sessions/{session_id}/runs/{run_id}", headers=headers)
    assert answer.status_code == 200, answer.text
    return answer.json()


OUTAGE_SECONDS = 20.0


@pytest.mark.backends("postgres")
async def test_postgres_stopped_for_20_s_under_load_needs_no_restart(
    backend: str, own_postgres: postgres.PostgresServer, tmp_path: Path
) -> None:
    """Every request 503 with Retry-After (reads too: nothing answers), readiness 503 with a
    reason; then everything goes on by itself."""
    await own_postgres.create_database("countersign")
    url = own_postgres.url("countersign")
    await migrate(url)
    await outage_under_load(
        url,
        tmp_path,
        begin=own_postgres.stop,
        end=own_postgres.start,
        reads_answer=False,
    )


@pytest.mark.backends("sqlite")
async def test_a_read_only_sqlite_file_under_load_needs_no_restart(
    database: TestDatabase, tmp_path: Path
) -> None:
    """The database file, its WAL and its folder made read-only for the outage (``chattr
    +i``: even root cannot write them): writes 503 with Retry-After, reads still answer,
    readiness 503 saying the file cannot be written; then everything goes on.

    The shared-memory file stays writable: it is mapped into the process, and a write to a
    mapped page of an immutable file is a SIGBUS that would end the test run, not a
    database error (a file system remounted read-only refuses the remount instead)."""
    if shutil.which("chattr") is None and not os.environ.get("CI"):
        pytest.skip("chattr (e2fsprogs) is not installed")
    path = Path(database.url.split(":///", 1)[1])
    files = [path, path.with_name(f"{path.name}-wal")]

    def immutable(flag: str) -> None:
        # The folder too: no new WAL or shared-memory file can be made in it meanwhile.
        present = [str(file) for file in [*files, path.parent] if file.exists()]
        subprocess.run(["chattr", flag, *present], check=True, capture_output=True)

    refused = cannot_make_immutable(tmp_path / "probe")
    if refused is not None:
        if os.environ.get("CI"):
            pytest.fail(refused)
        pytest.skip(refused)
    try:
        await outage_under_load(
            database.url,
            tmp_path,
            begin=partial(immutable, "+i"),
            end=partial(immutable, "-i"),
            reads_answer=True,
        )
    finally:
        immutable("-i")


def cannot_make_immutable(probe: Path) -> str | None:
    """Why files cannot be made immutable here (another file system, no CAP_LINUX_IMMUTABLE)."""
    probe.touch()
    try:
        subprocess.run(["chattr", "+i", str(probe)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as error:
        return f"this file system or user cannot make files immutable: {error}"
    subprocess.run(["chattr", "-i", str(probe)], check=True)
    return None


async def outage_under_load(
    url: str,
    tmp_path: Path,
    *,
    begin: Callable[[], None],
    end: Callable[[], None],
    reads_answer: bool,
) -> None:
    """Four sessions keep sending while the database is away for OUTAGE_SECONDS: no 500,
    no hang, readiness 503 with a reason, and afterwards every run ends by itself, no stored
    message is lost, new turns complete and every background loop is alive."""
    settings = make_settings(
        url,
        workspace_root=tmp_path / "ws",
        executor_poll_seconds=0.2,
        run_lease_seconds=2,
        db_pool_timeout=2,
        db_connect_timeout=2,
        sqlite_busy_timeout_ms=1000,
    )
    app = create_app(settings)
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30):
        services: ServiceDeps = app.state.services
        await create_user(services, email="outage@example.test", password="correct horse battery")
        _key, secret = await create_api_key(services, email="outage@example.test", name="t")
        headers = {"Authorization": f"Bearer {secret}"}
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cs.test") as client:
            load = Load(client, headers)
            sessions = [asyncio.create_task(load.session()) for _ in range(4)]
            await wait_until(
                lambda: asyncio.sleep(0, len(load.runs) >= 8), what="8 runs", within=WAIT
            )
            stored_before = await stored_messages(client, headers, load.runs)
            assert stored_before, "no run finished before the outage"

            await asyncio.to_thread(begin)
            outage_started = time.monotonic()
            reasons: set[str] = set()
            during: list[httpx.Response] = []
            async with asyncio.timeout(WAIT + OUTAGE_SECONDS):
                while time.monotonic() - outage_started < OUTAGE_SECONDS:
                    started = time.monotonic()
                    ready = await client.get("/health/ready")
                    if ready.status_code == 503:
                        reasons.add(ready.json()["error"]["message"])
                    during.append(await client.get("/api/v1/sessions", headers=headers))
                    during.append(await client.post("/api/v1/sessions", json={}, headers=headers))
                    # Never a hang past the pool, connect and busy timeouts.
                    assert time.monotonic() - started < 10
                    await asyncio.sleep(0.2)
            await asyncio.to_thread(end)
            assert reasons, "readiness never answered 503 during the outage"
            for answer in during:
                if reads_answer and answer.request.method == "GET":
                    assert answer.status_code == 200, answer.text
                    continue
                assert answer.status_code == 503, answer.text
                assert answer.json()["error"]["code"] == "unavailable"
                assert answer.headers["Retry-After"]

            # Ready again without a restart, once the executor claims again.
            async def ready() -> bool:
                return (await client.get("/health/ready")).status_code == 200

            await wait_until(ready, what="readiness", within=WAIT, every=0.1)
            load.stopping = True
            async with asyncio.timeout(WAIT):
                await asyncio.gather(*sessions)

            assert 500 not in load.statuses, load.statuses
            assert set(load.statuses) <= {201, 202, 409, 503}, set(load.statuses)

            # Every run, in flight during the outage or sent around it, ends by itself.
            async def all_ended() -> list[Any] | None:
                runs = [await run_status(client, headers, ids) for ids in load.runs]
                return runs if all(run["status"] in ENDED for run in runs) else None

            runs = await wait_until(all_ended, what="every run to end", within=WAIT, every=0.2)
            for run in runs:
                if run["status"] == "failed":
                    assert run["error"], run
                    assert "SQL" not in run["error"], run
            assert sum(run["status"] == "succeeded" for run in runs) >= 8
            # Nothing that was stored before is lost.
            stored_after = await stored_messages(client, headers, load.runs)
            assert {key: stored_after.get(key) for key in stored_before} == stored_before

            # And new turns complete.
            created = await client.post("/api/v1/sessions", json={}, headers=headers)
            assert created.status_code == 201, created.text
            session_id = created.json()["id"]
            sent = await client.post(
                f"/api/v1/sessions/{session_id}/messages",
                json={"content": "after the outage"},
                headers=headers,
            )
            assert sent.status_code == 202, sent.text
            ids = (session_id, sent.json()["run"]["id"])

            async def succeeded() -> bool:
                return bool((await run_status(client, headers, ids))["status"] == "succeeded")

            await wait_until(succeeded, what="the new run", within=WAIT, every=0.1)
            messages = await client.get(f"/api/v1/sessions/{session_id}/messages", headers=headers)
            assert messages.json()["items"][-1]["content"] == "You said: after the outage"
            assert app.state.supervisor.problems() == []


async def stored_messages(
    client: httpx.AsyncClient, headers: dict[str, str], runs: list[tuple[str, str]]
) -> dict[str, str]:
    """The stored message ids and contents of these runs' sessions."""
    stored: dict[str, str] = {}
    for session_id in {session for session, _run in runs}:
        answer = await client.get(f"/api/v1/sessions/{session_id}/messages", headers=headers)
        assert answer.status_code == 200, answer.text
        stored.update({item["id"]: item["content"] for item in answer.json()["items"]})
    return stored
