"""A first look: the app starts on both databases and serves a session."""

from __future__ import annotations

import httpx


async def test_create_and_read_session(client: httpx.AsyncClient, make_account) -> None:  # type: ignore[no-untyped-def]
    account = await make_account()
    created = await client.post("/api/v1/sessions", json={"title": "x"}, headers=account.headers)
    assert created.status_code == 201, created.text
    got = await client.get(f"/api/v1/sessions/{created.json()['id']}", headers=account.headers)
    assert got.json() == created.json()
