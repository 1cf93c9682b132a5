"""``/tools``: every tool an agent may be given, with its arguments' JSON schema."""

from __future__ import annotations

from fastapi import APIRouter

from countersign.api.deps import AuthenticatedRoute, CurrentUser
from countersign.api.routes import API_PREFIX
from countersign.api.schemas import API_ERRORS, ToolList, ToolOut
from countersign.services.tools import list_tools

router = APIRouter(
    prefix=f"{API_PREFIX}/tools",
    tags=["agents"],
    responses=API_ERRORS,
    route_class=AuthenticatedRoute,
)


@router.get("")
async def get_tools(_user: CurrentUser) -> ToolList:
    """The tools an agent's `tools` may name, each with `source` (`builtin`, `mcp` or
    `plugin`), its `server` (MCP), a description, its arguments (`parameters`, a JSON schema:
    argument rules may name its text arguments) and its `default_policy`."""
    return ToolList(items=[ToolOut.model_validate(tool) for tool in list_tools()])
