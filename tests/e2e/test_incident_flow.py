"""The stale-object incident's whole flow, over real HTTP (uvicorn on a TCP port), both databases.

create a session → 404 for an unknown session's pending approvals → stream a message whose
tool call needs approval → approve it → the run completes. Once alone, then 100 sessions at
the same time: zero 5xx, and every row present afterwards.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from sqlalchemy import func, select

from countersign.app import create_app
from countersign.config import Settings
from countersign.db.engine import create_engine
from countersign.db.tables import ApprovalRow, MessageRow, RunRow
from countersign.services import ServiceDeps
from tests.api.test_errors import MakeAccount
from tests.api.test_runs import parse_sse
from tests.support.postgres import free_port

API = "/api/v1"
FLOWS = 100


@pytest.fixture
async def live_app(settings: Settings) -> FastAPI:
    """The app (its lifespan is run by the server below)."""
    return create_app(settings)


@pytest.fixture
async def base_url(live_app: FastAPI) -> AsyncIterator[str]:
    """A real uvicorn server for the app on 127.0.0.1, stopped by this fixture."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            live_app,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="on",
            # Longer than any wait in the test, so the server never closes a kept-alive
            # connection just as the client reuses it (a ReadError that is no one's bug).
            timeout_keep_alive=120,
        )
    )
    serving = asyncio.create_task(server.serve())
    async with asyncio.timeout(30):
        while not server.started:
            if serving.done():
                serving.result()
            await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        async with asyncio.timeout(30):
            await serving


@pytest.fixture
def services(live_app: FastAPI, base_url: str) -> ServiceDeps:
    """The live app's services (so that ``make_account`` uses them, not a second app)."""
    del base_url
    deps: ServiceDeps = live_app.state.services
    return deps


async def flow(http: httpx.AsyncClient, headers: dict[str, str], n: int) -> list[int]:
    """One user's whole incident flow; the status of every response, in order."""
    statuses: list[int] = []

    def seen(response: httpx.Response, expected: int) -> httpx.Response:
        statuses.append(response.status_code)
        assert response.status_code == expected, (n, response.request.url, response.text)
        return response

    created = seen(
        await http.post(f"{API}/sessions", json={"title": f"flow {n}"}, headers=headers), 201
    )
    session = f"{API}/sessions/{created.json()['id']}"
    seen(await http.get(f"{API}/sessions/{uuid.uuid4()}/pending-approvals", headers=headers), 404)
    streamed = seen(
        await http.post(
            f"{session}/messages",
            json={"content": f'/tool write_file {{"path": "flow.txt", "content": "flow {n}"}}'},
            headers={**headers, "Accept": "text/event-stream"},
        ),
        200,
    )
    first = parse_sse(streamed.text)
    assert first[-1].event == "approval.required", first
    pending = seen(await http.get(f"{session}/pending-approvals", headers=headers), 200).json()
    assert [item["id"] for item in pending["items"]] == [first[-1].data["approval_id"]]
    seen(
        await http.post(
            f"{session}/approvals/{first[-1].data['approval_id']}",
            json={"decision": "approve"},
            headers=headers,
        ),
        200,
    )
    rest = seen(
        await http.get(
            f"{session}/runs/{first[-1].data['run_id']}/events",
            headers={**headers, "Last-Event-ID": str(first[-1].id)},
        ),
        200,
    )
    after = parse_sse(rest.text)
    assert after[-1].event == "run.finished", after
    assert [event.id for event in [*first, *after]] == list(range(1, len(first) + len(after) + 1))
    messages = seen(await http.get(f"{session}/messages", headers=headers), 200).json()["items"]
    assert [item["role"] for item in messages] == ["user", "assistant"]
    return statuses


EXPECTED = [201, 404, 200, 200, 200, 200, 200]


def written_files(settings: Settings) -> list[str]:
    """The contents of every session workspace's flow.txt, sorted."""
    return sorted(path.read_text() for path in Path(settings.workspace_root).glob("*/flow.txt"))


async def test_the_incident_flow_over_http(
    base_url: str, make_account: MakeAccount, settings: Settings
) -> None:
    """Create → 404 elsewhere → stream → approve → the run completes and the file is written."""
    account = await make_account()
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as http:
        assert await flow(http, account.headers, 0) == EXPECTED
    assert written_files(settings) == ["flow 0"]


async def test_100_sessions_do_it_at_once(
    base_url: str, make_account: MakeAccount, settings: Settings
) -> None:
    """100 concurrent incident flows: zero 5xx, every session's rows present and complete."""
    accounts = [await make_account() for _ in range(10)]
    limits = httpx.Limits(max_connections=FLOWS, max_keepalive_connections=FLOWS)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as http:
        async with asyncio.timeout(240):
            results = await asyncio.gather(
                *(flow(http, accounts[n % 10].headers, n) for n in range(FLOWS)),
                return_exceptions=True,
            )
    failures = [result for result in results if isinstance(result, BaseException)]
    assert failures == []
    statuses = Counter(code for result in results if isinstance(result, list) for code in result)
    assert statuses == Counter({201: FLOWS, 404: FLOWS, 200: 5 * FLOWS})

    engine = create_engine(settings)
    try:
        async with engine.connect() as connection:
            runs = (
                await connection.execute(
                    select(RunRow.status, func.count()).group_by(RunRow.status)
                )
            ).all()
            messages = await connection.scalar(select(func.count()).select_from(MessageRow))
            approvals = (
                await connection.execute(
                    select(ApprovalRow.status, func.count()).group_by(ApprovalRow.status)
                )
            ).all()
    finally:
        await engine.dispose()
    assert dict(runs) == {"succeeded": FLOWS}
    assert messages == 2 * FLOWS
    assert dict(approvals) == {"approved": FLOWS}
    assert written_files(settings) == sorted(f"flow {n}" for n in range(FLOWS))
