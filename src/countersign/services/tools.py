"""The tools an agent may be given, as ``GET /tools`` and ``countersign tools check`` show them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from countersign.agent.plugins import load_plugins
from countersign.agent.tools import (
    BUILTIN_TOOLS,
    install_plugins,
    known_tools,
    plugin_tools,
    tool_descriptions,
    tool_schema,
)
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
    plugin: str | None = None
    """The plugin it comes from (plugin tools only)."""


def list_tools() -> list[ToolInfo]:
    """Every tool an agent may be given, by name."""
    defaults = {setting.name: setting.policy for setting in DEFAULT_AGENT_TOOLS}
    descriptions = tool_descriptions()
    plugins = plugin_tools()
    return [
        ToolInfo(
            name=name,
            source="builtin" if name in BUILTIN_TOOLS else "plugin",
            server=None,
            description=descriptions[name],
            parameters=tool_schema(name),
            default_policy=defaults.get(name, ToolPolicy.ASK),
            plugin=plugins[name].plugin if name in plugins else None,
        )
        for name in known_tools()
    ]


def load_tool_plugins(names: list[str]) -> None:
    """Load the named plugins and make their tools the ones this process offers (ConfigError,
    one sentence, for a plugin that cannot be loaded)."""
    install_plugins(load_plugins(names, taken=BUILTIN_TOOLS))
