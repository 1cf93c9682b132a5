"""Accounts: users and passwords, logins and their access tokens, API keys, and turning a
presented credential into the caller.

Every change to an account is an audit line on the ``countersign.audit`` logger, with
``extra={"event": ..., "user_id": ...}``. Audit lines never carry a password, token or key,
and a failed login names the user only when one exists (never the email that was tried).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from countersign.db.uow import UnitOfWork
from countersign.domain.errors import Forbidden, InvalidInput, NotFound, Unauthenticated
from countersign.domain.models import (
    AccessToken,
    AccessTokenId,
    ApiKey,
    ApiKeyId,
    Page,
    User,
    UserId,
    normalise_email,
)
from countersign.security import (
    api_key_prefix,
    dummy_password_hash,
    hash_password,
    hash_token,
    is_common_password,
    new_access_token,
    new_api_key,
    token_matches,
    verify_password,
)
from countersign.services import ServiceDeps, page_of, uuid_cursor

PASSWORD_MIN_LENGTH = 10
PASSWORD_MAX_LENGTH = 1024
API_KEY_NAME_MAX_LENGTH = 100
CREDENTIAL_MAX_LENGTH = 512
"""Longer bearer credentials are refused without a look-up (ours are under 100 characters)."""
LAST_USED_RESOLUTION = timedelta(minutes=1)
"""``last_used_at`` is written at most this often per key or token, so reads stay reads."""

BAD_CREDENTIALS = "the credentials are not valid"
BAD_LOGIN = "the email or password is not correct"
API_KEY_NOT_FOUND = "API key not found"

audit_log = logging.getLogger("countersign.audit")


class CredentialKind(StrEnum):
    """What a caller authenticated with."""

    ACCESS_TOKEN = "access_token"  # noqa: S105 - a name, not a secret
    API_KEY = "api_key"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request, and which credential (by id) they sent."""

    user: User
    credential: CredentialKind
    credential_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A new access token: ``token`` is handed out once; only its hash is stored."""

    token: str
    expires_at: datetime
    user_id: UserId


# --- users and passwords ------------------------------------------------------------------


def check_password(password: str, *, email: str | None = None) -> None:
    """InvalidInput unless the password is long enough, not too long, and not a common one."""
    if len(password) < PASSWORD_MIN_LENGTH:
        raise InvalidInput(f"password must be at least {PASSWORD_MIN_LENGTH} characters long")
    if len(password) > PASSWORD_MAX_LENGTH:
        raise InvalidInput(f"password must be at most {PASSWORD_MAX_LENGTH} characters long")
    if is_common_password(password):
        raise InvalidInput(
            "password is one of the most common passwords; choose another "
            "(a few unrelated words make a good one)"
        )
    if email is not None and password.lower() in {email, email.partition("@")[0]}:
        raise InvalidInput("password must not be the email address")


async def create_user(
    deps: ServiceDeps, *, email: str, password: str, email_verified: bool = False
) -> User:
    """Create a user with an argon2-hashed password; AlreadyExists if the email is taken.

    ``email_verified``: the caller vouches for the email (an operator making the account).
    """
    email = normalise_email(email)
    check_password(password, email=email)
    user = User(
        id=UserId(deps.new_id()),
        email=email,
        created_at=deps.clock.now(),
        email_verified=email_verified,
    )
    # argon2 takes tens of milliseconds of CPU: keep it off the event loop.
    password_hash = await asyncio.to_thread(hash_password, password)
    async with deps.uow_factory() as uow:
        await uow.users.add(user, password_hash=password_hash)
        await uow.commit()
    return user


async def register_user(deps: ServiceDeps, *, email: str, password: str) -> User:
    """Self-service sign-up: Forbidden unless the server's registration is open."""
    if not deps.settings.registration_open:
        raise Forbidden("registration is closed on this server; ask its operator for an account")
    user = await create_user(deps, email=email, password=password)
    audit_log.info(
        "user %s registered", user.id, extra={"event": "register", "user_id": str(user.id)}
    )
    return user


# --- logins and access tokens -------------------------------------------------------------


async def log_in(deps: ServiceDeps, *, email: str, password: str) -> IssuedToken:
    """A new access token for a correct email and password; Unauthenticated otherwise.

    An unknown email, a user without a password (made by an OAuth provider) and a wrong
    password all fail alike, after the same argon2 verification.
    """
    try:
        normalised: str | None = normalise_email(email)
    except InvalidInput:
        normalised = None
    found = None
    if normalised is not None:
        async with deps.uow_factory(write=False) as uow:
            found = await uow.users.get_with_password_hash(normalised)
    user, password_hash = found if found is not None else (None, None)
    # Outside the unit of work: no transaction stays open while argon2 works.
    matches = await asyncio.to_thread(_verify_or_dummy, password_hash, password)
    if user is None or not matches:
        user_id = None if user is None else str(user.id)
        audit_log.warning(
            "login failed for %s",
            user_id or "an unknown email",
            extra={"event": "login_failed", "user_id": user_id},
        )
        raise Unauthenticated(BAD_LOGIN)
    issued = await issue_access_token(deps, user_id=user.id)
    audit_log.info("user %s logged in", user.id, extra={"event": "login", "user_id": str(user.id)})
    return issued


def _verify_or_dummy(password_hash: str | None, password: str) -> bool:
    """Verify against the user's hash, or against a dummy one (always False) when there is none."""
    dummy = dummy_password_hash()  # made once, on the first login of any kind
    if password_hash is None:
        verify_password(dummy, password)
        return False
    return verify_password(password_hash, password)


async def issue_access_token(deps: ServiceDeps, *, user_id: UserId) -> IssuedToken:
    """Store a new access token for the user and hand it out (login, OAuth callbacks)."""
    token = new_access_token()
    now = deps.clock.now()
    expires_at = now + timedelta(seconds=deps.settings.access_token_ttl_seconds)
    record = AccessToken(
        id=AccessTokenId(deps.new_id()), user_id=user_id, created_at=now, expires_at=expires_at
    )
    async with deps.uow_factory() as uow:
        # Each login sweeps the user's expired tokens, so the table does not grow for ever.
        await uow.access_tokens.delete_expired(user_id=user_id, now=now)
        await uow.access_tokens.add(record, token_hash=hash_token(token))
        await uow.commit()
    return IssuedToken(token=token, expires_at=expires_at, user_id=user_id)


async def log_out(deps: ServiceDeps, *, caller: Caller) -> None:
    """Revoke the access token the caller used; an API key is not logged out (InvalidInput)."""
    if caller.credential is not CredentialKind.ACCESS_TOKEN:
        raise InvalidInput(
            "logging out ends a login's access token; an API key stays valid until it is "
            "deleted (DELETE /api/v1/api-keys/{id})"
        )
    async with deps.uow_factory() as uow:
        await uow.access_tokens.revoke(AccessTokenId(caller.credential_id), at=deps.clock.now())
        await uow.commit()
    user_id = str(caller.user.id)
    audit_log.info("user %s logged out", user_id, extra={"event": "logout", "user_id": user_id})


async def authenticate(deps: ServiceDeps, *, credential: str) -> Caller:
    """The caller a bearer credential (API key or access token) belongs to; else Unauthenticated."""
    if not credential or len(credential) > CREDENTIAL_MAX_LENGTH:
        raise Unauthenticated(BAD_CREDENTIALS)
    prefix = api_key_prefix(credential)
    if prefix is not None:
        return await _authenticate_api_key(deps, credential, prefix)
    return await _authenticate_access_token(deps, credential)


async def _authenticate_api_key(deps: ServiceDeps, credential: str, prefix: str) -> Caller:
    now = deps.clock.now()
    async with deps.uow_factory(write=False, transaction=False) as uow:  # one statement
        found = await uow.api_keys.find_by_prefix(prefix)
        if found is None or not token_matches(credential, found[1]):
            raise Unauthenticated(BAD_CREDENTIALS)
        key, _hash, user = found
    if _due(key.last_used_at, now):
        async with deps.uow_factory() as uow:
            await uow.api_keys.mark_used(key.id, at=now)
            await uow.commit()
    return Caller(user=user, credential=CredentialKind.API_KEY, credential_id=key.id)


async def _authenticate_access_token(deps: ServiceDeps, credential: str) -> Caller:
    now = deps.clock.now()
    async with deps.uow_factory(write=False, transaction=False) as uow:
        # The hash of a 256-bit random token is the look-up key: there is nothing to compare
        # in constant time that an attacker could learn from.
        token = await uow.access_tokens.find_by_hash(hash_token(credential))
        if token is None:
            raise Unauthenticated(BAD_CREDENTIALS)
        if token.revoked_at is not None:
            raise Unauthenticated("the access token was revoked (logged out); log in again")
        if not token.is_valid(at=now):
            raise Unauthenticated("the access token has expired; log in again")
        user = await uow.users.get(token.user_id)
        if user is None:
            raise Unauthenticated(BAD_CREDENTIALS)
    if _due(token.last_used_at, now):
        async with deps.uow_factory() as uow:
            await uow.access_tokens.mark_used(token.id, at=now)
            await uow.commit()
    return Caller(user=user, credential=CredentialKind.ACCESS_TOKEN, credential_id=token.id)


def _due(last_used_at: datetime | None, now: datetime) -> bool:
    return last_used_at is None or now - last_used_at > LAST_USED_RESOLUTION


# --- API keys -------------------------------------------------------------------------------


async def create_api_key(deps: ServiceDeps, *, email: str, name: str) -> tuple[ApiKey, str]:
    """Make an API key for the user with this email; returns the key and its one-time secret."""
    name = _clean_key_name(name)
    async with deps.uow_factory() as uow:
        user = await uow.users.get_by_email(normalise_email(email))
        if user is None:
            raise NotFound(f"no user has the email {normalise_email(email)}")
        key, secret = await _add_api_key(deps, uow, user_id=user.id, name=name)
        await uow.commit()
    _audit_key_created(key)
    return key, secret


async def issue_api_key(deps: ServiceDeps, *, actor: UserId, name: str) -> tuple[ApiKey, str]:
    """Make an API key for the actor; returns the key and its one-time secret."""
    name = _clean_key_name(name)
    async with deps.uow_factory() as uow:
        key, secret = await _add_api_key(deps, uow, user_id=actor, name=name)
        await uow.commit()
    _audit_key_created(key)
    return key, secret


async def list_api_keys(
    deps: ServiceDeps, *, actor: UserId, cursor: str | None, limit: int
) -> Page[ApiKey]:
    """The actor's API keys, newest first, one page at a time (secrets are never shown)."""
    before = uuid_cursor(cursor)
    async with deps.uow_factory(write=False) as uow:
        keys = await uow.api_keys.list_owned(owner=actor, before=before, limit=limit + 1)
    return page_of(keys, limit, lambda key: str(key.id))


async def delete_api_key(deps: ServiceDeps, *, actor: UserId, key_id: ApiKeyId) -> None:
    """Delete one of the actor's API keys; NotFound if missing or someone else's."""
    async with deps.uow_factory() as uow:
        try:
            await uow.api_keys.delete_owned(key_id, owner=actor)
        except NotFound:
            raise NotFound(API_KEY_NOT_FOUND) from None
        await uow.commit()
    audit_log.info(
        "user %s deleted API key %s",
        actor,
        key_id,
        extra={"event": "api_key_deleted", "user_id": str(actor), "api_key_id": str(key_id)},
    )


async def _add_api_key(
    deps: ServiceDeps, uow: UnitOfWork, *, user_id: UserId, name: str
) -> tuple[ApiKey, str]:
    made = new_api_key()
    key = ApiKey(
        id=ApiKeyId(deps.new_id()),
        user_id=user_id,
        name=name,
        prefix=made.prefix,
        created_at=deps.clock.now(),
    )
    await uow.api_keys.add(key, key_hash=made.key_hash)
    return key, made.key


def _clean_key_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > API_KEY_NAME_MAX_LENGTH:
        raise InvalidInput(f"name must be 1 to {API_KEY_NAME_MAX_LENGTH} characters")
    return name


def _audit_key_created(key: ApiKey) -> None:
    audit_log.info(
        "user %s created API key %s (%s)",
        key.user_id,
        key.id,
        key.prefix,
        extra={
            "event": "api_key_created",
            "user_id": str(key.user_id),
            "api_key_id": str(key.id),
            "prefix": key.prefix,
        },
    )
