"""Users and API keys: create them, and turn a presented key into a user."""

from __future__ import annotations

from datetime import timedelta

from countersign.domain.errors import InvalidInput, NotFound, Unauthenticated
from countersign.domain.models import ApiKey, ApiKeyId, User, UserId, normalise_email
from countersign.security import api_key_prefix, hash_password, new_api_key, token_matches
from countersign.services import ServiceDeps

PASSWORD_MIN_LENGTH = 8
API_KEY_NAME_MAX_LENGTH = 100
LAST_USED_RESOLUTION = timedelta(minutes=1)
"""``last_used_at`` is written at most this often per key, so reads stay reads."""


async def create_user(deps: ServiceDeps, *, email: str, password: str) -> User:
    """Create a user with an argon2-hashed password; AlreadyExists if the email is taken."""
    email = normalise_email(email)
    if len(password) < PASSWORD_MIN_LENGTH:
        raise InvalidInput(f"password must be at least {PASSWORD_MIN_LENGTH} characters long")
    user = User(id=UserId(deps.new_id()), email=email, created_at=deps.clock.now())
    password_hash = hash_password(password)
    async with deps.uow_factory() as uow:
        await uow.users.add(user, password_hash=password_hash)
        await uow.commit()
    return user


async def create_api_key(deps: ServiceDeps, *, email: str, name: str) -> tuple[ApiKey, str]:
    """Make an API key for the user with this email; returns the key and its one-time secret."""
    name = name.strip()
    if not name or len(name) > API_KEY_NAME_MAX_LENGTH:
        raise InvalidInput(f"name must be 1 to {API_KEY_NAME_MAX_LENGTH} characters")
    made = new_api_key()
    async with deps.uow_factory() as uow:
        user = await uow.users.get_by_email(normalise_email(email))
        if user is None:
            raise NotFound(f"no user has the email {normalise_email(email)}")
        key = ApiKey(
            id=ApiKeyId(deps.new_id()),
            user_id=user.id,
            name=name,
            prefix=made.prefix,
            created_at=deps.clock.now(),
        )
        await uow.api_keys.add(key, key_hash=made.key_hash)
        await uow.commit()
    return key, made.key


async def authenticate(deps: ServiceDeps, *, credential: str) -> User:
    """The user a bearer credential belongs to; Unauthenticated if it is unknown."""
    prefix = api_key_prefix(credential)
    if prefix is None:
        raise Unauthenticated("the credentials are not valid")
    now = deps.clock.now()
    async with deps.uow_factory(write=False) as uow:
        found = await uow.api_keys.find_by_prefix(prefix)
        if found is None or not token_matches(credential, found[1]):
            raise Unauthenticated("the credentials are not valid")
        key = found[0]
        user = await uow.users.get(key.user_id)
        if user is None:
            raise Unauthenticated("the credentials are not valid")
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
        async with deps.uow_factory() as uow:
            await uow.api_keys.mark_used(key.id, at=now)
            await uow.commit()
    return user
