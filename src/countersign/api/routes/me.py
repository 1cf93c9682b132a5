"""``/me``: who the caller is."""

from __future__ import annotations

from fastapi import APIRouter

from countersign.api.deps import AuthenticatedRoute, CurrentUser
from countersign.api.routes import API_PREFIX
from countersign.api.schemas import API_ERRORS, UserOut

router = APIRouter(
    prefix=API_PREFIX, tags=["auth"], responses=API_ERRORS, route_class=AuthenticatedRoute
)


@router.get("/me")
async def me(user: CurrentUser) -> UserOut:
    """The authenticated user."""
    return UserOut.model_validate(user)
