"""The session API over HTTP: create, list by cursor, read, edit, delete, and other users' 404s."""

from __future__ import annotations

import base64
import uuid
from datetime import datetime

import httpx
import pytest

from countersign.services import ServiceDeps
from tests.api.test_errors import MakeAccount, assert_error

SESSION_FIELDS = {"id", "title", "agent_id", "status", "active_run_id", "created_at", "updated_at"}


async def default_agent_id(services: ServiceDeps) -> str:
    """The id of the server's default agent, read from the database."""
    async with services.uow_factory(write=False) as uow:
        agent = await uow.agents.get_default()
    assert agent is not None
    return str(agent.id)


def parse_time(value: str) -> datetime:
    """An ISO 8601 time that must carry a zone."""
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None, value
    return parsed


def cursor_of(text: str) -> str:
    """A cursor built by hand, the way a client might forge one."""
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


async def test_create_session_without_agent_uses_the_default_agent(
    client: httpx.AsyncClient, make_account: MakeAccount, services: ServiceDeps
) -> None:
    """POST /sessions with an empty body is 201 with the default agent, default title, active."""
    account = await make_account()
    response = await client.post("/api/v1/sessions", json={}, headers=account.headers)
    assert response.status_code == 201, response.text
    session = response.json()
    assert set(session) == SESSION_FIELDS
    assert session["agent_id"] == await default_agent_id(services)
    assert session["title"] == "New session"
    assert session["status"] == "active"
    assert uuid.UUID(session["id"]).version == 7
    assert parse_time(session["created_at"]) == parse_time(session["updated_at"])


async def test_create_session_with_title_and_explicit_default_agent(
    client: httpx.AsyncClient, make_account: MakeAccount, services: ServiceDeps
) -> None:
    """A title is kept (trimmed) and an explicit agent_id of a usable agent is accepted."""
    account = await make_account()
    agent_id = await default_agent_id(services)
    response = await client.post(
        "/api/v1/sessions",
        json={"title": "  Quarterly report  ", "agent_id": agent_id},
        headers=account.headers,
    )
    assert response.status_code == 201, response.text
    assert response.json()["title"] == "Quarterly report"
    assert response.json()["agent_id"] == agent_id
    stored = await client.get(f"/api/v1/sessions/{response.json()['id']}", headers=account.headers)
    assert stored.json() == response.json()


async def test_create_session_with_unknown_agent_is_404_and_creates_nothing(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """An agent_id nobody has is 404 in the envelope, and no session appears."""
    account = await make_account()
    response = await client.post(
        "/api/v1/sessions", json={"agent_id": str(uuid.uuid4())}, headers=account.headers
    )
    error = assert_error(response, 404, "not_found")
    assert "agent" in error["message"]
    listed = await client.get("/api/v1/sessions", headers=account.headers)
    assert listed.json() == {"items": [], "next_cursor": None}


async def test_list_pages_through_every_session_once_newest_first(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """25 sessions read with limit=10 come as 10, 10, 5, each once, newest first, then null."""
    account = await make_account()
    created = []
    for number in range(25):
        response = await client.post(
            "/api/v1/sessions", json={"title": f"s{number}"}, headers=account.headers
        )
        created.append(response.json()["id"])
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        params: dict[str, str | int] = {"limit": 10}
        if cursor is not None:
            params["cursor"] = cursor
        response = await client.get("/api/v1/sessions", params=params, headers=account.headers)
        assert response.status_code == 200, response.text
        page = response.json()
        assert set(page) == {"items", "next_cursor"}
        pages.append([item["id"] for item in page["items"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert len(pages) < 10, "the cursor never ended"
    assert [len(page) for page in pages] == [10, 10, 5]
    seen = [session_id for page in pages for session_id in page]
    assert seen == list(reversed(created))
    assert len(set(seen)) == 25


async def test_a_full_last_page_has_no_cursor(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """When the sessions fill the last page exactly, next_cursor is null: no empty extra page."""
    account = await make_account()
    for _ in range(4):
        await client.post("/api/v1/sessions", json={}, headers=account.headers)
    first = (await client.get("/api/v1/sessions?limit=2", headers=account.headers)).json()
    assert first["next_cursor"] is not None
    second = await client.get(
        "/api/v1/sessions",
        params={"limit": 2, "cursor": first["next_cursor"]},
        headers=account.headers,
    )
    assert len(second.json()["items"]) == 2
    assert second.json()["next_cursor"] is None


async def test_list_shows_only_your_sessions(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """Each user's list holds their own sessions and none of anyone else's."""
    alice, bob = await make_account(), await make_account()
    mine = (await client.post("/api/v1/sessions", json={}, headers=alice.headers)).json()
    theirs = (await client.post("/api/v1/sessions", json={}, headers=bob.headers)).json()
    alice_list = (await client.get("/api/v1/sessions", headers=alice.headers)).json()
    bob_list = (await client.get("/api/v1/sessions", headers=bob.headers)).json()
    assert [item["id"] for item in alice_list["items"]] == [mine["id"]]
    assert [item["id"] for item in bob_list["items"]] == [theirs["id"]]


@pytest.mark.parametrize(
    "cursor",
    [
        "not a cursor!",
        "%%%",
        "",
        cursor_of("not-a-uuid"),
        cursor_of("12"),
        "AAAA",
        "\u00e9\u00e9",
    ],
    ids=["punctuation", "percents", "empty", "not a uuid", "a number", "zero bytes", "non-ascii"],
)
async def test_a_bad_session_cursor_is_422(
    client: httpx.AsyncClient, make_account: MakeAccount, cursor: str
) -> None:
    """A cursor the server did not make is 422 in the envelope on the session list."""
    account = await make_account()
    await client.post("/api/v1/sessions", json={}, headers=account.headers)
    response = await client.get(
        "/api/v1/sessions", params={"cursor": cursor}, headers=account.headers
    )
    assert_error(response, 422, "invalid_input")


@pytest.mark.parametrize(
    "cursor",
    [
        "not a cursor!",
        cursor_of(str(uuid.uuid4())),
        cursor_of("-1"),
        cursor_of("1.5"),
        cursor_of("\u00b2"),
        cursor_of("\u0661\u0662"),
        cursor_of("9" * 40),
        cursor_of(" 7"),
    ],
    ids=[
        "punctuation",
        "a session cursor",
        "negative",
        "fraction",
        "superscript digit",
        "arabic-indic digits",
        "beyond 64 bits",
        "padded",
    ],
)
async def test_a_bad_message_cursor_is_422(
    client: httpx.AsyncClient, make_account: MakeAccount, cursor: str
) -> None:
    """A message cursor that is not a position the server made is 422, never a 500."""
    account = await make_account()
    session = (await client.post("/api/v1/sessions", json={}, headers=account.headers)).json()
    response = await client.get(
        f"/api/v1/sessions/{session['id']}/messages",
        params={"cursor": cursor},
        headers=account.headers,
    )
    assert_error(response, 422, "invalid_input")


async def test_get_session_returns_it(client: httpx.AsyncClient, make_account: MakeAccount) -> None:
    """GET /sessions/{id} answers the session exactly as it was created."""
    account = await make_account()
    created = await client.post("/api/v1/sessions", json={"title": "t"}, headers=account.headers)
    got = await client.get(f"/api/v1/sessions/{created.json()['id']}", headers=account.headers)
    assert got.status_code == 200
    assert got.json() == created.json()


async def test_get_missing_session_is_404(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """A random session id is 404 in the envelope."""
    account = await make_account()
    response = await client.get(f"/api/v1/sessions/{uuid.uuid4()}", headers=account.headers)
    assert_error(response, 404, "not_found")


async def test_patch_changes_title_and_status(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """PATCH renames and archives; each change is stored and moves updated_at, not created_at."""
    account = await make_account()
    created = (await client.post("/api/v1/sessions", json={}, headers=account.headers)).json()
    url = f"/api/v1/sessions/{created['id']}"

    renamed = await client.patch(url, json={"title": " Renamed "}, headers=account.headers)
    assert renamed.status_code == 200, renamed.text
    assert renamed.json()["title"] == "Renamed"
    assert renamed.json()["status"] == "active"

    archived = await client.patch(url, json={"status": "archived"}, headers=account.headers)
    assert archived.status_code == 200, archived.text
    assert archived.json()["title"] == "Renamed"
    assert archived.json()["status"] == "archived"

    both = await client.patch(
        url, json={"title": "Both", "status": "active"}, headers=account.headers
    )
    assert both.json()["title"] == "Both"
    assert both.json()["status"] == "active"

    stored = (await client.get(url, headers=account.headers)).json()
    assert stored == both.json()
    assert stored["created_at"] == created["created_at"]
    assert parse_time(stored["updated_at"]) >= parse_time(archived.json()["updated_at"])
    assert parse_time(archived.json()["updated_at"]) >= parse_time(created["updated_at"])


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"title": None},
        {"title": None, "status": None},
        {"owner_id": str(uuid.uuid4())},
        {"title": "x", "agent_id": str(uuid.uuid4())},
        {"status": "deleted"},
        {"status": 1},
        {"title": "x" * 201},
    ],
    ids=[
        "empty",
        "null title",
        "all null",
        "unknown field",
        "agent cannot change",
        "unknown status",
        "status as number",
        "title too long",
    ],
)
async def test_patch_with_nothing_valid_to_change_is_422(
    client: httpx.AsyncClient, make_account: MakeAccount, body: dict[str, object]
) -> None:
    """PATCH with an empty body, unknown field or bad value is 422 and leaves the session alone."""
    account = await make_account()
    created = (await client.post("/api/v1/sessions", json={}, headers=account.headers)).json()
    url = f"/api/v1/sessions/{created['id']}"
    response = await client.patch(url, json=body, headers=account.headers)
    assert_error(response, 422, "invalid_input")
    assert (await client.get(url, headers=account.headers)).json() == created


async def test_delete_is_204_and_then_the_session_is_gone(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """DELETE answers 204 with no body; afterwards every route for the session is 404."""
    account = await make_account()
    created = (await client.post("/api/v1/sessions", json={}, headers=account.headers)).json()
    url = f"/api/v1/sessions/{created['id']}"
    deleted = await client.delete(url, headers=account.headers)
    assert deleted.status_code == 204
    assert deleted.content == b""
    assert_error(await client.get(url, headers=account.headers), 404, "not_found")
    assert_error(await client.delete(url, headers=account.headers), 404, "not_found")
    assert_error(
        await client.patch(url, json={"title": "x"}, headers=account.headers), 404, "not_found"
    )
    assert_error(await client.get(f"{url}/messages", headers=account.headers), 404, "not_found")
    assert_error(
        await client.get(f"{url}/pending-approvals", headers=account.headers), 404, "not_found"
    )
    listed = await client.get("/api/v1/sessions", headers=account.headers)
    assert listed.json() == {"items": [], "next_cursor": None}


async def test_a_new_session_has_no_messages(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """GET /sessions/{id}/messages of a new session is an empty, final page."""
    account = await make_account()
    created = (await client.post("/api/v1/sessions", json={}, headers=account.headers)).json()
    response = await client.get(
        f"/api/v1/sessions/{created['id']}/messages", headers=account.headers
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"items": [], "next_cursor": None}


async def test_pending_approvals_of_your_new_session_is_an_empty_page(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """Pending-approvals of your own session is 200 {items: [], next_cursor: null}."""
    account = await make_account()
    created = (await client.post("/api/v1/sessions", json={}, headers=account.headers)).json()
    response = await client.get(
        f"/api/v1/sessions/{created['id']}/pending-approvals", headers=account.headers
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"items": [], "next_cursor": None}


async def test_pending_approvals_of_a_missing_or_foreign_session_look_the_same(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """Pending approvals of a missing session and of another user's answer byte-identical 404s."""
    owner, stranger = await make_account(), await make_account()
    theirs = (await client.post("/api/v1/sessions", json={}, headers=owner.headers)).json()
    foreign = await client.get(
        f"/api/v1/sessions/{theirs['id']}/pending-approvals", headers=stranger.headers
    )
    missing = await client.get(
        f"/api/v1/sessions/{uuid.uuid4()}/pending-approvals", headers=stranger.headers
    )
    assert_error(foreign, 404, "not_found")
    assert foreign.content == missing.content
    assert foreign.headers["content-type"] == missing.headers["content-type"]


async def test_after_a_404_the_next_request_still_works(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """A 404 on pending-approvals for an unknown id leaves the session made before it intact."""
    account = await make_account()
    created = (await client.post("/api/v1/sessions", json={}, headers=account.headers)).json()
    missing = await client.get(
        f"/api/v1/sessions/{uuid.uuid4()}/pending-approvals", headers=account.headers
    )
    assert_error(missing, 404, "not_found")
    url = f"/api/v1/sessions/{created['id']}"
    renamed = await client.patch(url, json={"title": "after"}, headers=account.headers)
    assert renamed.status_code == 200, renamed.text
    assert (await client.get(url, headers=account.headers)).json()["title"] == "after"


async def test_another_users_session_answers_like_a_missing_one(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """Every route on another user's session is the 404 of a random id, and changes nothing."""
    owner, stranger = await make_account(), await make_account()
    session = (
        await client.post("/api/v1/sessions", json={"title": "private"}, headers=owner.headers)
    ).json()
    theirs = f"/api/v1/sessions/{session['id']}"
    nobodys = f"/api/v1/sessions/{uuid.uuid4()}"
    for method, suffix, body in (
        ("GET", "", None),
        ("PATCH", "", {"title": "stolen", "status": "archived"}),
        ("DELETE", "", None),
        ("GET", "/messages", None),
        ("GET", "/pending-approvals", None),
    ):
        foreign = await client.request(method, theirs + suffix, json=body, headers=stranger.headers)
        missing = await client.request(
            method, nobodys + suffix, json=body, headers=stranger.headers
        )
        assert_error(foreign, 404, "not_found")
        assert (foreign.status_code, foreign.content) == (missing.status_code, missing.content), (
            method,
            suffix,
        )
    assert (await client.get(theirs, headers=owner.headers)).json() == session
    owner_list = (await client.get("/api/v1/sessions", headers=owner.headers)).json()
    assert owner_list == {"items": [session], "next_cursor": None}
    stranger_list = (await client.get("/api/v1/sessions", headers=stranger.headers)).json()
    assert stranger_list == {"items": [], "next_cursor": None}
