"""Every error is the one envelope: auth on every route, bad paths, bad bodies, huge bodies."""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from countersign.config import Settings
from tests.conftest import Account

MakeAccount = Callable[[], Awaitable[Account]]

ERROR_FIELDS = {"code", "message", "detail"}


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """Assert that ``response`` is the one error envelope with this status (and code)."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ERROR_FIELDS, body
    assert isinstance(error["code"], str)
    assert error["code"]
    assert isinstance(error["message"], str)
    assert error["message"]
    if code is not None:
        assert error["code"] == code, body
    return dict(error)


PUBLIC_OPERATIONS = {
    "/api/v1/auth/register",
    "/api/v1/auth/login",
    # A login page asks which sign-in buttons to show before anyone has signed in.
    "/api/v1/auth/providers",
    # OAuth/OIDC: a browser arrives here with no credentials; they answer 404 or 400.
    "/api/v1/auth/oauth/{provider}/login",
    "/api/v1/auth/oauth/{provider}/callback",
}
"""The only /api/v1 operations that take no credentials (they make an account or a token)."""


def api_operations(app: FastAPI) -> list[tuple[str, str]]:
    """Every (method, concrete path) under /api/v1 that needs credentials, path ids made up."""
    operations = []
    for template, item in app.openapi()["paths"].items():
        if not template.startswith("/api/v1") or template in PUBLIC_OPERATIONS:
            continue
        path = template
        while "{" in path:
            start = path.index("{")
            end = path.index("}", start)
            path = path[:start] + str(uuid.uuid4()) + path[end + 1 :]
        for method in item:
            if method in {"get", "post", "put", "patch", "delete"}:
                operations.append((method.upper(), path))
    return operations


def unknown_api_key() -> str:
    """Something shaped exactly like an API key that no user has."""
    return f"cs_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"


BAD_CREDENTIALS: dict[str, dict[str, str | bytes]] = {
    "no header": {},
    "empty bearer": {"Authorization": "Bearer "},
    "basic scheme": {"Authorization": "Basic dXNlcjpwYXNzd29yZA=="},
    "no scheme": {"Authorization": "cs_0123456789ab_secret"},
    "malformed key": {"Authorization": "Bearer not-a-key"},
    "short prefix": {"Authorization": "Bearer cs_abc_secret"},
    "wrong mark": {"Authorization": f"Bearer xx_{'a' * 12}_secret"},
    "non-ascii key": {"Authorization": f"Bearer cs_{'é' * 12}_secret".encode("latin-1")},
}


async def test_every_api_route_refuses_missing_or_bad_credentials(
    app: FastAPI, client: httpx.AsyncClient
) -> None:
    """Every /api/v1 operation answers 401 in the envelope to each kind of bad credential."""
    operations = api_operations(app)
    assert len(operations) >= 8
    credentials = {
        **BAD_CREDENTIALS,
        "unknown key": {"Authorization": f"Bearer {unknown_api_key()}"},
    }
    for method, path in operations:
        for name, headers in credentials.items():
            body = {} if method in {"POST", "PATCH", "PUT"} else None
            response = await client.request(method, path, headers=headers, json=body)
            assert_error(response, 401, "unauthenticated")
            assert response.headers["www-authenticate"] == "Bearer", (method, path, name)


async def test_a_revealed_key_with_one_changed_character_is_refused(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """A real key's prefix with a wrong secret is 401, the same body as an unknown key."""
    account = await make_account()
    tampered = account.key[:-1] + ("A" if account.key[-1] != "A" else "B")
    wrong = await client.get("/api/v1/sessions", headers={"Authorization": f"Bearer {tampered}"})
    unknown = await client.get(
        "/api/v1/sessions", headers={"Authorization": f"Bearer {unknown_api_key()}"}
    )
    assert_error(wrong, 401, "unauthenticated")
    assert wrong.content == unknown.content


async def test_credentials_are_checked_before_the_body(client: httpx.AsyncClient) -> None:
    """Without credentials even a broken or oversized-field body answers 401, not 422."""
    for content in (b"{", b"[]", b'{"unknown": 1}', b'{"title": 5}'):
        response = await client.post(
            "/api/v1/sessions", content=content, headers={"Content-Type": "application/json"}
        )
        assert_error(response, 401, "unauthenticated")


async def test_malformed_uuid_in_the_path_is_422(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """A session id that is not a UUID is 422 in the envelope on every session route."""
    account = await make_account()
    for bad in ("not-a-uuid", "123", "0" * 33, "%00", "g" * 32):
        for method, suffix in (
            ("GET", ""),
            ("PATCH", ""),
            ("DELETE", ""),
            ("GET", "/messages"),
            ("GET", "/pending-approvals"),
        ):
            body = {"title": "x"} if method == "PATCH" else None
            response = await client.request(
                method, f"/api/v1/sessions/{bad}{suffix}", headers=account.headers, json=body
            )
            error = assert_error(response, 422, "invalid_input")
            assert error["detail"][0]["field"] == "path.session_id", error


@pytest.mark.parametrize(
    "body",
    [
        {"title": 123},
        {"title": ["a"]},
        {"title": {"a": 1}},
        {"title": True},
        {"agent_id": 5},
        {"agent_id": "not-a-uuid"},
        {"agent_id": ["00000000-0000-0000-0000-000000000000"]},
        {"title": "x" * 201},
        {"unknown": "field"},
        {"title": "ok", "owner_id": "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"},
        [],
        ["title"],
        "title",
        42,
        None,
    ],
    ids=repr,
)
async def test_wrong_json_for_a_new_session_is_422(
    client: httpx.AsyncClient, make_account: MakeAccount, body: Any
) -> None:
    """Wrong types, unknown fields and non-object bodies are 422 and create nothing."""
    account = await make_account()
    response = await client.post(
        "/api/v1/sessions",
        content=json.dumps(body).encode(),
        headers={**account.headers, "Content-Type": "application/json"},
    )
    error = assert_error(response, 422, "invalid_input")
    assert isinstance(error["detail"], list)
    assert error["detail"]
    for problem in error["detail"]:
        assert set(problem) == {"field", "message", "type"}
    listed = await client.get("/api/v1/sessions", headers=account.headers)
    assert listed.json()["items"] == []


@pytest.mark.parametrize(
    "content",
    [
        b"{",
        b'{"title": "a",}',
        b"not json",
        b'{"title": "\\ud800"}',
        b'{"title": "a\\u0000b"}',
    ],
    ids=["truncated", "trailing comma", "not json", "lone surrogate", "nul character"],
)
async def test_broken_json_bodies_are_422(
    client: httpx.AsyncClient, make_account: MakeAccount, content: bytes
) -> None:
    """Bodies that are not JSON, or hold text no database can store, are 422 and create nothing."""
    account = await make_account()
    response = await client.post(
        "/api/v1/sessions",
        content=content,
        headers={**account.headers, "Content-Type": "application/json"},
    )
    error = assert_error(response, 422, "invalid_input")
    assert error["detail"][0]["field"] in {"body", "title"}, error
    listed = await client.get("/api/v1/sessions", headers=account.headers)
    assert listed.json()["items"] == []


async def test_invalid_json_says_so_in_words(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """A JSON syntax error names the body and where it broke, not a bare character offset."""
    account = await make_account()
    response = await client.post(
        "/api/v1/sessions",
        content=b'{"title": ',
        headers={**account.headers, "Content-Type": "application/json"},
    )
    error = assert_error(response, 422, "invalid_input")
    assert error["message"].startswith("body: is not valid JSON ("), error
    assert error["detail"] == [
        {
            "field": "body",
            "message": error["message"].removeprefix("body: "),
            "type": "json_invalid",
        }
    ]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"\xff\xfe\x00", "not UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"title": ' + b"1" * 5_000 + b"}", "a value too large to read"),
    ],
    ids=["not utf-8", "deeply nested", "huge number"],
)
async def test_bodies_the_json_parser_cannot_read_are_422_like_bad_json(
    client: httpx.AsyncClient, make_account: MakeAccount, content: bytes, reason: str
) -> None:
    """Bodies the JSON parser gives up on (encoding, nesting, size of a number) get the same
    422 envelope as any body that is not JSON, and nothing is written."""
    account = await make_account()
    response = await client.post(
        "/api/v1/sessions",
        content=content,
        headers={**account.headers, "Content-Type": "application/json"},
    )
    error = assert_error(response, 422, "invalid_input")
    assert error["message"] == f"body: is not valid JSON ({reason})"
    assert error["detail"] == [
        {"field": "body", "message": f"is not valid JSON ({reason})", "type": "json_invalid"}
    ]
    listed = await client.get("/api/v1/sessions", headers=account.headers)
    assert listed.json()["items"] == []


async def test_broken_json_on_patch_is_422_and_changes_nothing(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """PATCH with unusable JSON is 422 and the session keeps its values."""
    account = await make_account()
    created = await client.post("/api/v1/sessions", json={"title": "kept"}, headers=account.headers)
    url = f"/api/v1/sessions/{created.json()['id']}"
    for content in (b"{", b'{"title": "a\\u0000b"}', b'{"title": "\\udfff"}', b"null"):
        response = await client.patch(
            url, content=content, headers={**account.headers, "Content-Type": "application/json"}
        )
        assert_error(response, 422)
    assert (await client.get(url, headers=account.headers)).json() == created.json()


async def test_a_body_that_is_not_json_is_refused(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """A form or plain-text body is a 4xx envelope, not a session."""
    account = await make_account()
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        response = await client.post(
            "/api/v1/sessions",
            content=b"title=x",
            headers={**account.headers, "Content-Type": content_type},
        )
        assert 400 <= response.status_code < 500
        assert_error(response, response.status_code)
    missing = await client.post("/api/v1/sessions", headers=account.headers)
    assert_error(missing, 422, "invalid_input")


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=101",
        "limit=-1",
        "limit=abc",
        "limit=1.5",
        f"cursor={'a' * 201}",
    ],
)
async def test_bad_query_parameters_are_422(
    client: httpx.AsyncClient, make_account: MakeAccount, query: str
) -> None:
    """Out-of-range or mistyped query parameters on every list are 422 in the envelope."""
    account = await make_account()
    created = await client.post("/api/v1/sessions", json={}, headers=account.headers)
    session_url = f"/api/v1/sessions/{created.json()['id']}"
    for path in ("/api/v1/sessions", f"{session_url}/messages", f"{session_url}/pending-approvals"):
        response = await client.get(f"{path}?{query}", headers=account.headers)
        assert_error(response, 422, "invalid_input")


async def test_unknown_paths_are_404_in_the_envelope(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """Paths the app does not have answer 404 in the envelope, with or without credentials."""
    account = await make_account()
    for path in ("/api/v1/nothing", "/api/v2/sessions", "/nothing", "/api/v1/sessions/a/b/c"):
        for headers in ({}, account.headers):
            response = await client.get(path, headers=headers)
            assert_error(response, 404, "not_found")


async def test_wrong_methods_are_405_in_the_envelope(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """A method a path does not have answers 405 in the envelope with an Allow header."""
    account = await make_account()
    session_url = f"/api/v1/sessions/{uuid.uuid4()}"
    for method, path in (
        ("PUT", "/api/v1/sessions"),
        ("DELETE", "/api/v1/sessions"),
        ("PATCH", "/api/v1/sessions"),
        ("POST", session_url),
        ("PUT", session_url),
        ("POST", f"{session_url}/pending-approvals"),
        ("DELETE", f"{session_url}/messages"),
        ("POST", "/health/live"),
        ("DELETE", "/metrics"),
    ):
        response = await client.request(method, path, headers=account.headers)
        assert_error(response, 405, "method_not_allowed")
        assert method not in response.headers["allow"]
    # Allow names every method of the path, not only those of the first route matched.
    for path, methods in (
        ("/api/v1/sessions", "GET, POST"),
        (session_url, "DELETE, GET, PATCH"),
    ):
        response = await client.request("PUT", path, headers=account.headers)
        assert_error(response, 405, "method_not_allowed")
        assert response.headers["allow"] == methods


async def test_a_body_over_the_limit_with_content_length_is_413(
    client: httpx.AsyncClient, make_account: MakeAccount, settings: Settings
) -> None:
    """A body larger than max_request_bytes, announced by Content-Length, is 413 in the envelope."""
    account = await make_account()
    title = "x" * (settings.max_request_bytes + 1)
    response = await client.post(
        "/api/v1/sessions",
        content=json.dumps({"title": title}).encode(),
        headers={**account.headers, "Content-Type": "application/json"},
    )
    assert_error(response, 413, "request_too_large")
    listed = await client.get("/api/v1/sessions", headers=account.headers)
    assert listed.json()["items"] == []


async def test_a_streamed_body_over_the_limit_is_413(
    client: httpx.AsyncClient, make_account: MakeAccount, settings: Settings
) -> None:
    """A chunked body (no Content-Length) that grows past max_request_bytes is 413."""
    account = await make_account()
    chunk = b"x" * 65_536
    chunks = settings.max_request_bytes // len(chunk) + 2

    async def body() -> AsyncIterator[bytes]:
        yield b'{"title": "'
        for _ in range(chunks):
            yield chunk
        yield b'"}'

    request = client.build_request(
        "POST",
        "/api/v1/sessions",
        content=body(),
        headers={**account.headers, "Content-Type": "application/json"},
    )
    assert "content-length" not in request.headers
    assert request.headers["transfer-encoding"] == "chunked"
    response = await client.send(request)
    assert_error(response, 413, "request_too_large")
    for url in ("/api/v1/sessions", f"/api/v1/sessions/{uuid.uuid4()}"):
        request = client.build_request(
            "PATCH" if "sessions/" in url else "POST",
            url,
            content=body(),
            headers={**account.headers, "Content-Type": "application/json"},
        )
        assert_error(await client.send(request), 413, "request_too_large")


async def test_a_body_just_under_the_limit_is_judged_on_its_content(
    client: httpx.AsyncClient, make_account: MakeAccount, settings: Settings
) -> None:
    """A large body within the limit reaches validation (422 for a long title), not 413."""
    account = await make_account()
    content = json.dumps({"title": "x" * (settings.max_request_bytes - 100)}).encode()
    assert len(content) <= settings.max_request_bytes
    response = await client.post(
        "/api/v1/sessions",
        content=content,
        headers={**account.headers, "Content-Type": "application/json"},
    )
    assert_error(response, 422, "invalid_input")


async def test_a_bad_idempotency_key_is_422(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """An empty, blank or over-long Idempotency-Key is 422 in the envelope and creates nothing."""
    account = await make_account()
    for key in ("", "   ", "k" * 256):
        response = await client.post(
            "/api/v1/sessions", json={}, headers={**account.headers, "Idempotency-Key": key}
        )
        assert_error(response, 422, "invalid_input")
    listed = await client.get("/api/v1/sessions", headers=account.headers)
    assert listed.json()["items"] == []


async def test_openapi_documents_the_error_envelope(app: FastAPI) -> None:
    """Every /api/v1 operation documents 401 and 422 with the ErrorBody schema, not FastAPI's."""
    spec = app.openapi()
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for template, item in spec["paths"].items():
        if not template.startswith("/api/v1"):
            continue
        for method, operation in item.items():
            for status in ("401", "422"):
                if status == "422" and not (
                    operation.get("parameters") or operation.get("requestBody")
                ):
                    continue
                if status == "401" and template in PUBLIC_OPERATIONS - {"/api/v1/auth/login"}:
                    continue  # takes no credentials and never answers 401
                documented = operation["responses"].get(status)
                assert documented is not None, (method, template, status)
                schema = documented["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, template)
