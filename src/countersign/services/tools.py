"""The tools an agent may be given, as ``GET /tools`` and ``countersign tools check`` show them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from countersign.agent.tools import BUILTIN_TOOLS, tool_descriptions, tool_schema
from countersign.domain.models import DEFAULT_AGENT_TOOLS, ToolPolicy


@dataclass(frozen=True, slots=True)
class ToolInfo:
    """One tool: where it comes from, what it takes, and the policy it has by default."""

    name: str
    source: str
    server: str | None
    description: str
    parameters: dict[str, Any]
    default_policy: ToolPolicy


def list_tools() -> list[ToolInfo]:
    """Every tool an agent may be given, by name."""
    defaults = {setting.name: setting.policy for setting in DEFAULT_AGENT_TOOLS}
    descriptions = tool_descriptions()
    return [
        ToolInfo(
            name=name,
            source="builtin",
            server=None,
            description=descriptions[name],
            parameters=tool_schema(name),
            default_policy=defaults.get(name, ToolPolicy.ASK),
        )
        for name in sorted(BUILTIN_TOOLS)
    ]
