"""Agent profiles: the server's default agent (made or refreshed at start-up) and users' own.

A user sees and uses their own agents plus the default agent; another user's agent is NotFound,
exactly like a missing one. The default agent is managed by the server: nobody may edit or
delete it through the API. Everything stored is checked first: a model this server can use (a
name of an accepted form whose provider has its key and extra), built-in tools listed once
each, a name and instructions of bounded length.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime

from pydantic import SecretStr

from countersign.agent.models import ModelOptions, check_model
from countersign.agent.tools import build_toolset
from countersign.config import Settings
from countersign.db.uow import UnitOfWork
from countersign.domain.errors import AlreadyExists, Conflict, InvalidInput, NotFound
from countersign.domain.models import (
    DEFAULT_AGENT_INSTRUCTIONS,
    DEFAULT_AGENT_NAME,
    DEFAULT_AGENT_TOOLS,
    Agent,
    AgentId,
    JSONObject,
    Page,
    ToolSetting,
    UserId,
)
from countersign.services import ServiceDeps, page_of, uuid_cursor
from countersign.services.idempotency import (
    IdempotentRequest,
    remember_response,
    stored_response,
    winner_response,
)

NAME_MAX_LENGTH = 100
"""The longest agent name (the width of the agents.name column)."""
INSTRUCTIONS_MAX_LENGTH = 20_000
"""The longest instructions an agent may carry."""
AGENT_NOT_FOUND = "agent not found"
DEFAULT_AGENT_READ_ONLY = (
    "the default agent is managed by the server and cannot be changed or deleted; "
    "create an agent of your own instead"
)


def model_options(settings: Settings) -> ModelOptions:
    """How this server reaches its model providers, from the settings."""

    def secret(value: SecretStr | None) -> str | None:
        return None if value is None else value.get_secret_value()

    return ModelOptions(
        openai_api_key=secret(settings.openai_api_key),
        openai_base_url=settings.openai_base_url,
        anthropic_api_key=secret(settings.anthropic_api_key),
        anthropic_base_url=settings.anthropic_base_url,
        google_api_key=secret(settings.google_api_key),
        google_base_url=settings.google_base_url,
        timeout=settings.model_timeout_seconds,
    )


def _usable_model(deps: ServiceDeps, model: str) -> str:
    """The normalised model name; InvalidInput unless this server can use that model."""
    return check_model(model, model_options(deps.settings))


async def ensure_default_agent(deps: ServiceDeps) -> Agent:
    """The default agent, created if missing and given the configured default model."""
    model = deps.settings.default_model
    try:
        async with deps.uow_factory() as uow:
            agent = await uow.agents.get_default()
            now = deps.clock.now()
            if agent is None:
                agent = Agent(
                    id=AgentId(deps.new_id()),
                    owner_id=None,
                    name=DEFAULT_AGENT_NAME,
                    model=model,
                    instructions=DEFAULT_AGENT_INSTRUCTIONS,
                    tools=DEFAULT_AGENT_TOOLS,
                    is_default=True,
                    created_at=now,
                    updated_at=now,
                )
                await uow.agents.add(agent)
            elif agent.model != model or agent.tools != DEFAULT_AGENT_TOOLS:
                agent = replace(agent, model=model, tools=DEFAULT_AGENT_TOOLS, updated_at=now)
                await uow.agents.update(agent)
            await uow.commit()
    except AlreadyExists:
        # Another server process made it at the same moment; theirs is as good as ours.
        async with deps.uow_factory(write=False) as uow:
            existing = await uow.agents.get_default()
        assert existing is not None
        return existing
    return agent


async def create_agent(
    deps: ServiceDeps,
    *,
    actor: UserId,
    name: str,
    model: str | None = None,
    instructions: str | None = None,
    tools: Sequence[ToolSetting] | None = None,
    idempotency: IdempotentRequest | None = None,
) -> Agent:
    """Create an agent for ``actor``; what is left out is taken from the default agent."""
    now = deps.clock.now()
    agent = Agent(
        id=AgentId(deps.new_id()),
        owner_id=actor,
        name=clean_agent_name(name),
        model=deps.settings.default_model if model is None else _usable_model(deps, model),
        instructions=(
            DEFAULT_AGENT_INSTRUCTIONS if instructions is None else clean_instructions(instructions)
        ),
        tools=DEFAULT_AGENT_TOOLS if tools is None else clean_tools(tools),
        is_default=False,
        created_at=now,
        updated_at=now,
    )
    try:
        return await _add_agent(deps, agent, idempotency=idempotency)
    except Conflict:
        # A concurrent request with the same key may have won the race: answer with its result.
        response = await winner_response(deps, user_id=actor, request=idempotency)
        if response is None:
            raise
        return agent_from_json(response)


async def _add_agent(
    deps: ServiceDeps, agent: Agent, *, idempotency: IdempotentRequest | None
) -> Agent:
    assert agent.owner_id is not None
    async with deps.uow_factory() as uow:
        if idempotency is not None:
            response = await stored_response(uow, user_id=agent.owner_id, request=idempotency)
            if response is not None:
                return agent_from_json(response)
        await uow.agents.add(agent)
        if idempotency is not None:
            await remember_response(
                uow,
                deps,
                user_id=agent.owner_id,
                request=idempotency,
                response=agent_to_json(agent),
            )
        await uow.commit()
    return agent


async def list_agents(
    deps: ServiceDeps, *, actor: UserId, cursor: str | None, limit: int
) -> Page[Agent]:
    """The agents ``actor`` may use (theirs and the default), newest first, one page at a time."""
    before = uuid_cursor(cursor)
    async with deps.uow_factory(write=False) as uow:
        agents = await uow.agents.list_usable(by=actor, before=before, limit=limit + 1)
    return page_of(agents, limit, lambda agent: str(agent.id))


async def get_agent(deps: ServiceDeps, *, actor: UserId, agent_id: AgentId) -> Agent:
    """One agent ``actor`` may use; NotFound if missing or someone else's."""
    async with deps.uow_factory(write=False) as uow:
        return await _usable(uow, agent_id, actor)


async def update_agent(
    deps: ServiceDeps,
    *,
    actor: UserId,
    agent_id: AgentId,
    name: str | None = None,
    model: str | None = None,
    instructions: str | None = None,
    tools: Sequence[ToolSetting] | None = None,
) -> Agent:
    """Change an agent of ``actor``'s; what is None stays; Conflict for the default agent."""
    new_name = None if name is None else clean_agent_name(name)
    new_model = None if model is None else _usable_model(deps, model)
    new_instructions = None if instructions is None else clean_instructions(instructions)
    new_tools = None if tools is None else clean_tools(tools)
    async with deps.uow_factory() as uow:
        agent = await _editable(uow, agent_id, actor)
        edited = replace(
            agent,
            name=agent.name if new_name is None else new_name,
            model=agent.model if new_model is None else new_model,
            instructions=agent.instructions if new_instructions is None else new_instructions,
            tools=agent.tools if new_tools is None else new_tools,
            updated_at=deps.clock.now(),
        )
        await uow.agents.update_owned(edited, owner=actor)
        await uow.commit()
    return edited


async def delete_agent(deps: ServiceDeps, *, actor: UserId, agent_id: AgentId) -> None:
    """Delete an agent of ``actor``'s; Conflict while sessions use it or for the default."""
    async with deps.uow_factory() as uow:
        agent = await _editable(uow, agent_id, actor)
        in_use = await uow.agents.count_sessions(agent.id)
        if in_use:
            raise Conflict(
                f"the agent is used by {in_use} session{'' if in_use == 1 else 's'}; "
                "delete those sessions first",
                detail={"agent_id": str(agent.id), "sessions": in_use},
            )
        await uow.agents.delete_owned(agent.id, owner=actor)
        await uow.commit()


def clean_agent_name(name: str) -> str:
    """The name without surrounding space; InvalidInput if it is then empty or too long."""
    name = name.strip()
    if not 0 < len(name) <= NAME_MAX_LENGTH:
        raise InvalidInput(f"name must be 1 to {NAME_MAX_LENGTH} characters (spaces trimmed)")
    return name


def clean_instructions(instructions: str) -> str:
    """The instructions as given; InvalidInput if they are too long."""
    if len(instructions) > INSTRUCTIONS_MAX_LENGTH:
        raise InvalidInput(f"instructions must be at most {INSTRUCTIONS_MAX_LENGTH} characters")
    return instructions


def clean_tools(tools: Sequence[ToolSetting]) -> tuple[ToolSetting, ...]:
    """The tool settings; InvalidInput for a tool that is not built in or listed twice."""
    # The very check the runner makes when it builds the agent's toolset, so a stored agent
    # can always be run.
    build_toolset(tools)
    return tuple(tools)


def agent_to_json(agent: Agent) -> JSONObject:
    """An agent as JSON values (for stored idempotent responses)."""
    return {
        "id": str(agent.id),
        "owner_id": None if agent.owner_id is None else str(agent.owner_id),
        "name": agent.name,
        "model": agent.model,
        "instructions": agent.instructions,
        "tools": [tool.to_json() for tool in agent.tools],
        "is_default": agent.is_default,
        "created_at": agent.created_at.isoformat(),
        "updated_at": agent.updated_at.isoformat(),
    }


def agent_from_json(data: JSONObject) -> Agent:
    """The agent stored by ``agent_to_json``."""
    return Agent(
        id=AgentId(uuid.UUID(data["id"])),
        owner_id=None if data["owner_id"] is None else UserId(uuid.UUID(data["owner_id"])),
        name=data["name"],
        model=data["model"],
        instructions=data["instructions"],
        tools=tuple(ToolSetting.from_json(tool) for tool in data["tools"]),
        is_default=data["is_default"],
        created_at=datetime.fromisoformat(data["created_at"]),
        updated_at=datetime.fromisoformat(data["updated_at"]),
    )


async def _usable(uow: UnitOfWork, agent_id: AgentId, actor: UserId) -> Agent:
    agent = await uow.agents.get_usable(agent_id, by=actor)
    if agent is None:
        raise NotFound(AGENT_NOT_FOUND)
    return agent


async def _editable(uow: UnitOfWork, agent_id: AgentId, actor: UserId) -> Agent:
    agent = await _usable(uow, agent_id, actor)
    if agent.is_default:
        raise Conflict(DEFAULT_AGENT_READ_ONLY, detail={"agent_id": str(agent.id)})
    return agent
