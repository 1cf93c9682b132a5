"""Provider logins as a use case: which user an identity finds, links or makes (both databases)."""

from __future__ import annotations

import uuid

import pytest

from countersign.domain.errors import OAuthFailed
from countersign.services import ServiceDeps
from countersign.services.accounts import authenticate, create_user
from countersign.services.identities import (
    AccountOutcome,
    ProviderProfile,
    log_in_with_provider,
)
from tests.conftest import alive_rows


def profile(
    subject: str | None = None, *, email: str | None = None, verified: bool = True
) -> ProviderProfile:
    return ProviderProfile(
        provider="corp",
        subject=subject or f"sub-{uuid.uuid4().hex}",
        email=email,
        email_verified=verified,
    )


def new_email() -> str:
    return f"id-{uuid.uuid4().hex[:10]}@example.test"


async def test_created_then_existing_and_no_row_outlives_the_call(services: ServiceDeps) -> None:
    """A new identity makes a user; the same one again finds it. What comes back is plain
    values, and no ORM row is alive afterwards (invariant 1)."""
    email = new_email()
    first = await log_in_with_provider(services, profile=profile("s-1", email=email.upper()))
    assert first.outcome is AccountOutcome.CREATED
    assert first.user.email == email
    assert alive_rows() == []
    again = await log_in_with_provider(services, profile=profile("s-1", email=new_email()))
    assert again.outcome is AccountOutcome.EXISTING
    assert again.user == first.user
    assert alive_rows() == []
    caller = await authenticate(services, credential=again.issued.token)
    assert caller.user == first.user
    async with services.uow_factory(write=False) as uow:
        linked = await uow.identities.list_for_user(first.user.id)
    assert [(found.provider, found.subject, found.email) for found in linked] == [
        ("corp", "s-1", email)
    ]


async def test_a_verified_email_links_and_an_unverified_one_does_not(
    services: ServiceDeps,
) -> None:
    email = new_email()
    user = await create_user(
        services, email=email, password="long enough password", email_verified=True
    )
    unverified = await log_in_with_provider(services, profile=profile(email=email, verified=False))
    assert unverified.outcome is AccountOutcome.CREATED
    assert unverified.user.email is None
    linked = await log_in_with_provider(services, profile=profile(email=f" {email.upper()}"))
    assert linked.outcome is AccountOutcome.LINKED
    assert linked.user == user


async def test_a_malformed_email_is_no_email(services: ServiceDeps) -> None:
    login = await log_in_with_provider(services, profile=profile(email="not an email"))
    assert login.user.email is None


@pytest.mark.parametrize("subject", ["", "x" * 256])
async def test_an_unusable_subject_is_refused(services: ServiceDeps, subject: str) -> None:
    bad = ProviderProfile(provider="corp", subject=subject, email=None, email_verified=False)
    with pytest.raises(OAuthFailed):
        await log_in_with_provider(services, profile=bad)


async def test_a_registered_unverified_email_is_not_linked(services: ServiceDeps) -> None:
    email = new_email()
    await create_user(services, email=email, password="long enough password")
    with pytest.raises(OAuthFailed, match="never verified"):
        await log_in_with_provider(services, profile=profile(email=email))
    async with services.uow_factory(write=False) as uow:
        user = await uow.users.get_by_email(email)
        assert user is not None
        assert await uow.identities.list_for_user(user.id) == []


async def test_a_user_made_from_a_verified_email_can_be_linked_by_another_provider(
    services: ServiceDeps,
) -> None:
    email = new_email()
    first = await log_in_with_provider(services, profile=profile(email=email))
    assert first.user.email_verified
    other = ProviderProfile(provider="github", subject="g-1", email=email, email_verified=True)
    second = await log_in_with_provider(services, profile=other)
    assert second.outcome is AccountOutcome.LINKED
    assert second.user.id == first.user.id
