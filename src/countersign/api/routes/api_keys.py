"""``/api-keys``: create (the key is shown once), list and delete your API keys."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Response, status

from countersign.api.deps import AuthenticatedRoute, CurrentUser, Services
from countersign.api.routes import API_PREFIX
from countersign.api.routes.sessions import Cursor, Limit
from countersign.api.schemas import (
    API_ERRORS,
    ApiKeyCreate,
    ApiKeyCreatedOut,
    ApiKeyOut,
    ErrorBody,
    Page,
)
from countersign.domain.models import ApiKeyId
from countersign.services import accounts

router = APIRouter(
    prefix=f"{API_PREFIX}/api-keys",
    tags=["api-keys"],
    responses=API_ERRORS,
    route_class=AuthenticatedRoute,
)

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "Missing, or not yours"}
}


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_api_key(
    body: ApiKeyCreate, user: CurrentUser, services: Services, response: Response
) -> ApiKeyCreatedOut:
    """Make an API key. `key` is in this answer only: store it now."""
    key, secret = await accounts.issue_api_key(services, actor=user.id, name=body.name)
    response.headers["Cache-Control"] = "no-store"
    return ApiKeyCreatedOut(
        id=key.id, name=key.name, prefix=key.prefix, key=secret, created_at=key.created_at
    )


@router.get("")
async def list_api_keys(
    user: CurrentUser, services: Services, cursor: Cursor = None, limit: Limit = 20
) -> Page[ApiKeyOut]:
    """Your API keys, newest first (without their secrets)."""
    page = await accounts.list_api_keys(services, actor=user.id, cursor=cursor, limit=limit)
    return Page[ApiKeyOut](
        items=[ApiKeyOut.model_validate(item) for item in page.items],
        next_cursor=page.next_cursor,
    )


@router.delete(
    "/{key_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=NOT_FOUND,
)
async def delete_api_key(key_id: uuid.UUID, user: CurrentUser, services: Services) -> Response:
    """Delete one of your API keys; it stops working at once."""
    await accounts.delete_api_key(services, actor=user.id, key_id=ApiKeyId(key_id))
    return Response(status_code=status.HTTP_204_NO_CONTENT)
