"""Logins through OAuth / OpenID Connect providers: the identity, its user, a login token.

The HTTP side (``api/oauth.py``) proves who signed in and hands over a ``ProviderProfile``;
here that profile becomes a user:

1. an identity with the same provider and subject: its user (the usual case);
2. else a user whose email equals the profile's *verified* email: the identity is linked to
   that user (emails compare in their normalised, lower-case form);
3. else a new user, with the verified email if there is one, otherwise with no email (found
   by the identity alone from then on). An unverified email is kept on the identity only.

Then a login token is issued as for a password login, and the login is an audit line.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from countersign.db.uow import UnitOfWork
from countersign.domain.errors import Conflict, InvalidInput, OAuthFailed
from countersign.domain.models import Identity, IdentityId, User, UserId, normalise_email
from countersign.services import ServiceDeps
from countersign.services.accounts import IssuedToken, audit_log, issue_access_token

SUBJECT_MAX_LENGTH = 255
"""``identities.subject`` holds this many characters."""


@dataclass(frozen=True, slots=True)
class ProviderProfile:
    """Who a provider says signed in: its subject, and the email it gave (verified or not)."""

    provider: str
    """The provider's configured name (``COUNTERSIGN_OAUTH_PROVIDERS`` key)."""
    subject: str
    """The provider's stable id for the account (OIDC ``sub``, GitHub or Kakao user id)."""
    email: str | None
    email_verified: bool


class AccountOutcome(StrEnum):
    """How a provider login found its user."""

    EXISTING = "existing"
    """The identity was known."""
    LINKED = "linked"
    """The identity was new and linked to the user with the same verified email."""
    CREATED = "created"
    """The identity was new and a user was made for it."""


@dataclass(frozen=True, slots=True)
class ProviderLogin:
    """A successful provider login: the user, how it was found, and its new access token."""

    user: User
    outcome: AccountOutcome
    issued: IssuedToken


async def log_in_with_provider(deps: ServiceDeps, *, profile: ProviderProfile) -> ProviderLogin:
    """Find or make the user of a provider profile, and issue them an access token."""
    if not profile.subject or len(profile.subject) > SUBJECT_MAX_LENGTH:
        raise OAuthFailed(
            f"the provider's account id is empty or longer than {SUBJECT_MAX_LENGTH} characters"
        )
    email = _email(profile.email)
    verified_email = email if profile.email_verified else None
    try:
        user, outcome = await _find_or_link(deps, profile, email, verified_email)
    except Conflict:
        # Another login of the same identity (or a registration of the same email) committed
        # first; the second look finds what it made.
        user, outcome = await _find_or_link(deps, profile, email, verified_email)
    issued = await issue_access_token(deps, user_id=user.id)
    audit_log.info(
        "user %s logged in with %s (%s account)",
        user.id,
        profile.provider,
        outcome.value,
        extra={
            "event": "oauth_login",
            "user_id": str(user.id),
            "provider": profile.provider,
            "account": outcome.value,
        },
    )
    return ProviderLogin(user=user, outcome=outcome, issued=issued)


def record_failed_provider_login(*, provider: str, reason: str) -> None:
    """Audit a provider login that failed (``reason`` never carries a code, token or secret)."""
    audit_log.warning(
        "login with %s failed: %s",
        provider,
        reason,
        extra={"event": "oauth_login_failed", "user_id": None, "provider": provider},
    )


async def _find_or_link(
    deps: ServiceDeps, profile: ProviderProfile, email: str | None, verified_email: str | None
) -> tuple[User, AccountOutcome]:
    now = deps.clock.now()
    async with deps.uow_factory() as uow:
        identities = uow.identities
        found = await identities.find_user(provider=profile.provider, subject=profile.subject)
        if found is not None:
            return found[1], AccountOutcome.EXISTING
        user = None if verified_email is None else await uow.users.get_by_email(verified_email)
        outcome = AccountOutcome.LINKED
        if user is None:
            user = User(
                id=UserId(deps.new_id()),
                email=verified_email,
                created_at=now,
                email_verified=verified_email is not None,
            )
            await uow.users.add(user, password_hash=None)
            outcome = AccountOutcome.CREATED
        else:
            if await _is_linked(uow, user, profile):
                # The same identity's other login committed between the two reads above.
                return user, AccountOutcome.EXISTING
            await _check_linkable(uow, user, profile)
        await identities.add(
            Identity(
                id=IdentityId(deps.new_id()),
                user_id=user.id,
                provider=profile.provider,
                subject=profile.subject,
                email=email,
                created_at=now,
            )
        )
        await uow.commit()
    return user, outcome


async def _is_linked(uow: UnitOfWork, user: User, profile: ProviderProfile) -> bool:
    """Whether ``user`` is already linked to exactly this provider identity."""
    linked = await uow.identities.list_for_user(user.id)
    return any(
        found.provider == profile.provider and found.subject == profile.subject for found in linked
    )


async def _check_linkable(uow: UnitOfWork, user: User, profile: ProviderProfile) -> None:
    """OAuthFailed unless a provider login may join ``user``, the owner of its verified email.

    Someone could register the address first (registration checks no email) and wait for
    its owner to sign in with a provider: so only an account whose email is verified links.
    An account already linked to another subject of the same provider means the address
    moved to someone else there: no link either.
    """
    if not user.email_verified:
        raise OAuthFailed(
            "an account with this email already exists, and its email was never verified; "
            "log in with its password instead"
        )
    linked = await uow.identities.list_for_user(user.id)
    if any(found.provider == profile.provider for found in linked):
        raise OAuthFailed(
            f"the account with this email is linked to another {profile.provider} account; "
            "log in with that one"
        )


def _email(email: str | None) -> str | None:
    """The provider's email in normalised form; None when there is none or it is not one."""
    if email is None:
        return None
    try:
        return normalise_email(email)
    except InvalidInput:
        return None
