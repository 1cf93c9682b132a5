"""Account services: password rules, logins and their tokens (on a clock the test moves),
API keys, and the boundary rule (no row outlives a service call)."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from importlib import resources

import pytest

from countersign.domain.errors import Forbidden, InvalidInput, NotFound, Unauthenticated
from countersign.domain.models import AccessToken, ApiKeyId, User, UserId
from countersign.security import hash_token, is_common_password
from countersign.services import ServiceDeps, accounts
from countersign.services.accounts import (
    LAST_USED_RESOLUTION,
    PASSWORD_MIN_LENGTH,
    CredentialKind,
)
from tests.conftest import alive_rows

PASSWORD = "violet stapler orbit"


@dataclasses.dataclass
class MovableClock:
    """A clock the test sets."""

    at: datetime

    def now(self) -> datetime:
        return self.at

    def advance(self, delta: timedelta) -> None:
        self.at += delta


@pytest.fixture
def clock() -> MovableClock:
    return MovableClock(datetime(2030, 1, 1, 12, 0, tzinfo=UTC))


@pytest.fixture
def deps(services: ServiceDeps, clock: MovableClock) -> ServiceDeps:
    """The app's services on a clock the test controls."""
    return dataclasses.replace(services, clock=clock)


async def new_user(deps: ServiceDeps) -> User:
    return await accounts.create_user(
        deps, email=f"{uuid.uuid4().hex[:10]}@example.test", password=PASSWORD
    )


async def stored_token(deps: ServiceDeps, token: str) -> AccessToken | None:
    async with deps.uow_factory(write=False) as uow:
        return await uow.access_tokens.find_by_hash(hash_token(token))


# --- passwords (no database) -----------------------------------------------------------------


@pytest.mark.parametrize(
    "password",
    [
        "short",
        "x" * (PASSWORD_MIN_LENGTH - 1),
        "x" * 1025,
        "1234567890",
        "QWERTYUIOP",
        "manchester",
    ],
)
def test_weak_passwords_are_refused(password: str) -> None:
    with pytest.raises(InvalidInput):
        accounts.check_password(password)


@pytest.mark.parametrize("password", ["x" * PASSWORD_MIN_LENGTH, PASSWORD, "é" * 1024])
def test_good_passwords_pass(password: str) -> None:
    accounts.check_password(password, email="someone@example.test")


def test_the_email_or_its_name_is_not_a_password() -> None:
    for password in ("someone.long@example.test", "SOMEONE.LONG"):
        with pytest.raises(InvalidInput, match="email"):
            accounts.check_password(password, email="someone.long@example.test")


def test_the_common_password_list_is_small_and_all_long() -> None:
    """About a thousand entries, each long enough to pass the length rule on its own."""
    text = resources.files("countersign").joinpath("common_passwords.txt").read_text("utf-8")
    entries = text.splitlines()
    assert 900 <= len(set(entries)) == len(entries) <= 1100
    assert all(len(entry) >= PASSWORD_MIN_LENGTH for entry in entries)
    assert all(is_common_password(entry.upper()) for entry in entries)
    assert is_common_password("Password123")
    assert not is_common_password(PASSWORD)


# --- logins and tokens -------------------------------------------------------------------------


async def test_login_issues_a_token_for_the_settings_ttl(
    deps: ServiceDeps, clock: MovableClock
) -> None:
    user = await new_user(deps)
    assert user.email is not None
    issued = await accounts.log_in(deps, email=user.email.upper(), password=PASSWORD)
    assert issued.user_id == user.id
    assert issued.expires_at == clock.at + timedelta(seconds=deps.settings.access_token_ttl_seconds)
    stored = await stored_token(deps, issued.token)
    assert stored is not None
    assert stored.user_id == user.id
    assert stored.created_at == clock.at
    assert stored.revoked_at is None
    caller = await accounts.authenticate(deps, credential=issued.token)
    assert caller.user == user
    assert caller.credential is CredentialKind.ACCESS_TOKEN
    assert caller.credential_id == stored.id


async def test_failed_logins_look_alike(deps: ServiceDeps) -> None:
    user = await new_user(deps)
    assert user.email is not None
    async with deps.uow_factory() as uow:
        provider_made = User(
            id=UserId(uuid.uuid4()), email="provider@example.test", created_at=deps.clock.now()
        )
        await uow.users.add(provider_made, password_hash=None)
        await uow.commit()
    messages = set()
    for email, password in (
        (user.email, "wrong password here"),
        ("nobody@example.test", PASSWORD),
        ("provider@example.test", PASSWORD),
        ("not an email", PASSWORD),
    ):
        with pytest.raises(Unauthenticated) as caught:
            await accounts.log_in(deps, email=email, password=password)
        messages.add(caught.value.message)
    assert messages == {accounts.BAD_LOGIN}


async def test_a_token_expires_at_its_ttl(deps: ServiceDeps, clock: MovableClock) -> None:
    user = await new_user(deps)
    issued = await accounts.issue_access_token(deps, user_id=user.id)
    clock.at = issued.expires_at - timedelta(microseconds=1)
    await accounts.authenticate(deps, credential=issued.token)
    clock.at = issued.expires_at
    with pytest.raises(Unauthenticated, match="expired"):
        await accounts.authenticate(deps, credential=issued.token)


async def test_last_use_is_written_at_most_once_a_minute(
    deps: ServiceDeps, clock: MovableClock
) -> None:
    user = await new_user(deps)
    issued = await accounts.issue_access_token(deps, user_id=user.id)
    first = clock.at
    await accounts.authenticate(deps, credential=issued.token)
    assert (stored := await stored_token(deps, issued.token)) is not None
    assert stored.last_used_at == first
    clock.advance(LAST_USED_RESOLUTION / 2)
    await accounts.authenticate(deps, credential=issued.token)
    assert (stored := await stored_token(deps, issued.token)) is not None
    assert stored.last_used_at == first
    clock.advance(LAST_USED_RESOLUTION)
    await accounts.authenticate(deps, credential=issued.token)
    assert (stored := await stored_token(deps, issued.token)) is not None
    assert stored.last_used_at == clock.at


async def test_logout_revokes_only_that_token(deps: ServiceDeps, clock: MovableClock) -> None:
    user = await new_user(deps)
    one = await accounts.issue_access_token(deps, user_id=user.id)
    two = await accounts.issue_access_token(deps, user_id=user.id)
    caller = await accounts.authenticate(deps, credential=one.token)
    await accounts.log_out(deps, caller=caller)
    with pytest.raises(Unauthenticated, match="revoked"):
        await accounts.authenticate(deps, credential=one.token)
    assert (stored := await stored_token(deps, one.token)) is not None
    assert stored.revoked_at == clock.at
    await accounts.log_out(deps, caller=caller)  # a second logout changes nothing
    assert (stored := await stored_token(deps, one.token)) is not None
    assert stored.revoked_at == clock.at
    assert (await accounts.authenticate(deps, credential=two.token)).user == user


async def test_logout_does_not_touch_api_keys(deps: ServiceDeps) -> None:
    user = await new_user(deps)
    _key, secret = await accounts.issue_api_key(deps, actor=user.id, name="k")
    caller = await accounts.authenticate(deps, credential=secret)
    assert caller.credential is CredentialKind.API_KEY
    with pytest.raises(InvalidInput):
        await accounts.log_out(deps, caller=caller)
    assert (await accounts.authenticate(deps, credential=secret)).user == user


async def test_a_login_sweeps_the_users_expired_tokens(
    deps: ServiceDeps, clock: MovableClock
) -> None:
    user, other = await new_user(deps), await new_user(deps)
    old = await accounts.issue_access_token(deps, user_id=user.id)
    others_old = await accounts.issue_access_token(deps, user_id=other.id)
    clock.at = old.expires_at
    fresh = await accounts.issue_access_token(deps, user_id=user.id)
    assert await stored_token(deps, old.token) is None
    assert await stored_token(deps, fresh.token) is not None
    assert await stored_token(deps, others_old.token) is not None  # not this user's


@pytest.mark.parametrize("credential", ["", "x", "a" * 513, "cs_0123456789ab_nope", "é" * 20])
async def test_unknown_credentials_are_refused(deps: ServiceDeps, credential: str) -> None:
    with pytest.raises(Unauthenticated):
        await accounts.authenticate(deps, credential=credential)


async def test_registration_follows_the_setting(deps: ServiceDeps) -> None:
    closed = dataclasses.replace(
        deps, settings=deps.settings.model_copy(update={"open_registration": False})
    )
    with pytest.raises(Forbidden):
        await accounts.register_user(closed, email="closed@example.test", password=PASSWORD)
    async with deps.uow_factory(write=False) as uow:
        assert await uow.users.get_by_email("closed@example.test") is None
    user = await accounts.register_user(deps, email="Open@Example.test", password=PASSWORD)
    assert user.email == "open@example.test"


# --- API keys ----------------------------------------------------------------------------------


async def test_api_keys_belong_to_their_owner(deps: ServiceDeps) -> None:
    owner, other = await new_user(deps), await new_user(deps)
    key, secret = await accounts.issue_api_key(deps, actor=owner.id, name="  ci  ")
    assert key.name == "ci"
    with pytest.raises(NotFound, match="API key not found"):
        await accounts.delete_api_key(deps, actor=other.id, key_id=key.id)
    with pytest.raises(NotFound):
        await accounts.delete_api_key(deps, actor=owner.id, key_id=ApiKeyId(uuid.uuid4()))
    page = await accounts.list_api_keys(deps, actor=other.id, cursor=None, limit=10)
    assert page.items == []
    assert (await accounts.authenticate(deps, credential=secret)).user == owner
    await accounts.delete_api_key(deps, actor=owner.id, key_id=key.id)
    with pytest.raises(Unauthenticated):
        await accounts.authenticate(deps, credential=secret)


async def test_no_row_outlives_an_account_service_call(deps: ServiceDeps) -> None:
    """Invariant 1 for the account services added here."""
    results: list[object] = []

    async def check(result: object) -> None:
        results.append(result)
        assert alive_rows() == []

    user = await new_user(deps)
    assert user.email is not None
    await check(user)
    await check(await accounts.register_user(deps, email="gc2@example.test", password=PASSWORD))
    issued = await accounts.log_in(deps, email=user.email, password=PASSWORD)
    await check(issued)
    caller = await accounts.authenticate(deps, credential=issued.token)
    await check(caller)
    await check(await accounts.log_out(deps, caller=caller))
    key, _secret = await accounts.issue_api_key(deps, actor=user.id, name="gc")
    await check(key)
    await check(await accounts.list_api_keys(deps, actor=user.id, cursor=None, limit=5))
    await check(await accounts.delete_api_key(deps, actor=user.id, key_id=key.id))
    for result in (user, issued, caller, key):
        assert dataclasses.is_dataclass(result)
        assert type(result).__dataclass_params__.frozen  # type: ignore[attr-defined]
