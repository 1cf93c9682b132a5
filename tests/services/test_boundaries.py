"""Invariant 1: no ORM row outlives its unit of work; services hand out plain domain values."""

from __future__ import annotations

import dataclasses

from countersign.domain.models import SessionStatus
from countersign.services import ServiceDeps
from countersign.services import sessions as session_service
from countersign.services.accounts import authenticate, create_api_key, create_user
from countersign.services.agents import ensure_default_agent
from tests.conftest import alive_rows


async def test_no_row_is_alive_after_any_service_call(services: ServiceDeps) -> None:
    """After each service call a full garbage collection finds no *Row instance in memory."""
    assert alive_rows() == []
    results: list[object] = []

    async def check(result: object) -> None:
        results.append(result)
        leaked = alive_rows()
        assert leaked == [], f"rows alive after a service call: {leaked!r}"

    user = await create_user(services, email="gc@example.test", password="long enough pw")
    await check(user)
    key, secret = await create_api_key(services, email="gc@example.test", name="gc")
    await check(key)
    await check(await authenticate(services, credential=secret))
    await check(await ensure_default_agent(services))
    session = await session_service.create_session(
        services, actor=user.id, agent_id=None, title="gc"
    )
    await check(session)
    await check(await session_service.list_sessions(services, actor=user.id, cursor=None, limit=5))
    await check(await session_service.get_session(services, actor=user.id, session_id=session.id))
    await check(
        await session_service.update_session(
            services,
            actor=user.id,
            session_id=session.id,
            title="t2",
            status=SessionStatus.ARCHIVED,
        )
    )
    await check(
        await session_service.list_messages(
            services, actor=user.id, session_id=session.id, cursor=None, limit=5
        )
    )
    await check(
        await session_service.list_pending_approvals(
            services, actor=user.id, session_id=session.id, cursor=None, limit=5
        )
    )
    await check(
        await session_service.delete_session(services, actor=user.id, session_id=session.id)
    )

    # What the services returned are frozen dataclasses, not live ORM objects.
    for result in (user, key, session):
        assert dataclasses.is_dataclass(result)
        assert type(result).__dataclass_params__.frozen  # type: ignore[attr-defined]
