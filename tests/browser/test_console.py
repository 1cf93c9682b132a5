"""The web console in a real Chromium against a real server, on SQLite and PostgreSQL.

Every flow goes through the page as a person would use it: by the accessible names SPEC.md
gives its controls (fields `Email`, `Password`, `Message`, `Reason`, `Arguments`; buttons
`Log in`, `Register`, `Log out`, `New session`, `Send`, `Stop`, `Approve`, `Reject`,
`Edit arguments`; the conversation a `log`; a card an `article` named after its tool).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from tests.browser.conftest import Console
from tests.support.fake_openai import FakeOpenAI, text
from tests.support.tcp_proxy import tcp_proxy

playwright_api = pytest.importorskip("playwright.async_api")
expect = playwright_api.expect

PASSWORD = "correct horse battery staple"
WAIT_MS = 15_000
_people = itertools.count()


@asynccontextmanager
async def person(browser: Any) -> AsyncIterator[tuple[Any, list[str]]]:
    """A browser context of its own (its own cookies) with one page; console errors kept."""
    context = await browser.new_context()
    page = await context.new_page()
    errors: list[str] = []
    page.on(
        "console", lambda message: errors.append(message.text) if message.type == "error" else None
    )
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield page, errors
    finally:
        await context.close()


async def sign_up(page: Any, console: Console) -> str:
    """Register through the login page (which also logs in); the email used."""
    email = f"person{next(_people)}@example.test"
    await page.goto(console.url)
    await page.get_by_label("Email").fill(email)
    await page.get_by_label("Password").fill(PASSWORD)
    await page.get_by_role("button", name="Register").click()
    await expect(page.get_by_role("button", name="Log out")).to_be_visible(timeout=WAIT_MS)
    return email


async def new_session(page: Any) -> None:
    before = page.url
    await page.get_by_role("button", name="New session").click()
    await expect(page).not_to_have_url(before, timeout=WAIT_MS)
    await expect(conversation(page).get_by_role("article")).to_have_count(0)
    await expect(page.get_by_label("Message")).to_be_visible(timeout=WAIT_MS)


async def send(page: Any, content: str) -> None:
    await page.get_by_label("Message").fill(content)
    await page.get_by_role("button", name="Send").click()


def conversation(page: Any) -> Any:
    return page.get_by_role("log")


async def stored_messages(console: Console, page: Any) -> list[dict[str, Any]]:
    """The open session's messages, read through the API with the page's own cookie."""
    session_id = page.url.rsplit("/", 1)[-1]
    cookies = {c["name"]: c["value"] for c in await page.context.cookies()}
    async with httpx.AsyncClient(base_url=console.server.base_url, cookies=cookies) as http:
        answer = await http.get(f"/api/v1/sessions/{session_id}/messages")
        assert answer.status_code == 200, answer.text
        items: list[dict[str, Any]] = answer.json()["items"]
        return items


# --- login ----------------------------------------------------------------------------------------


async def test_register_log_out_and_log_in_again(browser: Any, console: Console) -> None:
    async with person(browser) as (page, errors):
        email = await sign_up(page, console)
        await expect(page.get_by_text(email)).to_be_visible()
        await page.get_by_role("button", name="Log out").click()
        await expect(page.get_by_role("button", name="Log in")).to_be_visible(timeout=WAIT_MS)
        await page.get_by_label("Password").fill("not the password at all")
        await page.get_by_label("Email").fill(email)
        await page.get_by_role("button", name="Log in").click()
        await expect(page.get_by_role("alert")).to_contain_text("not correct")
        await page.get_by_label("Password").fill(PASSWORD)
        await page.get_by_role("button", name="Log in").click()
        await expect(page.get_by_role("button", name="Log out")).to_be_visible(timeout=WAIT_MS)
        await page.reload()
        await expect(page.get_by_role("button", name="Log out")).to_be_visible(timeout=WAIT_MS)
        assert [e for e in errors if "401" not in e] == []


# --- chat -----------------------------------------------------------------------------------------


@pytest.fixture
def fake_model() -> Any:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def console_settings(fake_model: FakeOpenAI) -> dict[str, str]:
    # The default agent stays on the demo model; an agent on "openai:fake" reaches the fake.
    return {"openai_base_url": fake_model.base_url, "openai_api_key": "test-key"}


async def use_fake_agent(page: Any) -> None:
    """Create an agent on the fake provider through the Agents page, pick it for new sessions."""
    await page.get_by_role("link", name="Agents").click()
    await page.get_by_role("button", name="New agent").click()
    await page.get_by_label("Name").fill("slow one")
    await page.get_by_label("Model").fill("openai:fake")
    await page.get_by_role("button", name="Save agent").click()
    await expect(page.get_by_text("slow one")).to_be_visible(timeout=WAIT_MS)
    await page.get_by_role("link", name="Sessions").click()
    await page.get_by_label("Agent").select_option(label="slow one")


async def test_a_reply_streams_in_and_then_equals_the_stored_message(
    browser: Any, console: Console, fake_model: FakeOpenAI
) -> None:
    fake_model.script(text("first words", " and the rest", " of it", hold_after=1))
    async with person(browser) as (page, errors):
        await sign_up(page, console)
        await use_fake_agent(page)
        await new_session(page)
        await send(page, "tell me")
        # The provider holds after its first chunk: the page shows the reply so far.
        assert await asyncio.to_thread(fake_model.wait_until_holding, 15)
        live = page.get_by_role("article", name="Assistant (streaming)")
        await expect(live).to_contain_text("first words", timeout=WAIT_MS)
        await expect(live).not_to_contain_text("the rest")
        await expect(page.get_by_role("button", name="Stop")).to_be_visible()
        fake_model.go_on()
        reply = conversation(page).get_by_role("article", name="Assistant", exact=True)
        await expect(reply).to_have_text(
            re.compile("first words and the rest of it"), timeout=WAIT_MS
        )
        stored = await stored_messages(console, page)
        assert stored[-1]["content"] == "first words and the rest of it"
        await expect(conversation(page)).to_contain_text("first words and the rest of it")
        assert await conversation(page).get_by_text("first words").count() == 1
        assert errors == []


async def test_stop_cancels_a_reply_and_a_session_is_renamed_and_deleted(
    browser: Any, console: Console, fake_model: FakeOpenAI
) -> None:
    fake_model.script(text("never finished", " text", hold_after=1))
    async with person(browser) as (page, errors):
        page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
        await sign_up(page, console)
        await use_fake_agent(page)
        await new_session(page)
        await send(page, "go on for ever")
        assert await asyncio.to_thread(fake_model.wait_until_holding, 15)
        await page.get_by_role("button", name="Stop").click()
        await expect(page.get_by_role("status").filter(has_text="Run: cancelled")).to_be_visible(
            timeout=WAIT_MS
        )
        await expect(page.get_by_role("button", name="Stop")).to_have_count(0)
        fake_model.go_on()
        await expect(page.get_by_role("button", name="Send")).to_be_enabled()
        session_id = page.url.rsplit("/", 1)[-1]
        async with await page_api(console, page) as http:
            runs = (await http.get(f"/sessions/{session_id}")).json()
            assert runs["active_run_id"] is None
        # Rename, then delete (the confirmation is accepted).
        await page.get_by_role("button", name="Rename").click()
        await page.get_by_label("Title").fill("Kept for a moment")
        await page.get_by_role("button", name="Save").click()
        await expect(page.get_by_role("heading", name="Kept for a moment")).to_be_visible(
            timeout=WAIT_MS
        )
        await expect(page.locator(".session-list")).to_contain_text("Kept for a moment")
        await page.get_by_role("button", name="Delete session").click()
        await expect(page.get_by_text("Choose a session")).to_be_visible(timeout=WAIT_MS)
        await expect(page.locator(".session-list")).not_to_contain_text("Kept for a moment")
        async with await page_api(console, page) as http:
            assert (await http.get(f"/sessions/{session_id}")).status_code == 404
        assert [e for e in errors if "404" not in e] == []


async def test_reloading_mid_reply_shows_it_so_far_and_goes_on(
    browser: Any, console: Console, fake_model: FakeOpenAI
) -> None:
    fake_model.script(text("so far", " and then the end", hold_after=1))
    async with person(browser) as (page, errors):
        await sign_up(page, console)
        await use_fake_agent(page)
        await new_session(page)
        await send(page, "go")
        assert await asyncio.to_thread(fake_model.wait_until_holding, 15)
        await page.reload()
        live = page.get_by_role("article", name="Assistant (streaming)")
        await expect(live).to_contain_text("so far", timeout=WAIT_MS)
        fake_model.go_on()
        reply = conversation(page).get_by_role("article", name="Assistant", exact=True)
        await expect(reply).to_have_text(re.compile("so far and then the end"), timeout=WAIT_MS)
        assert await conversation(page).get_by_text("so far").count() == 1
        assert errors == []


async def test_a_dropped_connection_resumes_without_losing_or_repeating_text(
    browser: Any, console: Console, fake_model: FakeOpenAI
) -> None:
    """Every connection of the page is cut (reset) mid-reply, through a proxy the test owns:
    the page says it is reconnecting (not that the run stopped), resumes with Last-Event-ID,
    and ends with the whole reply once, equal to the stored message."""
    fake_model.script(text("before the cut", " after the cut", hold_after=1))
    async with tcp_proxy(console.server.port) as proxy, person(browser) as (page, errors):
        email = f"person{next(_people)}@example.test"
        await page.goto(proxy.base_url + "/")
        await page.get_by_label("Email").fill(email)
        await page.get_by_label("Password").fill(PASSWORD)
        await page.get_by_role("button", name="Register").click()
        await expect(page.get_by_role("button", name="Log out")).to_be_visible(timeout=WAIT_MS)
        await use_fake_agent(page)
        await new_session(page)
        await send(page, "talk")
        assert await asyncio.to_thread(fake_model.wait_until_holding, 15)
        live = page.get_by_role("article", name="Assistant (streaming)")
        await expect(live).to_contain_text("before the cut", timeout=WAIT_MS)
        assert proxy.cut() > 0
        await expect(page.get_by_text("Reconnecting…").first).to_be_visible(timeout=WAIT_MS)
        await expect(page.get_by_text("Run: running")).to_be_visible()
        await expect(page.get_by_text("Reconnecting…")).to_have_count(0, timeout=WAIT_MS)
        fake_model.go_on()
        reply = conversation(page).get_by_role("article", name="Assistant", exact=True)
        whole = "before the cut after the cut"
        await expect(reply).to_have_text(re.compile(whole), timeout=WAIT_MS)
        assert await conversation(page).get_by_text("before the cut").count() == 1
        stored = await stored_messages(console, page)
        assert stored[-1]["content"] == whole
        # What the browser logs about the cut connections is expected; nothing else.
        assert [e for e in errors if "ERR_" not in e and "network" not in e.lower()] == []


async def test_model_output_cannot_run_script_or_link_to_javascript(
    browser: Any, console: Console
) -> None:
    async with person(browser) as (page, errors):
        dialogs: list[str] = []
        page.on("dialog", lambda dialog: dialogs.append(dialog.message))
        await sign_up(page, console)
        await new_session(page)
        hostile = "<img src=x onerror=alert(1)> [click](javascript:alert(2)) **bold**"
        await send(page, hostile)  # the demo model says it back: "You said: ..."
        reply = conversation(page).get_by_role("article", name="Assistant", exact=True)
        await expect(reply).to_contain_text("<img src=x onerror=alert(1)>", timeout=WAIT_MS)
        await page.wait_for_timeout(300)
        assert dialogs == []
        assert await page.locator(".log img").count() == 0
        assert await page.locator('.log a[href^="javascript"]').count() == 0
        assert await reply.locator("strong").inner_text() == "bold"
        assert errors == []


# --- approvals ------------------------------------------------------------------------------------


def card(page: Any, tool: str = "write_file") -> Any:
    return page.get_by_role("article", name=f"Approval: {tool}")


async def test_edit_arguments_then_approve_and_the_reply_goes_on(
    browser: Any, console: Console
) -> None:
    async with person(browser) as (page, errors):
        await sign_up(page, console)
        await new_session(page)
        await send(page, '/tool write_file {"path": "proposed.txt", "content": "hi"}')
        waiting = card(page)
        await expect(waiting).to_be_visible(timeout=WAIT_MS)
        await expect(page.get_by_role("link", name="Approvals (1)")).to_be_visible(timeout=WAIT_MS)
        await waiting.get_by_role("button", name="Edit arguments").click()
        arguments = waiting.get_by_label("Arguments")
        await arguments.fill("{not json")
        await waiting.get_by_role("button", name="Approve").click()
        await expect(waiting.get_by_role("alert")).to_contain_text("not valid JSON")
        await arguments.fill(json.dumps({"path": 3}))
        await waiting.get_by_role("button", name="Approve").click()
        await expect(waiting.get_by_role("alert")).to_be_visible(timeout=WAIT_MS)  # the 422
        await arguments.fill(json.dumps({"path": "edited.txt", "content": "edited"}))
        await waiting.get_by_role("button", name="Approve").click()
        await expect(waiting).to_contain_text("Approved by you", timeout=WAIT_MS)
        await expect(waiting).to_contain_text("edited.txt")
        reply = conversation(page).get_by_role("article", name="Assistant", exact=True)
        await expect(reply.last).to_contain_text("edited.txt", timeout=WAIT_MS)
        await expect(page.get_by_role("link", name="Approvals (0)")).to_be_visible(timeout=WAIT_MS)
        session_id = page.url.rsplit("/", 1)[-1]
        assert (console.workspace / session_id / "edited.txt").read_text() == "edited"
        assert not (console.workspace / session_id / "proposed.txt").exists()
        assert [e for e in errors if "422" not in e] == []


async def test_reject_with_a_reason(browser: Any, console: Console) -> None:
    async with person(browser) as (page, errors):
        await sign_up(page, console)
        await new_session(page)
        await send(page, '/tool write_file {"path": "no.txt", "content": "x"}')
        waiting = card(page)
        await expect(waiting).to_be_visible(timeout=WAIT_MS)
        await waiting.get_by_label("Reason").fill("not today")
        await waiting.get_by_role("button", name="Reject").click()
        await expect(waiting).to_contain_text("Rejected by you", timeout=WAIT_MS)
        await expect(waiting).to_contain_text("not today")
        reply = conversation(page).get_by_role("article", name="Assistant", exact=True)
        await expect(reply.last).to_contain_text("not today", timeout=WAIT_MS)
        session_id = page.url.rsplit("/", 1)[-1]
        assert not (console.workspace / session_id / "no.txt").exists()
        assert errors == []


async def test_a_decision_in_one_tab_updates_the_card_in_another(
    browser: Any, console: Console
) -> None:
    async with person(browser) as (first, errors):
        await sign_up(first, console)
        await new_session(first)
        await send(first, '/tool write_file {"path": "t.txt", "content": "x"}')
        await expect(card(first)).to_be_visible(timeout=WAIT_MS)
        second = await first.context.new_page()  # the same login, another tab
        await second.goto(first.url)
        await expect(card(second)).to_be_visible(timeout=WAIT_MS)
        await card(first).get_by_role("button", name="Approve").click()
        await expect(card(second)).to_contain_text("Approved by you", timeout=WAIT_MS)
        reply = conversation(second).get_by_role("article", name="Assistant", exact=True)
        await expect(reply.last).to_contain_text("t.txt", timeout=WAIT_MS)
        assert errors == []


async def test_the_inbox_lists_and_decides_approvals_across_sessions_by_keyboard(
    browser: Any, console: Console
) -> None:
    async with person(browser) as (page, errors):
        await sign_up(page, console)
        for name in ("one.txt", "two.txt"):
            await new_session(page)
            await send(page, f'/tool write_file {{"path": "{name}", "content": "x"}}')
            await expect(card(page)).to_be_visible(timeout=WAIT_MS)
        link = page.get_by_role("link", name="Approvals (2)")
        await expect(link).to_be_visible(timeout=WAIT_MS)
        await link.focus()
        await page.keyboard.press("Enter")
        cards = page.get_by_role("article", name="Approval: write_file")
        await expect(cards).to_have_count(2, timeout=WAIT_MS)
        await expect(cards.first).to_contain_text("one.txt")  # oldest first
        # Keyboard only: focus the first card's Approve and press Enter.
        await cards.first.get_by_role("button", name="Approve").focus()
        await page.keyboard.press("Enter")
        await expect(cards.first).to_contain_text("Approved by you", timeout=WAIT_MS)
        await expect(page.get_by_role("link", name="Approvals (1)")).to_be_visible(timeout=WAIT_MS)
        assert errors == []


async def test_two_people_never_see_each_others_sessions_or_approvals(
    browser: Any, console: Console
) -> None:
    async with person(browser) as (alice, alice_errors), person(browser) as (bob, bob_errors):
        await sign_up(alice, console)
        await new_session(alice)
        await send(alice, '/tool write_file {"path": "secret.txt", "content": "alice"}')
        await expect(card(alice)).to_be_visible(timeout=WAIT_MS)
        await sign_up(bob, console)
        await expect(bob.get_by_role("link", name="Approvals (0)")).to_be_visible(timeout=WAIT_MS)
        await expect(bob.get_by_text("Choose a session")).to_be_visible()
        assert await bob.locator(".session-list li").count() == 0
        await bob.get_by_role("link", name=re.compile("Approvals")).click()
        await expect(bob.get_by_text("Nothing waits for a decision.")).to_be_visible(
            timeout=WAIT_MS
        )
        await bob.goto(alice.url)  # Alice's session by its address: not found for Bob
        await expect(bob.get_by_role("alert").first).to_contain_text("not found", timeout=WAIT_MS)
        assert "secret.txt" not in await bob.content()
        assert alice_errors == []
        assert [e for e in bob_errors if "404" not in e] == []


async def test_a_waiting_card_survives_a_server_restart(browser: Any, console: Console) -> None:
    async with person(browser) as (page, errors):
        await sign_up(page, console)
        await new_session(page)
        await send(page, '/tool write_file {"path": "later.txt", "content": "x"}')
        await expect(card(page)).to_be_visible(timeout=WAIT_MS)
        session_path = page.url.split("/#", 1)[1]
        console.restart()
        await page.goto(f"{console.url}#{session_path}")
        waiting = card(page)
        await expect(waiting).to_be_visible(timeout=WAIT_MS)
        await waiting.get_by_role("button", name="Approve").click()
        reply = conversation(page).get_by_role("article", name="Assistant", exact=True)
        await expect(reply.last).to_contain_text("later.txt", timeout=WAIT_MS)
        assert [e for e in errors if "ERR_CONNECTION_REFUSED" not in e] == []


async def page_api(console: Console, page: Any) -> httpx.AsyncClient:
    """A client of the API with the page's own login cookie and CSRF token."""
    cookies = {c["name"]: c["value"] for c in await page.context.cookies()}
    return httpx.AsyncClient(
        base_url=console.server.base_url + "/api/v1",
        cookies=cookies,
        headers={"X-CSRF-Token": cookies["countersign_csrf"]},
        timeout=WAIT_MS / 1000,
    )


async def turn(http: httpx.AsyncClient, session_id: str, content: str) -> None:
    """One message and its whole reply (the stream read to its end)."""
    async with http.stream(
        "POST",
        f"/sessions/{session_id}/messages",
        json={"content": content},
        headers={"Accept": "text/event-stream"},
    ) as answer:
        assert answer.status_code == 200
        async for _ in answer.aiter_bytes():
            pass


async def test_history_pages_upward_and_keeps_each_replys_tool_calls(
    browser: Any, console: Console
) -> None:
    async with person(browser) as (page, errors):
        await sign_up(page, console)
        async with await page_api(console, page) as http:
            session_id = (await http.post("/sessions", json={})).json()["id"]
            for index in range(25):
                await turn(http, session_id, f"message number {index}")
            await turn(http, session_id, '/tool list_files {"path": "."}')  # runs by itself
        await page.goto(f"{console.url}#/sessions/{session_id}")
        articles = conversation(page).get_by_role("article")
        await expect(articles).to_have_count(50, timeout=WAIT_MS)  # the newest page only
        await expect(conversation(page)).not_to_contain_text("message number 0\n")
        earlier = page.get_by_role("button", name="Earlier messages")
        await earlier.click()
        await expect(articles).to_have_count(52, timeout=WAIT_MS)
        await expect(articles.first).to_contain_text("message number 0")
        await expect(earlier).to_have_count(0)
        # The newest reply's tool call, read from its run when opened.
        newest = conversation(page).get_by_role("article", name="Assistant", exact=True).last
        await newest.get_by_text("Tool calls").click()
        await expect(newest).to_contain_text("Tool list_files", timeout=WAIT_MS)
        first_reply = conversation(page).get_by_role("article", name="Assistant", exact=True)
        await first_reply.first.get_by_text("Tool calls").click()
        await expect(first_reply.first).to_contain_text("No tool calls", timeout=WAIT_MS)
        assert errors == []


async def test_a_new_agent_waits_for_the_agents_list_and_offers_every_tool(
    browser: Any, console: Console
) -> None:
    """The list of agents is slow to come: "New agent" waits for it, so the form offers the
    default agent's tools (before, a quick click opened a form with no tool at all)."""
    async with person(browser) as (page, errors):
        await sign_up(page, console)
        arrived = asyncio.Event()

        async def slow_list(route: Any) -> None:
            await asyncio.sleep(1.5)
            await route.continue_()
            arrived.set()

        await page.route("**/api/v1/agents?limit=100", slow_list)
        await page.get_by_role("link", name="Agents").click()
        new_agent = page.get_by_role("button", name="New agent")
        await expect(new_agent).to_be_disabled(timeout=WAIT_MS)
        await new_agent.click()
        assert arrived.is_set()
        form = page.get_by_role("form", name="New agent")
        await expect(form.get_by_label("shell", exact=True)).to_be_visible(timeout=WAIT_MS)
        assert errors == []


async def test_agents_are_created_and_edited_with_errors_shown_at_the_field(
    browser: Any, console: Console
) -> None:
    async with person(browser) as (page, errors):
        await sign_up(page, console)
        await page.get_by_role("link", name="Agents").click()
        await page.get_by_role("button", name="New agent").click()
        form = page.get_by_role("form", name="New agent")
        await form.get_by_label("Name").fill("careful")
        await form.get_by_label("Model").fill("nosuchprovider:x")
        await form.get_by_role("button", name="Save agent").click()
        await expect(form.get_by_label("Model")).to_have_attribute(
            "aria-invalid", "true", timeout=WAIT_MS
        )
        await expect(form.get_by_role("alert")).to_contain_text("model")
        await form.get_by_label("Model").fill("demo")
        await form.get_by_label("shell", exact=True).uncheck()
        await form.get_by_label("Policy for write_file").select_option("deny")
        await form.get_by_role("button", name="Save agent").click()
        listed = page.locator("li.card", has_text="careful")
        await expect(listed).to_contain_text("write_file: deny", timeout=WAIT_MS)
        await expect(listed).not_to_contain_text("shell")
        # Rules set through the API survive an edit in the page.
        rule = {"when": {"path": {"glob": "notes/*"}}, "policy": "auto"}
        async with await page_api(console, page) as http:
            agents = (await http.get("/agents")).json()["items"]
            [careful] = [agent for agent in agents if agent["name"] == "careful"]
            tools = [
                {**tool, "rules": [rule]} if tool["name"] == "write_file" else tool
                for tool in careful["tools"]
            ]
            patched = await http.patch(f"/agents/{careful['id']}", json={"tools": tools})
            assert patched.status_code == 200, patched.text
        await page.reload()
        await expect(listed).to_contain_text("write_file: deny (+1 rules)", timeout=WAIT_MS)
        await listed.get_by_role("button", name="Edit").click()
        editing = page.get_by_role("form", name="Edit agent careful")
        await editing.get_by_label("Instructions").fill("Answer in one line.")
        await editing.get_by_role("button", name="Save agent").click()
        await expect(listed).to_contain_text("Answer in one line.", timeout=WAIT_MS)
        async with await page_api(console, page) as http:
            agents = (await http.get("/agents")).json()["items"]
        [stored] = [agent for agent in agents if agent["name"] == "careful"]
        assert stored["instructions"] == "Answer in one line."
        assert stored["model"] == "demo"
        assert {tool["name"]: tool["policy"] for tool in stored["tools"]} == {
            "list_files": "auto",
            "read_file": "auto",
            "write_file": "deny",
        }
        [write_file] = [tool for tool in stored["tools"] if tool["name"] == "write_file"]
        assert write_file["rules"] == [rule]
        # Editing one agent, then another: the form shows the other one's values.
        async with await page_api(console, page) as http:
            created = await http.post("/agents", json={"name": "second", "model": "demo"})
            assert created.status_code == 201, created.text
        await page.reload()
        await listed.get_by_role("button", name="Edit").click()
        second = page.locator("li.card", has_text="second")
        await second.get_by_role("button", name="Edit").click()
        other = page.get_by_role("form", name="Edit agent second")
        await expect(other.get_by_label("Name")).to_have_value("second", timeout=WAIT_MS)
        assert [e for e in errors if "422" not in e] == []


async def test_an_api_key_is_shown_once_listed_with_its_last_use_and_deleted(
    browser: Any, console: Console
) -> None:
    async with person(browser) as (page, errors):
        page.on("dialog", lambda dialog: asyncio.ensure_future(dialog.accept()))
        await sign_up(page, console)
        await page.get_by_role("link", name="API keys").click()
        await page.get_by_label("Key name").fill("laptop")
        await page.get_by_role("button", name="Create key").click()
        shown = page.locator("pre.secret")
        await expect(shown).to_contain_text("cs_", timeout=WAIT_MS)
        secret = (await shown.text_content() or "").strip()
        row = page.get_by_role("row", name=re.compile("laptop"))
        await expect(row).to_contain_text("never")
        async with httpx.AsyncClient(base_url=console.server.base_url) as http:
            used = await http.get("/api/v1/me", headers={"Authorization": f"Bearer {secret}"})
            assert used.status_code == 200
            await page.reload()
            await expect(row).to_be_visible(timeout=WAIT_MS)
            await expect(row).not_to_contain_text("never")
            await expect(page.locator("pre.secret")).to_have_count(0)  # shown only once
            await row.get_by_role("button", name="Delete key laptop").click()
            await expect(row).to_have_count(0, timeout=WAIT_MS)
            gone = await http.get("/api/v1/me", headers={"Authorization": f"Bearer {secret}"})
            assert gone.status_code == 401
        assert errors == []


async def test_an_expired_login_returns_to_login_and_keeps_the_draft(
    browser: Any, console: Console
) -> None:
    async with person(browser) as (page, errors):
        email = await sign_up(page, console)
        await new_session(page)
        await page.get_by_label("Message").fill("half a thought I must not lose")
        # The login ends elsewhere (as when it expires): the page's cookie is no longer valid.
        async with await page_api(console, page) as http:
            assert (await http.post("/auth/logout")).status_code == 204
        # Sending finds the login gone (unless a refresh of the page found it first: the same
        # end, the login page, which the Send button is then no longer on).
        with contextlib.suppress(playwright_api.Error):
            await page.get_by_role("button", name="Send").click(timeout=5_000)
        await expect(page.get_by_role("button", name="Log in")).to_be_visible(timeout=WAIT_MS)
        await page.get_by_label("Email").fill(email)
        await page.get_by_label("Password").fill(PASSWORD)
        await page.get_by_role("button", name="Log in").click()
        await expect(page.get_by_label("Message")).to_have_value(
            "half a thought I must not lose", timeout=WAIT_MS
        )
        assert [e for e in errors if "401" not in e] == []


# --- headers --------------------------------------------------------------------------------------


async def test_the_chat_and_a_card_fit_a_375_pixel_screen(browser: Any, console: Console) -> None:
    async with person(browser) as (page, errors):
        await page.set_viewport_size({"width": 375, "height": 740})
        await sign_up(page, console)
        await new_session(page)
        await send(page, '/tool write_file {"path": "narrow.txt", "content": "x"}')
        await expect(card(page)).to_be_visible(timeout=WAIT_MS)
        width = await page.evaluate("document.documentElement.scrollWidth")
        assert width <= 375, f"the page is {width} px wide at 375 px"
        await card(page).get_by_role("button", name="Approve").scroll_into_view_if_needed()
        box = await card(page).get_by_role("button", name="Approve").bounding_box()
        assert box is not None
        assert box["x"] >= 0
        assert box["x"] + box["width"] <= 375
        assert errors == []


async def test_the_page_and_its_files_carry_security_and_cache_headers(
    browser: Any, console: Console
) -> None:
    async with person(browser) as (page, errors):
        answer = await page.goto(console.url)
        headers = answer.headers
        policy = headers["content-security-policy"]
        assert "script-src 'self'" in policy
        assert "frame-ancestors 'none'" in policy
        assert "unsafe-inline" not in policy
        assert "unsafe-eval" not in policy
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["referrer-policy"] == "no-referrer"
        assert headers["cache-control"] == "no-cache"
        html = await answer.text()
        [script] = re.findall(r'src="(/static/[0-9a-f]{12}/app\.js)"', html)
        async with httpx.AsyncClient(base_url=console.server.base_url) as http:
            asset = await http.get(script)
        assert asset.status_code == 200
        assert asset.headers["content-encoding"] == "gzip"
        assert "immutable" in asset.headers["cache-control"]
        assert "frame-ancestors 'none'" in asset.headers["content-security-policy"]
        await expect(page.get_by_role("button", name="Log in")).to_be_visible(timeout=WAIT_MS)
        assert errors == []
