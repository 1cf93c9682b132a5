"""``/api-keys``: the key is shown once, lists never show secrets, deleted keys stop working,
and another user's key answers like a missing one."""

from __future__ import annotations

import uuid
from datetime import datetime

import httpx
import pytest

from countersign.security import api_key_prefix
from tests.api.test_auth import PASSWORD, cookie_login, new_email, register
from tests.api.test_errors import MakeAccount, assert_error
from tests.conftest import Account

KEY_FIELDS = {"id", "name", "prefix", "created_at", "last_used_at"}


async def create_key(client: httpx.AsyncClient, account: Account, name: str) -> dict[str, str]:
    response = await client.post("/api/v1/api-keys", json={"name": name}, headers=account.headers)
    assert response.status_code == 201, response.text
    body: dict[str, str] = response.json()
    return body


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_a_new_key_is_shown_once_and_works(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    account = await make_account()
    response = await client.post(
        "/api/v1/api-keys", json={"name": "  deploy bot  "}, headers=account.headers
    )
    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"
    key = response.json()
    assert set(key) == {"id", "name", "prefix", "key", "created_at"}
    assert key["name"] == "deploy bot"
    assert key["key"].startswith(f"cs_{key['prefix']}_")
    assert api_key_prefix(key["key"]) == key["prefix"]
    assert datetime.fromisoformat(key["created_at"]).tzinfo is not None

    me = await client.get("/api/v1/me", headers=bearer(key["key"]))
    assert me.status_code == 200
    assert me.json()["id"] == str(account.user.id)

    listed = await client.get("/api/v1/api-keys", headers=account.headers)
    assert listed.status_code == 200
    for item in listed.json()["items"]:
        assert set(item) == KEY_FIELDS
    assert key["key"] not in listed.text
    mine = next(item for item in listed.json()["items"] if item["id"] == key["id"])
    assert mine["prefix"] == key["prefix"]
    assert mine["last_used_at"] is not None  # it was just used for /me


async def test_keys_list_newest_first_by_cursor_and_only_your_own(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    account, other = await make_account(), await make_account()
    made = [await create_key(client, account, f"k{n}") for n in range(3)]
    await create_key(client, other, "not yours")

    seen: list[str] = []
    cursor: str | None = None
    while True:
        params: dict[str, str | int] = {"limit": 2}
        if cursor is not None:
            params["cursor"] = cursor
        page = await client.get("/api/v1/api-keys", params=params, headers=account.headers)
        assert page.status_code == 200, page.text
        body = page.json()
        assert set(body) == {"items", "next_cursor"}
        seen += [item["name"] for item in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    # make_account's own key ("test") is the oldest.
    assert seen == [key["name"] for key in reversed(made)] + ["test"]

    bad = await client.get("/api/v1/api-keys", params={"cursor": "!!!"}, headers=account.headers)
    assert_error(bad, 422, "invalid_input")


async def test_a_deleted_key_stops_working(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    account = await make_account()
    key = await create_key(client, account, "short-lived")
    assert (await client.get("/api/v1/me", headers=bearer(key["key"]))).status_code == 200

    response = await client.delete(f"/api/v1/api-keys/{key['id']}", headers=account.headers)
    assert response.status_code == 204
    assert response.content == b""
    after = await client.get("/api/v1/me", headers=bearer(key["key"]))
    assert_error(after, 401, "unauthenticated")
    again = await client.delete(f"/api/v1/api-keys/{key['id']}", headers=account.headers)
    assert_error(again, 404, "not_found")
    listed = await client.get("/api/v1/api-keys", headers=account.headers)
    assert key["id"] not in [item["id"] for item in listed.json()["items"]]


async def test_a_key_can_delete_itself(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    account = await make_account()
    key = await create_key(client, account, "self")
    response = await client.delete(f"/api/v1/api-keys/{key['id']}", headers=bearer(key["key"]))
    assert response.status_code == 204
    assert_error(await client.get("/api/v1/me", headers=bearer(key["key"])), 401)


async def test_another_users_key_is_not_found_and_survives(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    owner, intruder = await make_account(), await make_account()
    key = await create_key(client, owner, "owner's")
    theirs = await client.delete(f"/api/v1/api-keys/{key['id']}", headers=intruder.headers)
    missing = await client.delete(f"/api/v1/api-keys/{uuid.uuid4()}", headers=intruder.headers)
    assert_error(theirs, 404, "not_found")
    assert_error(missing, 404, "not_found")
    assert theirs.content == missing.content
    assert (await client.get("/api/v1/me", headers=bearer(key["key"]))).status_code == 200


@pytest.mark.parametrize(
    "body",
    [{}, {"name": ""}, {"name": "   "}, {"name": "x" * 101}, {"name": 5}, {"name": "a", "x": 1}],
)
async def test_bad_key_names_are_422(
    client: httpx.AsyncClient, make_account: MakeAccount, body: object
) -> None:
    account = await make_account()
    response = await client.post("/api/v1/api-keys", json=body, headers=account.headers)
    assert_error(response, 422, "invalid_input")
    listed = await client.get("/api/v1/api-keys", headers=account.headers)
    assert [item["name"] for item in listed.json()["items"]] == ["test"]


async def test_malformed_key_id_is_422(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    account = await make_account()
    response = await client.delete("/api/v1/api-keys/not-a-uuid", headers=account.headers)
    error = assert_error(response, 422, "invalid_input")
    assert error["detail"][0]["field"] == "path.key_id"


async def test_keys_by_cookie_need_the_csrf_token(client: httpx.AsyncClient) -> None:
    """The web page makes and deletes keys with its cookie, and only with the CSRF header."""
    email = new_email()
    await register(client, email)
    login = await cookie_login(client, email)
    forged = await client.post("/api/v1/api-keys", json={"name": "x"}, headers=login.headers())
    assert_error(forged, 403, "csrf_failed")
    listed = await client.get("/api/v1/api-keys", headers=login.headers())
    assert listed.json()["items"] == []

    made = await client.post(
        "/api/v1/api-keys", json={"name": "x"}, headers=login.headers(csrf=login.csrf)
    )
    assert made.status_code == 201, made.text
    key_id = made.json()["id"]
    forged_delete = await client.delete(f"/api/v1/api-keys/{key_id}", headers=login.headers())
    assert_error(forged_delete, 403, "csrf_failed")
    assert (await client.get("/api/v1/me", headers=bearer(made.json()["key"]))).status_code == 200
    assert PASSWORD not in made.text
