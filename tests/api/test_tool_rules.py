"""`GET /tools`, and argument rules on an agent's tools through the API, on both databases:
saved and shown, refused with a 422 naming the rule (nothing written), and applied to real
runs of the demo model (a rule that lets a call run, one that asks and says so, a deny rule
checked again on arguments a person edited)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from countersign.config import Settings
from tests.api.test_errors import MakeAccount
from tests.api.test_runs import events, send
from tests.conftest import Account

API = "/api/v1"


async def make_agent(
    client: httpx.AsyncClient, account: Account, tools: list[dict[str, Any]]
) -> httpx.Response:
    return await client.post(
        f"{API}/agents", json={"name": "ruled", "tools": tools}, headers=account.headers
    )


async def session_with(client: httpx.AsyncClient, account: Account, agent_id: str) -> str:
    answer = await client.post(
        f"{API}/sessions", json={"agent_id": agent_id}, headers=account.headers
    )
    assert answer.status_code == 201, answer.text
    session_id: str = answer.json()["id"]
    return session_id


async def test_the_tools_are_listed_with_their_arguments_and_default_policies(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    account = await make_account()
    assert (await client.get(f"{API}/tools")).status_code == 401
    answer = await client.get(f"{API}/tools", headers=account.headers)
    assert answer.status_code == 200, answer.text
    tools = {tool["name"]: tool for tool in answer.json()["items"]}
    assert set(tools) == {"list_files", "read_file", "write_file", "shell"}
    shell = tools["shell"]
    assert (shell["source"], shell["server"], shell["default_policy"]) == ("builtin", None, "ask")
    assert shell["parameters"]["properties"]["command"]["type"] == "string"
    assert shell["parameters"]["required"] == ["command"]
    assert tools["read_file"]["default_policy"] == "auto"
    assert all(tool["description"] for tool in tools.values())


async def test_rules_are_saved_shown_and_replaced_with_the_tools(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    account = await make_account()
    rules = [
        {"when": {"command": {"prefix": "git status"}}, "policy": "auto"},
        {"when": {"command": {"regex": "rm .*"}}, "policy": "deny"},
    ]
    created = await make_agent(
        client, account, [{"name": "shell", "policy": "ask", "rules": rules}]
    )
    assert created.status_code == 201, created.text
    agent = created.json()
    assert agent["tools"] == [{"name": "shell", "policy": "ask", "rules": rules}]
    fetched = await client.get(f"{API}/agents/{agent['id']}", headers=account.headers)
    assert fetched.json()["tools"] == agent["tools"]
    changed = await client.patch(
        f"{API}/agents/{agent['id']}",
        json={"tools": [{"name": "shell", "policy": "deny"}]},
        headers=account.headers,
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["tools"] == [{"name": "shell", "policy": "deny"}]  # no rules: left out


async def test_a_rule_that_could_never_work_is_a_422_naming_it_and_nothing_is_written(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    account = await make_account()
    before = (await client.get(f"{API}/agents", headers=account.headers)).json()["items"]
    cases = [
        ({"cmd": {"prefix": "git"}}, "tool shell, rule 2: the tool has no argument 'cmd'"),
        ({"command": {"regex": "(?<=x)y"}}, "tool shell, rule 2: the regex for 'command'"),
        ({"command": {"prefix": "a", "glob": "b"}}, "exactly one of equals, prefix"),
        ({}, "when"),
    ]
    for when, message in cases:
        rules = [
            {"when": {"command": {"prefix": "ls"}}, "policy": "auto"},
            {"when": when, "policy": "auto"},
        ]
        answer = await make_agent(
            client, account, [{"name": "shell", "policy": "ask", "rules": rules}]
        )
        assert answer.status_code == 422, answer.text
        assert message in answer.json()["error"]["message"], answer.json()
    after = (await client.get(f"{API}/agents", headers=account.headers)).json()["items"]
    assert after == before


async def test_a_rule_lets_a_command_run_and_a_crafted_one_still_asks(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    account = await make_account()
    rules = [{"when": {"command": {"prefix": "echo"}}, "policy": "auto"}]
    agent = await make_agent(client, account, [{"name": "shell", "policy": "ask", "rules": rules}])
    session_id = await session_with(client, account, agent.json()["id"])

    ran = await send(client, account, session_id, '/tool shell {"command": "echo hello"}')
    names = [event.event for event in await events(client, account, session_id, ran["run"]["id"])]
    assert "approval.required" not in names
    assert names[-1] == "run.finished"

    asked = await send(client, account, session_id, '/tool shell {"command": "ls; echo hi"}')
    waiting = await events(client, account, session_id, asked["run"]["id"])
    assert waiting[-1].event == "approval.required"
    assert waiting[-1].data["asked_because"] == "policy ask"


async def test_an_asking_rule_is_named_in_the_approval_and_its_event(
    client: httpx.AsyncClient, make_account: MakeAccount
) -> None:
    account = await make_account()
    rules = [{"when": {"path": {"glob": "secret/**"}}, "policy": "ask"}]
    agent = await make_agent(
        client, account, [{"name": "write_file", "policy": "auto", "rules": rules}]
    )
    session_id = await session_with(client, account, agent.json()["id"])
    started = await send(
        client, account, session_id, '/tool write_file {"path": "secret/a/b.txt", "content": "x"}'
    )
    waiting = await events(client, account, session_id, started["run"]["id"])
    required = waiting[-1]
    assert required.event == "approval.required"
    because = "rule 1: path glob 'secret/**' → ask"
    assert required.data["asked_because"] == because
    # No tool.call was journaled before the person was asked.
    assert "tool.call" not in [event.event for event in waiting]
    pending = await client.get(
        f"{API}/sessions/{session_id}/pending-approvals", headers=account.headers
    )
    assert pending.json()["items"][0]["asked_because"] == because


async def test_a_deny_rule_is_checked_again_on_arguments_a_person_edited(
    client: httpx.AsyncClient, make_account: MakeAccount, settings: Settings
) -> None:
    account = await make_account()
    rules = [{"when": {"path": {"prefix": "protected/"}}, "policy": "deny"}]
    agent = await make_agent(
        client, account, [{"name": "write_file", "policy": "ask", "rules": rules}]
    )
    session_id = await session_with(client, account, agent.json()["id"])
    started = await send(
        client, account, session_id, '/tool write_file {"path": "ok.txt", "content": "x"}'
    )
    waiting = await events(client, account, session_id, started["run"]["id"])
    approval_id = waiting[-1].data["approval_id"]
    decided = await client.post(
        f"{API}/sessions/{session_id}/approvals/{approval_id}",
        json={
            "decision": "approve",
            "arguments": {"path": "protected/x.txt", "content": "x"},
        },
        headers=account.headers,
    )
    assert decided.status_code == 200, decided.text
    rest = await events(client, account, session_id, started["run"]["id"], after=waiting[-1].id)
    result = next(event for event in rest if event.event == "tool.result")
    # The model hears that it is not allowed, not which rule to steer around.
    assert result.data["output"] == (
        "The tool write_file is not allowed with these arguments by this agent's rules."
    )
    workspace = Path(settings.workspace_root) / session_id
    assert not (workspace / "protected" / "x.txt").exists()
    assert not (workspace / "ok.txt").exists()
