"""Operations: health probes, Prometheus metrics, request ids, and logs that keep keys secret."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from countersign.config import Settings
from tests.api.test_errors import MakeAccount, assert_error


def metric_samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus exposition text as {sample name: [(labels, value), ...]}."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return samples


def request_count(text: str, *, method: str, route: str, status: int) -> float:
    """The value of countersign_http_requests_total for these labels (0 when absent)."""
    for labels, value in metric_samples(text).get("countersign_http_requests_total", []):
        if labels == {"method": method, "route": route, "status": str(status)}:
            return value
    return 0.0


async def test_liveness_is_ok(client: httpx.AsyncClient) -> None:
    """GET /health/live answers 200 {"status": "ok"} without credentials."""
    response = await client.get("/health/live")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readiness_is_ok_on_a_migrated_database(client: httpx.AsyncClient) -> None:
    """GET /health/ready answers 200 when the database is reachable and at head."""
    response = await client.get("/health/ready")
    assert response.status_code == 200, response.text
    assert response.json() == {"status": "ok"}


async def test_metrics_count_requests_by_route_template(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """Requests are counted under their route template and status, never their raw path."""
    account = await make_account()
    session = (await client.post("/api/v1/sessions", json={}, headers=account.headers)).json()
    for _ in range(2):
        await client.get(f"/api/v1/sessions/{session['id']}", headers=account.headers)
    await client.get(f"/api/v1/sessions/{uuid.uuid4()}", headers=account.headers)
    await client.get(f"/no/such/{uuid.uuid4()}")

    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    template = "/api/v1/sessions/{session_id}"
    assert request_count(text, method="POST", route="/api/v1/sessions", status=201) == 1
    assert request_count(text, method="GET", route=template, status=200) == 2
    assert request_count(text, method="GET", route=template, status=404) == 1
    assert request_count(text, method="GET", route="unmatched", status=404) == 1
    assert session["id"] not in text
    assert "/no/such" not in text
    durations = metric_samples(text)["countersign_http_request_duration_seconds_count"]
    assert ({"method": "GET", "route": template}, 3.0) in durations


async def test_metrics_export_the_database_pool(
    client: httpx.AsyncClient, settings: Settings, backend: str
) -> None:
    """/metrics has the pool's size, checked-out and overflow gauges with sane values."""
    samples = metric_samples((await client.get("/metrics")).text)
    values = {}
    for name in (
        "countersign_db_pool_size",
        "countersign_db_pool_checked_out",
        "countersign_db_pool_overflow",
    ):
        assert name in samples, sorted(samples)
        [(labels, value)] = samples[name]
        assert labels == {}
        values[name] = value
    assert values["countersign_db_pool_size"] >= 1
    if backend == "postgres":
        assert values["countersign_db_pool_size"] == settings.db_pool_size
    assert 0 <= values["countersign_db_pool_overflow"] <= settings.db_max_overflow
    assert (
        0
        <= values["countersign_db_pool_checked_out"]
        <= values["countersign_db_pool_size"] + values["countersign_db_pool_overflow"]
    )


async def test_every_response_carries_a_request_id(
    client: httpx.AsyncClient, make_account: MakeAccount, settings: Settings
) -> None:
    """Successes, every kind of error, probes and metrics all answer with an X-Request-ID."""
    account = await make_account()
    session = (await client.post("/api/v1/sessions", json={}, headers=account.headers)).json()
    url = f"/api/v1/sessions/{session['id']}"

    async def oversized() -> AsyncIterator[bytes]:
        for _ in range(settings.max_request_bytes // 65_536 + 2):
            yield b"x" * 65_536

    requests = [
        client.build_request("GET", url, headers=account.headers),
        client.build_request("POST", "/api/v1/sessions", json={}, headers=account.headers),
        client.build_request("GET", "/api/v1/sessions"),
        client.build_request("GET", f"/api/v1/sessions/{uuid.uuid4()}", headers=account.headers),
        client.build_request("GET", "/api/v1/sessions/not-a-uuid", headers=account.headers),
        client.build_request("PUT", "/api/v1/sessions", headers=account.headers),
        client.build_request("GET", "/nowhere"),
        client.build_request(
            "POST",
            "/api/v1/sessions",
            content=oversized(),
            headers={**account.headers, "Content-Type": "application/json"},
        ),
        client.build_request("GET", "/health/live"),
        client.build_request("GET", "/health/ready"),
        client.build_request("GET", "/metrics"),
        client.build_request("GET", "/openapi.json"),
        client.build_request("DELETE", url, headers=account.headers),
    ]
    seen = set()
    statuses = set()
    for request in requests:
        response = await client.send(request)
        request_id = response.headers.get("x-request-id")
        assert request_id, (request.method, request.url, response.status_code)
        seen.add(request_id)
        statuses.add(response.status_code)
    assert len(seen) == len(requests)
    assert {200, 201, 204, 401, 404, 405, 413, 422} <= statuses


async def test_an_incoming_request_id_is_echoed(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    """A caller's plain X-Request-ID comes back unchanged, on successes and errors alike."""
    account = await make_account()
    for path, headers in (
        ("/api/v1/sessions", account.headers),
        ("/api/v1/sessions", {}),
        (f"/api/v1/sessions/{uuid.uuid4()}", account.headers),
        ("/health/live", {}),
    ):
        request_id = f"trace-{uuid.uuid4().hex}"
        response = await client.get(path, headers={**headers, "X-Request-ID": request_id})
        assert response.headers["x-request-id"] == request_id


async def test_an_unusable_request_id_is_replaced(client: httpx.AsyncClient) -> None:
    """An X-Request-ID that is too long or has odd characters is replaced, not echoed."""
    for hostile in ("a" * 500, "two words", "x;rm -rf /", "id\twith\ttabs"):
        response = await client.get("/health/live", headers={"X-Request-ID": hostile})
        assert response.status_code == 200
        assert response.headers["x-request-id"]
        assert response.headers["x-request-id"] != hostile


async def test_an_unexpected_error_is_a_500_envelope_with_a_request_id(
    app: FastAPI, caplog: pytest.LogCaptureFixture
) -> None:
    """A route that raises answers the 500 envelope with X-Request-ID, counted, and logged."""

    async def broken() -> None:
        raise RuntimeError("a bug in a route")

    # A real route on the real app, standing in for any bug a future route might have.
    app.add_api_route("/test-only/broken", broken)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://countersign.test") as http:
        with caplog.at_level(logging.ERROR):
            response = await http.get("/test-only/broken", headers={"X-Request-ID": "boom-1"})
        metrics = (await http.get("/metrics")).text
    error = assert_error(response, 500, "internal_error")
    assert "a bug in a route" not in error["message"]
    assert response.headers["x-request-id"] == "boom-1"
    assert request_count(metrics, method="GET", route="/test-only/broken", status=500) == 1
    logged = [record for record in caplog.records if record.exc_info]
    assert any(
        "a bug in a route" in str(record.exc_info[1]) for record in logged if record.exc_info
    )


async def test_api_keys_never_reach_the_logs(
    client: httpx.AsyncClient, make_account: MakeAccount, caplog: pytest.LogCaptureFixture
) -> None:
    """Requests with a good, a tampered and a wrong-scheme key log lines, none holding a key."""
    account = await make_account()
    secret = account.key.split("_", 2)[2]
    tampered = account.key[:-2] + "zz"
    with caplog.at_level(logging.DEBUG):
        created = await client.post("/api/v1/sessions", json={}, headers=account.headers)
        await client.get(f"/api/v1/sessions/{created.json()['id']}", headers=account.headers)
        await client.get("/api/v1/sessions?cursor=bad!", headers=account.headers)
        await client.post("/api/v1/sessions", content=b"{", headers=account.headers)
        await client.get("/api/v1/sessions", headers={"Authorization": f"Bearer {tampered}"})
        await client.get("/api/v1/sessions", headers={"Authorization": f"Token {account.key}"})
        await client.get("/api/v1/me", headers={"Authorization": account.key})
    assert caplog.records, "no log lines were written at all"
    assert any(record.name == "countersign.access" for record in caplog.records)
    for record in caplog.records:
        rendered = f"{record.getMessage()} {record.__dict__!r}"
        for needle in (account.key, tampered, secret):
            assert needle not in rendered, record
    assert secret not in caplog.text
