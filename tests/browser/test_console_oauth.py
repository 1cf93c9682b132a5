"""Signing in to the console with an OpenID Connect provider, in a real Chromium: the login
page shows one button per configured provider, and the round trip through the provider (a
real local one, tests/support/fake_idp.py) ends logged in on the console."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.browser.conftest import Console
from tests.support.fake_idp import FakeIdP, FakeUser

playwright_api = pytest.importorskip("playwright.async_api")
expect = playwright_api.expect

WAIT_MS = 15_000


@pytest.fixture
def idp() -> Iterator[FakeIdP]:
    with FakeIdP() as server:
        yield server


@pytest.fixture
def console_settings(idp: FakeIdP) -> dict[str, str]:
    return {"oauth_providers": json.dumps({"corp": idp.provider("oidc")})}


async def test_a_provider_button_signs_in_through_the_provider(
    browser: Any, console: Console, idp: FakeIdP
) -> None:
    idp.user = FakeUser(email="grace@example.test")
    context = await browser.new_context()
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        await page.goto(console.url)
        button = page.get_by_role("link", name="Sign in with corp")
        await expect(button).to_have_attribute("href", "/api/v1/auth/oauth/corp/login")
        await button.click()
        await expect(page.get_by_role("button", name="Log out")).to_be_visible(timeout=WAIT_MS)
        await expect(page.get_by_text("grace@example.test")).to_be_visible()
        assert page.url.startswith(console.url)
        assert len(idp.token_requests) == 1
        assert errors == []
    finally:
        await context.close()
