"""``/me``: who the caller is."""

from __future__ import annotations

from fastapi import APIRouter

from countersign.api.deps import CurrentUser
from countersign.api.schemas import UserOut

router = APIRouter(tags=["auth"])


@router.get("/me")
async def me(user: CurrentUser) -> UserOut:
    """The authenticated user."""
    return UserOut.model_validate(user)
