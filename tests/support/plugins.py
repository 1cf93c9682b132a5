"""Small tool plugin packages built by the tests: a module and its ``*.dist-info`` (with the
``countersign.tools`` entry points) in a folder that goes on ``sys.path`` or ``PYTHONPATH``,
which is all ``importlib.metadata`` needs to find an installed distribution."""

from __future__ import annotations

import textwrap
from pathlib import Path

GREETER = '''
from pydantic_ai import Tool
from pydantic_ai.toolsets import FunctionToolset

CALLS = []


def greet(name: str, excited: bool = False) -> str:
    """Greet someone by name.

    Args:
        name: Who to greet.
        excited: Whether to shout.
    """
    CALLS.append(name)
    return f"hello {name}" + ("!" if excited else "")


def explode(reason: str) -> str:
    """Always fails (for the tests)."""
    raise RuntimeError(f"boom: {reason}")


def leave() -> str:
    """Ends the process, if anything lets it (for the tests)."""
    import sys

    sys.exit(3)


def careful(what: str) -> str:
    """A tool its plugin says must be approved."""
    return f"done: {what}"


def tools():
    toolset = FunctionToolset()
    toolset.add_function(greet)
    return [
        *toolset.tools.values(),
        Tool(explode, name="explode"),
        Tool(leave, name="leave"),
        Tool(careful, name="careful", requires_approval=True),
    ]
'''


def build_plugin(
    root: Path, *, distribution: str, module: str, entry_points: dict[str, str], source: str
) -> Path:
    """Write a plugin package under ``root`` (created if needed); ``root`` is returned, the
    folder to put on the path. ``entry_points``: name → ``module:attribute``."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{distribution}-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[countersign.tools]\n{lines}")
    return root


def plugin_folder(root: Path) -> Path:
    """Three plugins in one folder: ``greeter`` (good), ``broken`` (fails to import) and
    ``unnamed`` (good, but no test names it)."""
    build_plugin(
        root,
        distribution="countersign_greeter",
        module="countersign_greeter",
        entry_points={"greeter": "countersign_greeter:tools"},
        source=GREETER,
    )
    build_plugin(
        root,
        distribution="countersign_broken",
        module="countersign_broken",
        entry_points={"broken": "countersign_broken:tools"},
        source="import a_module_that_is_not_there\n",
    )
    build_plugin(
        root,
        distribution="countersign_unnamed",
        module="countersign_unnamed",
        entry_points={"unnamed": "countersign_unnamed:tools"},
        source="def tools():\n    def hidden() -> str:\n        return 'x'\n    return [hidden]\n",
    )
    return root
