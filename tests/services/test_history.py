"""The model's history is stored once per message: a turn writes only what it adds, the next
turn sees the whole conversation, and a failed or cancelled turn leaves nothing behind.

The model is the fake OpenAI server, so what each turn sends to the model is recorded.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tests.api.test_runs import new_session, send
from tests.services.test_runs import (
    Peer,
    fake_model_settings,
    running_app,
    wait_for_end,
)
from tests.support.databases import TestDatabase
from tests.support.fake_openai import FakeOpenAI, error, text


def said(request_messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(role, content) of what the model was sent, system prompts left out."""
    return [
        (message["role"], message["content"])
        for message in request_messages
        if message["role"] in ("user", "assistant")
    ]


async def test_each_turn_stores_only_its_own_messages_and_sends_the_whole_history(
    database: TestDatabase, tmp_path: Path
) -> None:
    turns = 6
    with FakeOpenAI() as server:
        server.script(*(text(f"answer {n}") for n in range(turns)))
        async with (
            running_app(database, tmp_path, **fake_model_settings(server)) as harness,
            Peer(database) as peer,
        ):
            session_id = await new_session(harness.client, harness.account)
            counts = []
            for n in range(turns):
                run_id = (await send(harness.client, harness.account, session_id, f"ask {n}"))[
                    "run"
                ]["id"]
                assert (await wait_for_end(harness, session_id, run_id))["status"] == "succeeded"
                counts.append(
                    await peer.count("SELECT count(*) FROM model_messages WHERE run_id = ?", run_id)
                )
            total = await peer.count(
                "SELECT count(*) FROM model_messages WHERE session_id = ?", session_id
            )
    # A request and a response per turn, whatever the session's length.
    assert counts == [2] * turns
    assert total == 2 * turns
    # Turn n was sent every earlier question and answer, in order.
    for n, request in enumerate(server.requests):
        expected = []
        for earlier in range(n):
            expected += [("user", f"ask {earlier}"), ("assistant", f"answer {earlier}")]
        assert said(request.messages) == [*expected, ("user", f"ask {n}")]


async def test_a_failed_turn_leaves_no_history_and_a_restart_reads_it_back(
    database: TestDatabase, tmp_path: Path
) -> None:
    """The next turn continues from the last successful one, whether its history was kept in
    memory or, after a restart, read from the database."""
    with FakeOpenAI() as server:
        server.script(text("first answer"), error(500), text("third answer"), text("fourth"))
        settings = fake_model_settings(server)
        async with running_app(database, tmp_path, **settings) as harness:
            owner = harness.account
            session_id = await new_session(harness.client, owner)
            for content in ("one", "two"):
                run_id = (await send(harness.client, owner, session_id, content))["run"]["id"]
                await wait_for_end(harness, session_id, run_id)
            run_id = (await send(harness.client, owner, session_id, "three"))["run"]["id"]
            assert (await wait_for_end(harness, session_id, run_id))["status"] == "succeeded"
        async with running_app(database, tmp_path, **settings) as restarted:
            harness = type(restarted)(restarted.app, restarted.client, owner, restarted.settings)
            run_id = (await send(harness.client, owner, session_id, "four"))["run"]["id"]
            assert (await wait_for_end(harness, session_id, run_id))["status"] == "succeeded"
            await asyncio.sleep(0)
    third, fourth = server.requests[2], server.requests[3]
    assert said(third.messages) == [
        ("user", "one"),
        ("assistant", "first answer"),
        ("user", "three"),
    ]
    assert said(fourth.messages) == [
        *said(third.messages),
        ("assistant", "third answer"),
        ("user", "four"),
    ]
