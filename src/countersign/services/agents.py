"""Agent profiles; for now the server's default agent, made or refreshed at start-up."""

from __future__ import annotations

from dataclasses import replace

from countersign.domain.errors import AlreadyExists
from countersign.domain.models import (
    DEFAULT_AGENT_INSTRUCTIONS,
    DEFAULT_AGENT_NAME,
    DEFAULT_AGENT_TOOLS,
    Agent,
    AgentId,
)
from countersign.services import ServiceDeps


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
