"""Idempotent creates: the first response to an ``Idempotency-Key`` is stored with the write.

The stored response is written in the same transaction as the thing it describes, so a retry
either finds both or neither. The same key with another body is refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from countersign.db.uow import UnitOfWork
from countersign.domain.errors import IdempotencyKeyReused, InvalidInput
from countersign.domain.models import JSONObject, UserId
from countersign.services import ServiceDeps

KEY_MAX_LENGTH = 255


@dataclass(frozen=True, slots=True)
class IdempotentRequest:
    """A request sent with an Idempotency-Key: what it did (scope) and a hash of its body."""

    key: str
    scope: str
    request_hash: str

    @classmethod
    def of(cls, key: str, *, scope: str, body: JSONObject) -> IdempotentRequest:
        """Describe a request; InvalidInput if the key is empty or too long."""
        key = key.strip()
        if not key or len(key) > KEY_MAX_LENGTH:
            raise InvalidInput(f"Idempotency-Key must be 1 to {KEY_MAX_LENGTH} characters")
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
        return cls(
            key=key, scope=scope, request_hash=hashlib.sha256(canonical.encode()).hexdigest()
        )


async def stored_response(
    uow: UnitOfWork, *, user_id: UserId, request: IdempotentRequest
) -> JSONObject | None:
    """The first response for this key, None if there was none; raises if the body differs."""
    stored = await uow.idempotency.get(user_id=user_id, scope=request.scope, key=request.key)
    if stored is None:
        return None
    request_hash, response = stored
    if request_hash != request.request_hash:
        raise IdempotencyKeyReused(
            "this Idempotency-Key was already used with a different request body"
        )
    return response


async def remember_response(
    uow: UnitOfWork,
    deps: ServiceDeps,
    *,
    user_id: UserId,
    request: IdempotentRequest,
    response: JSONObject,
) -> None:
    """Store the first response for this key, in the caller's transaction."""
    await uow.idempotency.add(
        user_id=user_id,
        scope=request.scope,
        key=request.key,
        request_hash=request.request_hash,
        response=response,
        at=deps.clock.now(),
        new_id=deps.new_id(),
    )


async def winner_response(
    deps: ServiceDeps, *, user_id: UserId, request: IdempotentRequest | None
) -> JSONObject | None:
    """After a create failed with a Conflict: the response a concurrent request with the same
    Idempotency-Key stored (it won the race), or None (no key, or the conflict was another)."""
    if request is None:
        return None
    async with deps.uow_factory(write=False) as uow:
        return await stored_response(uow, user_id=user_id, request=request)
