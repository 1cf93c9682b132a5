"""Idempotency-Key on POST /sessions: a retry returns the first result, and only one is made."""

from __future__ import annotations

import asyncio
import uuid

import httpx

from tests.api.test_errors import MakeAccount, assert_error
from tests.conftest import Account


async def session_ids(client: httpx.AsyncClient, account: Account) -> list[str]:
    """Every session id the account can list (all pages)."""
    ids: list[str] = []
    params: dict[str, str | int] = {"limit": 100}
    while True:
        page = (await client.get("/api/v1/sessions", params=params, headers=account.headers)).json()
        ids.extend(item["id"] for item in page["items"])
        if page["next_cursor"] is None:
            return ids
        params["cursor"] = page["next_cursor"]


def with_key(account: Account, key: str) -> dict[str, str]:
    """The account's headers plus an Idempotency-Key."""
    return {**account.headers, "Idempotency-Key": key}


async def test_a_retry_with_the_same_key_and_body_returns_the_first_response(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """The same key and body answer the same status and bytes, and only one session exists."""
    account = await make_account()
    key = str(uuid.uuid4())
    first = await client.post(
        "/api/v1/sessions", json={"title": "once"}, headers=with_key(account, key)
    )
    again = await client.post(
        "/api/v1/sessions", json={"title": "once"}, headers=with_key(account, key)
    )
    assert first.status_code == 201, first.text
    assert again.status_code == first.status_code
    assert again.json() == first.json()
    assert again.content == first.content
    assert await session_ids(client, account) == [first.json()["id"]]


async def test_the_same_body_written_differently_is_the_same_request(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """Key order and spacing in the JSON do not make a retry a different request."""
    account = await make_account()
    key = "order-insensitive"
    headers = {**with_key(account, key), "Content-Type": "application/json"}
    first = await client.post(
        "/api/v1/sessions", content=b'{"title": "t", "agent_id": null}', headers=headers
    )
    again = await client.post(
        "/api/v1/sessions", content=b'{ "agent_id":null,"title":"t" }', headers=headers
    )
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert len(await session_ids(client, account)) == 1


async def test_the_same_key_with_another_body_is_422(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """Reusing a key with a different body is 422 and creates nothing more."""
    account = await make_account()
    key = "reused-key"
    first = await client.post(
        "/api/v1/sessions", json={"title": "first"}, headers=with_key(account, key)
    )
    assert first.status_code == 201
    other = await client.post(
        "/api/v1/sessions", json={"title": "second"}, headers=with_key(account, key)
    )
    assert_error(other, 422, "idempotency_key_reused")
    assert await session_ids(client, account) == [first.json()["id"]]


async def test_a_replay_answers_the_first_response_even_after_an_edit(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """A retry after the session was renamed still answers the stored first response."""
    account = await make_account()
    first = await client.post(
        "/api/v1/sessions", json={"title": "original"}, headers=with_key(account, "edit-later")
    )
    await client.patch(
        f"/api/v1/sessions/{first.json()['id']}", json={"title": "renamed"}, headers=account.headers
    )
    again = await client.post(
        "/api/v1/sessions", json={"title": "original"}, headers=with_key(account, "edit-later")
    )
    assert again.status_code == 201
    assert again.json() == first.json()


async def test_different_users_may_use_the_same_key(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """Two users sending the same key and body each get a session of their own."""
    alice, bob = await make_account(), await make_account()
    key = "shared-key"
    for_alice = await client.post("/api/v1/sessions", json={}, headers=with_key(alice, key))
    for_bob = await client.post("/api/v1/sessions", json={}, headers=with_key(bob, key))
    assert for_alice.status_code == for_bob.status_code == 201
    assert for_alice.json()["id"] != for_bob.json()["id"]
    assert await session_ids(client, alice) == [for_alice.json()["id"]]
    assert await session_ids(client, bob) == [for_bob.json()["id"]]
    bob_other_body = await client.post(
        "/api/v1/sessions", json={"title": "bob"}, headers=with_key(bob, key)
    )
    assert_error(bob_other_body, 422, "idempotency_key_reused")


async def test_without_a_key_every_post_creates_a_session(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """Two identical posts without a key make two sessions (the key is what dedupes)."""
    account = await make_account()
    one = await client.post("/api/v1/sessions", json={"title": "t"}, headers=account.headers)
    two = await client.post("/api/v1/sessions", json={"title": "t"}, headers=account.headers)
    assert one.json()["id"] != two.json()["id"]
    assert len(await session_ids(client, account)) == 2


async def test_a_failed_request_does_not_use_up_its_key(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """A request that failed (unknown agent) stores nothing, so its key works for a fixed body."""
    account = await make_account()
    key = "after-failure"
    failed = await client.post(
        "/api/v1/sessions", json={"agent_id": str(uuid.uuid4())}, headers=with_key(account, key)
    )
    assert_error(failed, 404, "not_found")
    fixed = await client.post("/api/v1/sessions", json={}, headers=with_key(account, key))
    assert fixed.status_code == 201, fixed.text
    assert await session_ids(client, account) == [fixed.json()["id"]]


async def test_concurrent_requests_with_one_key_make_one_session(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """Ten simultaneous posts with one key all answer 201 with the same body; one session exists."""
    account = await make_account()
    key = str(uuid.uuid4())
    responses = await asyncio.wait_for(
        asyncio.gather(
            *(
                client.post(
                    "/api/v1/sessions", json={"title": "race"}, headers=with_key(account, key)
                )
                for _ in range(10)
            )
        ),
        timeout=60,
    )
    assert [response.status_code for response in responses] == [201] * 10, [
        response.text for response in responses
    ]
    bodies = {response.content for response in responses}
    assert len(bodies) == 1, bodies
    assert await session_ids(client, account) == [responses[0].json()["id"]]


async def test_concurrent_requests_with_one_key_and_different_bodies(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """Racing posts with one key and different bodies: one wins, the others are 422 or replays."""
    account = await make_account()
    key = str(uuid.uuid4())
    responses = await asyncio.wait_for(
        asyncio.gather(
            *(
                client.post(
                    "/api/v1/sessions", json={"title": f"t{n}"}, headers=with_key(account, key)
                )
                for n in range(6)
            )
        ),
        timeout=60,
    )
    created = [response for response in responses if response.status_code == 201]
    refused = [response for response in responses if response.status_code != 201]
    assert len({response.content for response in created}) == 1
    for response in refused:
        assert_error(response, 422, "idempotency_key_reused")
    assert len(created) == 1
    assert await session_ids(client, account) == [created[0].json()["id"]]


async def test_key_length_limits(client: httpx.AsyncClient, make_account: MakeAccount) -> None:
    """A 255-character key is accepted; 256 characters is 422 and creates nothing."""
    account = await make_account()
    too_long = await client.post("/api/v1/sessions", json={}, headers=with_key(account, "k" * 256))
    assert_error(too_long, 422, "invalid_input")
    assert await session_ids(client, account) == []
    longest = await client.post("/api/v1/sessions", json={}, headers=with_key(account, "k" * 255))
    assert longest.status_code == 201, longest.text
    again = await client.post("/api/v1/sessions", json={}, headers=with_key(account, "k" * 255))
    assert again.json() == longest.json()
