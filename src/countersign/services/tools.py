"""The tools an agent may be given, as ``GET /tools`` and ``countersign tools check`` show them,
and the plugins and MCP servers they come from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from countersign.agent.mcp import McpHub, McpServerSpec, check_specs
from countersign.agent.plugins import load_plugins
from countersign.agent.tools import (
    BUILTIN_TOOLS,
    install_mcp,
    install_plugins,
    known_tools,
    mcp_hub,
    plugin_tools,
    tool_descriptions,
    tool_schema,
)
from countersign.config import Settings
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
    hub = mcp_hub()
    mcp = hub.tools() if hub is not None else {}
    return [
        ToolInfo(
            name=name,
            source="builtin" if name in BUILTIN_TOOLS else "mcp" if name in mcp else "plugin",
            server=mcp[name].server if name in mcp else None,
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


def mcp_specs(settings: Settings) -> dict[str, McpServerSpec]:
    """The MCP servers the settings name (ConfigError when MCP support is not installed)."""
    specs = {
        name: McpServerSpec(
            name=name,
            command=server.command,
            args=server.args,
            env={key: value.get_secret_value() for key, value in server.env.items()},
            url=server.url,
            headers={key: value.get_secret_value() for key, value in server.headers.items()},
            timeout=server.timeout_seconds,
        )
        for name, server in settings.mcp_servers.items()
    }
    check_specs(specs)
    return specs


def open_mcp_hub(settings: Settings) -> McpHub | None:
    """A hub for the configured MCP servers (not connected, not in use yet: ``use_mcp_hub``);
    None when none is configured."""
    specs = mcp_specs(settings)
    if not specs:
        return None
    return McpHub(specs, taken=lambda: set(BUILTIN_TOOLS) | set(plugin_tools()))


def use_mcp_hub(hub: McpHub | None) -> None:
    """Make this hub's servers (or none) the MCP servers whose tools agents of this process
    may name."""
    install_mcp(hub)
