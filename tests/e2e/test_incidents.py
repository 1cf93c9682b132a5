"""The stale-object incident, replayed through the real ASGI app on both databases.

create a session → 404 for an unknown session's pending approvals → keep working on the
created session. Once alone, then as 100 interleaved flows at the same time.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import httpx

from countersign.domain.models import UserId
from countersign.services import ServiceDeps
from countersign.services.sessions import list_sessions

API = "/api/v1"


async def _flow(client: httpx.AsyncClient, headers: dict[str, str], n: int) -> list[int]:
    statuses: list[int] = []
    created = await client.post(f"{API}/sessions", json={"title": f"flow {n}"}, headers=headers)
    statuses.append(created.status_code)
    assert created.status_code == 201, created.text
    session_id = created.json()["id"]

    missing = await client.get(f"{API}/sessions/{uuid.uuid4()}/pending-approvals", headers=headers)
    statuses.append(missing.status_code)
    assert missing.status_code == 404

    for response in (
        await client.get(f"{API}/sessions/{session_id}/pending-approvals", headers=headers),
        await client.patch(
            f"{API}/sessions/{session_id}", json={"title": f"flow {n} renamed"}, headers=headers
        ),
        await client.get(f"{API}/sessions/{session_id}", headers=headers),
        await client.get(f"{API}/sessions/{session_id}/messages", headers=headers),
    ):
        statuses.append(response.status_code)
        assert response.status_code == 200, response.text
    assert (await client.get(f"{API}/sessions/{session_id}", headers=headers)).json()[
        "title"
    ] == f"flow {n} renamed"
    return statuses


async def test_seed_000_sequence(client: httpx.AsyncClient, make_account) -> None:  # type: ignore[no-untyped-def]
    """After a 404 on an unknown session, the created session is intact and usable."""
    account = await make_account()
    statuses = await _flow(client, account.headers, 0)
    assert statuses == [201, 404, 200, 200, 200, 200]


async def test_100_interleaved_flows(
    client: httpx.AsyncClient,
    make_account,
    services: ServiceDeps,  # type: ignore[no-untyped-def]
) -> None:
    """100 concurrent create/404/work flows: zero 5xx and every session row present."""
    accounts = [await make_account() for _ in range(10)]
    results = await asyncio.wait_for(
        asyncio.gather(
            *(_flow(client, accounts[n % 10].headers, n) for n in range(100)),
            return_exceptions=True,
        ),
        timeout=90,
    )
    failures = [result for result in results if isinstance(result, BaseException)]
    assert failures == []
    statuses = Counter(code for result in results if isinstance(result, list) for code in result)
    assert statuses == {201: 100, 404: 100, 200: 400}

    for account in accounts:
        page = await list_sessions(services, actor=UserId(account.user.id), cursor=None, limit=100)
        assert len(page.items) == 10
        assert all(session.title.endswith("renamed") for session in page.items)
