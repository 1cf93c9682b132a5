"""Tool plugins: installed packages that give agents more tools.

A plugin is an entry point of the group ``countersign.tools``; only those named in
``COUNTERSIGN_PLUGINS`` are loaded, at start-up. The entry point is a pydantic-ai ``Tool``, a
``FunctionToolset``, a list of tools or tool functions, or a callable (taking no arguments)
that returns one of those. Its tools go through everything a built-in goes through: the
agent's policy and argument rules, the approval flow (arguments a person edits are validated
against the tool's own schema), the journal, and the output cap.

A plugin that is not installed, fails to import, gives no tools, or names a tool that exists
already is a configuration error: the operator asked for it by name, so the server does not
start without it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from pydantic_ai import Tool
from pydantic_ai.toolsets import FunctionToolset

from countersign.domain.errors import ConfigError

ENTRY_POINT_GROUP = "countersign.tools"
TOOL_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True, slots=True)
class PluginTool:
    """A tool and the plugin it came from."""

    tool: Tool[Any]
    plugin: str


def load_plugins(names: Sequence[str], *, taken: Iterable[str] = ()) -> dict[str, PluginTool]:
    """The tools of the named plugins, by tool name; ConfigError (one sentence) for a plugin
    that cannot be loaded. ``taken``: tool names that exist already (the built-ins)."""
    installed: dict[str, EntryPoint] = {}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        other = installed.setdefault(point.name, point)
        if other is not point and other.value != point.value and point.name in names:
            raise ConfigError(
                f"Two installed packages give a plugin named {point.name!r} "
                f"({other.value} and {point.value}); uninstall one of them."
            )
    tools: dict[str, PluginTool] = {}
    used = set(taken)
    for name in names:
        found = installed.get(name)
        if found is None:
            known = ", ".join(sorted(installed)) or "none"
            raise ConfigError(
                f"The plugin {name!r} named in COUNTERSIGN_PLUGINS is not installed "
                f"(installed {ENTRY_POINT_GROUP} plugins: {known}).",
                hint="Install its package, or leave it out of COUNTERSIGN_PLUGINS.",
            )
        for tool in _tools_of(name, found):
            if tool.prepare is not None or tool.args_validator is not None:
                raise ConfigError(
                    f"The plugin {name!r} gives the tool {tool.name!r} with a `prepare` or "
                    "`args_validator` function, which Countersign does not apply; give the "
                    "tool without them."
                )
            if not TOOL_NAME.match(tool.name):
                raise ConfigError(
                    f"The plugin {name!r} gives a tool named {tool.name!r}; a tool name is a "
                    "letter, then letters, digits, '_' or '-', at most 64 in all."
                )
            if tool.name in used:
                raise ConfigError(
                    f"The plugin {name!r} gives a tool named {tool.name!r}, which another "
                    "tool already has."
                )
            used.add(tool.name)
            tools[tool.name] = PluginTool(tool=tool, plugin=name)
    return tools


def _tools_of(name: str, point: EntryPoint) -> list[Tool[Any]]:
    try:
        target = point.load()
        provided = _call(target) if _is_factory(target) else target
        tools = _as_tools(provided)
    except (ConfigError, KeyboardInterrupt):
        raise
    except BaseException as exc:  # noqa: BLE001 - anything the plugin's code raises, exit too
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        raise ConfigError(
            f"The plugin {name!r} could not be loaded ({_one_line(detail)}).",
            hint="Fix or reinstall its package, or leave it out of COUNTERSIGN_PLUGINS.",
        ) from None
    if not tools:
        raise ConfigError(f"The plugin {name!r} gives no tools.")
    return tools


def _is_factory(target: Any) -> bool:
    """The entry point is a callable that makes the plugin's tools (a tool function itself
    goes in a list, or is wrapped in a ``Tool``)."""
    return callable(target) and not isinstance(target, Tool | FunctionToolset)


def _call(factory: Callable[[], Any]) -> Any:
    return factory()


def _as_tools(provided: Any) -> list[Tool[Any]]:
    if isinstance(provided, FunctionToolset):
        return list(provided.tools.values())
    if isinstance(provided, Tool):
        return [provided]
    if callable(provided):
        return [Tool(provided)]
    if isinstance(provided, list | tuple):
        return [tool for item in provided for tool in _as_tools(item)]
    raise TypeError(
        f"a plugin gives a Tool, a function, a FunctionToolset or a list of them, not "
        f"{type(provided).__name__}"
    )


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= 300 else line[:297] + "..."
