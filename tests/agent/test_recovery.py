"""A turn rebuilt from the journal after an attempt stopped inside its tool calls: calls that
finished keep their results, a call whose outcome is unknown waits for a person, and nothing
runs again by itself (SPEC invariant 6)."""

from __future__ import annotations

from pathlib import Path

from pydantic_ai import DeferredToolRequests, DeferredToolResults, ToolDenied
from pydantic_ai.messages import ModelRequest, ModelResponse, ToolReturnPart, UserPromptPart

from countersign.agent.runner import JournaledCall, recovered_turn
from countersign.domain.models import OUTCOME_UNKNOWN
from tests.agent.test_tools import Turn

WRITE_A = ("write_file", {"path": "a.txt", "content": "A"})
WRITE_B = ("write_file", {"path": "b.txt", "content": "B"})


def journal(*, b_finished: bool) -> list[JournaledCall]:
    """What a first attempt journaled: call 0 finished, call 1 finished or not."""
    return [
        JournaledCall("call-0-0", *WRITE_A, output="wrote 1 bytes to a.txt"),
        JournaledCall(
            "call-0-1", *WRITE_B, output="wrote 1 bytes to b.txt" if b_finished else None
        ),
    ]


def test_a_call_with_an_unknown_outcome_waits_for_a_person() -> None:
    outcome = recovered_turn(None, journal(b_finished=False), prompt="go", text="Let me write.")

    assert outcome.reply is None
    assert [(r.call_id, r.tool, r.arguments, r.asked_because) for r in outcome.requests] == [
        ("call-0-1", *WRITE_B, OUTCOME_UNKNOWN)
    ]
    prompt, response, results = outcome.messages
    assert isinstance(prompt, ModelRequest)
    assert [part.content for part in prompt.parts if isinstance(part, UserPromptPart)] == ["go"]
    assert isinstance(response, ModelResponse)
    assert response.text == "Let me write."
    assert [call.tool_call_id for call in response.tool_calls] == ["call-0-0", "call-0-1"]
    assert isinstance(results, ModelRequest)
    assert [
        (p.tool_call_id, p.content) for p in results.parts if isinstance(p, ToolReturnPart)
    ] == [("call-0-0", "wrote 1 bytes to a.txt")]
    assert outcome.new_start == 0
    assert len(outcome.new_messages) == 3


async def test_approved_again_only_the_unknown_call_runs(tmp_path: Path) -> None:
    turn = Turn(tmp_path / "ws")
    outcome = recovered_turn(None, journal(b_finished=False), prompt="go", text="")

    output, _ = await turn.run(
        [WRITE_A, WRITE_B],
        history=list(outcome.messages),
        results=DeferredToolResults(approvals={"call-0-1": True}),
    )

    assert not (turn.workspace / "a.txt").exists()  # finished before: not run again
    assert (turn.workspace / "b.txt").read_text() == "B"
    assert [record[:3] for record in turn.journal.records] == [
        ("started", "call-0-1", "write_file"),
        ("finished", "call-0-1", "write_file"),
    ]
    assert isinstance(output, str)
    assert "wrote 1 bytes to b.txt" in output


async def test_rejected_the_unknown_call_does_not_run_and_the_model_hears_why(
    tmp_path: Path,
) -> None:
    turn = Turn(tmp_path / "ws")
    outcome = recovered_turn(None, journal(b_finished=False), prompt="go", text="")

    output, messages = await turn.run(
        [WRITE_A, WRITE_B],
        history=list(outcome.messages),
        results=DeferredToolResults(approvals={"call-0-1": ToolDenied("it did not run")}),
    )

    assert turn.journal.records == []
    assert not (turn.workspace / "b.txt").exists()
    told = [
        part.content
        for message in messages
        for part in message.parts
        if isinstance(part, ToolReturnPart) and part.tool_call_id == "call-0-1"
    ]
    assert told == ["it did not run"]
    assert not isinstance(output, DeferredToolRequests)


async def test_when_every_call_finished_the_model_goes_on_from_their_results(
    tmp_path: Path,
) -> None:
    turn = Turn(tmp_path / "ws")
    _, history = await turn.run([("list_files", {})])  # a stored earlier exchange
    turn.journal.records.clear()
    outcome = recovered_turn(history, journal(b_finished=True), prompt=None, text="")

    assert outcome.requests == ()
    assert outcome.new_start == len(history)
    output, _ = await turn.run([WRITE_A, WRITE_B], history=list(outcome.messages))

    assert turn.journal.records == []  # nothing ran again
    assert output == "wrote 1 bytes to a.txt\nwrote 1 bytes to b.txt"


def test_calls_the_stored_history_already_holds_are_not_made_twice() -> None:
    """A run resumed after an approval journals calls whose response is stored already."""
    asked = recovered_turn(None, journal(b_finished=False), prompt="go", text="")
    stored = asked.new_messages  # what the pause stored, as JSON
    again = recovered_turn(
        stored,
        [JournaledCall("call-0-1", *WRITE_B, output="wrote 1 bytes to b.txt")],
        prompt=None,
        text="",
    )

    assert again.requests == ()
    (results,) = again.messages[len(stored) :]
    assert isinstance(results, ModelRequest)
    assert [p.tool_call_id for p in results.parts if isinstance(p, ToolReturnPart)] == ["call-0-1"]
