"""``/agents``: create, list, read, edit and delete agent profiles.

You see your own agents and the server's default agent; the default agent is read-only.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Response, status

from countersign.api.deps import AuthenticatedRoute, CurrentUser, IdempotencyKey, Services
from countersign.api.routes import API_PREFIX
from countersign.api.routes.sessions import NOT_FOUND, Cursor, Limit
from countersign.api.schemas import (
    API_ERRORS,
    AgentCreate,
    AgentOut,
    AgentUpdate,
    ErrorBody,
    Page,
    ToolSettingIn,
)
from countersign.domain.models import AgentId, ToolSetting
from countersign.services import agents
from countersign.services.idempotency import IdempotentRequest

router = APIRouter(
    prefix=f"{API_PREFIX}/agents",
    tags=["agents"],
    responses=API_ERRORS,
    route_class=AuthenticatedRoute,
)

READ_ONLY: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorBody, "description": "The default agent, which the server manages"}
}


@router.post("", status_code=status.HTTP_201_CREATED, responses={422: {"model": ErrorBody}})
async def create_agent(
    body: AgentCreate, user: CurrentUser, services: Services, idempotency_key: IdempotencyKey
) -> AgentOut:
    """Make an agent. Left-out `model`, `instructions` and `tools` come from the default agent."""
    request = (
        None
        if idempotency_key is None
        else IdempotentRequest.of(
            idempotency_key, scope="POST /agents", body=body.model_dump(mode="json")
        )
    )
    agent = await agents.create_agent(
        services,
        actor=user.id,
        name=body.name,
        model=body.model,
        instructions=body.instructions,
        tools=_tool_settings(body.tools),
        idempotency=request,
    )
    return AgentOut.model_validate(agent)


@router.get("")
async def list_agents(
    user: CurrentUser, services: Services, cursor: Cursor = None, limit: Limit = 20
) -> Page[AgentOut]:
    """Your agents and the server's default agent, newest first."""
    page = await agents.list_agents(services, actor=user.id, cursor=cursor, limit=limit)
    return Page[AgentOut](
        items=[AgentOut.model_validate(item) for item in page.items],
        next_cursor=page.next_cursor,
    )


@router.get("/{agent_id}", responses=NOT_FOUND)
async def get_agent(agent_id: uuid.UUID, user: CurrentUser, services: Services) -> AgentOut:
    """One agent: yours, or the default agent."""
    agent = await agents.get_agent(services, actor=user.id, agent_id=AgentId(agent_id))
    return AgentOut.model_validate(agent)


@router.patch("/{agent_id}", responses={**NOT_FOUND, **READ_ONLY})
async def update_agent(
    agent_id: uuid.UUID, body: AgentUpdate, user: CurrentUser, services: Services
) -> AgentOut:
    """Change one of your agents; `tools`, when given, replaces the whole list."""
    agent = await agents.update_agent(
        services,
        actor=user.id,
        agent_id=AgentId(agent_id),
        name=body.name,
        model=body.model,
        instructions=body.instructions,
        tools=_tool_settings(body.tools),
    )
    return AgentOut.model_validate(agent)


@router.delete(
    "/{agent_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={
        **NOT_FOUND,
        409: {"model": ErrorBody, "description": "Sessions use it, or it is the default agent"},
    },
)
async def delete_agent(agent_id: uuid.UUID, user: CurrentUser, services: Services) -> Response:
    """Delete one of your agents; 409 while sessions still use it."""
    await agents.delete_agent(services, actor=user.id, agent_id=AgentId(agent_id))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _tool_settings(tools: list[ToolSettingIn] | None) -> list[ToolSetting] | None:
    if tools is None:
        return None
    return [tool.to_setting() for tool in tools]
