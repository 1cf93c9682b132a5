"""One agent turn: (profile, stored history, decisions) → text, tool records, checkpoints.

The runner knows pydantic-ai and nothing of the database: it reports through a ``TurnSink``
that the executor implements (and commits). It ends in one of two ways: the model answered
(``TurnOutcome.reply`` is set) or some tool calls wait for a person (``TurnOutcome.requests``).
Nothing here waits for a person: a paused turn is resumed later, maybe by another process,
from the history it left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic_ai import Agent, DeferredToolRequests, DeferredToolResults, ToolApproved, ToolDenied
from pydantic_ai.messages import (
    ModelMessage,
    ModelMessagesTypeAdapter,
    ModelRequest,
    ModelResponse,
    PartDeltaEvent,
    PartStartEvent,
    RetryPromptPart,
    TextPart,
    TextPartDelta,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models import Model

from countersign.agent.tools import (
    ASKED_BECAUSE,
    ToolJournal,
    ToolLimits,
    TurnDeps,
    build_toolset,
)
from countersign.domain.models import (
    NOT_STARTED,
    OUTCOME_UNKNOWN,
    POLICY_ASK,
    JSONObject,
    ToolSetting,
)

TurnAgent = Agent[TurnDeps, str | DeferredToolRequests]
"""A profile made ready to run turns; build it once and reuse it (it costs more than a turn)."""


class TurnSink(ToolJournal, Protocol):
    """Where a turn reports: text as it streams, tool records, and history checkpoints."""

    async def text(self, delta: str) -> None:
        """A piece of the reply."""

    async def checkpoint(self, start: int, messages: list[Any]) -> None:
        """The history from position ``start`` on (JSON), up to a safe point from which a
        retried attempt can continue; what was before ``start`` is as the turn was given it."""


@dataclass(frozen=True, slots=True)
class Answer:
    """A person's answer to one deferred tool call."""

    approved: bool
    arguments: JSONObject | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class ToolRequest:
    """A tool call that waits for a person."""

    call_id: str
    tool: str
    arguments: JSONObject
    asked_because: str = POLICY_ASK
    """Why it waits: the tool's policy, or the argument rule that asked."""


@dataclass(frozen=True, slots=True)
class TurnRequest:
    """Everything one turn needs."""

    agent: TurnAgent
    """From ``build_agent``."""
    workspace: Path
    limits: ToolLimits
    history: Sequence[Any] | None
    """The history to continue from: stored JSON, or the messages a previous turn of this
    process returned (``TurnOutcome.messages``); None for none."""
    prompt: str | None
    """The user's message, when this turn starts from it (not when continuing)."""
    answers: dict[str, Answer] = field(default_factory=dict)
    """Answers to the deferred calls the history ends with, by tool call id."""


@dataclass(frozen=True, slots=True)
class TurnOutcome:
    """How a turn ended: a reply, or tool calls that wait for a person."""

    new_start: int
    """Where the history starts to differ from what the turn was given (usually its length;
    less when pydantic-ai replaced the request the given history ended with)."""
    new_messages: list[Any]
    """The history from ``new_start`` on (JSON): what to store over what was there."""
    messages: list[Any]
    """The whole history now, as pydantic-ai messages, to hand to the session's next turn."""
    reply: str | None
    requests: tuple[ToolRequest, ...] = ()


@dataclass(frozen=True, slots=True)
class JournaledCall:
    """A tool call an earlier attempt journaled after its last stored checkpoint."""

    call_id: str
    tool: str
    arguments: JSONObject
    output: str | None
    """What it returned; None when it never finished, or was stopped (outcome unknown)."""
    seq: int = 0
    """Where in the run's event log the call was journaled."""
    started: bool = True
    """False for a call of the same model response that never reached its tool."""


def new_calls(
    history: Sequence[Any] | None, calls: Sequence[JournaledCall], *, prompt: str | None
) -> list[JournaledCall]:
    """The journaled calls the stored history does not hold yet (a run resumed after an
    approval journals calls its stored history already asks for)."""
    already_made = set(open_tool_calls(history)) if prompt is None else set()
    return [call for call in calls if call.call_id not in already_made]


def recovered_turn(
    history: Sequence[Any] | None,
    calls: Sequence[JournaledCall],
    *,
    prompt: str | None,
    text: str,
) -> TurnOutcome:
    """Where an attempt that stopped inside its tool calls left the turn, rebuilt from the
    journal: the model's response that made the calls (with the ``text`` it streamed before
    them), the results of the calls that finished, and a new request to a person for each call
    whose outcome is unknown (approving runs it again; nothing runs again by itself) and for
    each call of that response that never reached its tool (nothing runs by itself either).

    ``prompt`` is the user's message when the history does not have it yet (the calls came
    from a new run's first response, before anything of the run was stored).
    """
    messages = _messages(history) or []
    new: list[ModelMessage] = []
    if prompt is not None:
        new.append(ModelRequest(parts=[UserPromptPart(prompt)]))
    made = new_calls(messages, calls, prompt=prompt)
    if made:
        parts: list[TextPart | ToolCallPart] = [TextPart(text)] if text else []
        parts += [ToolCallPart(call.tool, call.arguments, call.call_id) for call in made]
        new.append(ModelResponse(parts=parts))
    returns = [
        ToolReturnPart(call.tool, call.output, call.call_id)
        for call in calls
        if call.output is not None
    ]
    if returns:
        new.append(ModelRequest(parts=returns))
    return TurnOutcome(
        new_start=len(messages),
        new_messages=_json(new),
        messages=[*messages, *new],
        reply=None,
        requests=tuple(
            ToolRequest(
                call.call_id,
                call.tool,
                call.arguments,
                OUTCOME_UNKNOWN if call.started else NOT_STARTED,
            )
            for call in calls
            if call.output is None and (call.started or call in made)
        ),
    )


def open_tool_calls(history: Sequence[Any] | None) -> list[str]:
    """The ids of tool calls the history asks for but has no result for (deferred calls).

    They are the last response's calls without a result, when only tool results follow it
    (a pause can store the results of the response's other calls after it).
    """
    if not history:
        return []
    messages = _messages(history) or []
    last = next(
        (
            index
            for index in range(len(messages) - 1, -1, -1)
            if isinstance(messages[index], ModelResponse)
        ),
        None,
    )
    if last is None:
        return []
    answered: set[str] = set()
    for message in messages[last + 1 :]:
        for part in message.parts:
            if not isinstance(part, ToolReturnPart | RetryPromptPart):
                return []  # a new prompt follows: the calls were closed out
            answered.add(part.tool_call_id)
    response = messages[last]
    assert isinstance(response, ModelResponse)
    return [call.tool_call_id for call in response.tool_calls if call.tool_call_id not in answered]


async def run_turn(request: TurnRequest, sink: TurnSink) -> TurnOutcome:
    """Run the agent until it answers or needs a person; report everything to ``sink``."""
    agent = request.agent
    history = _messages(request.history)
    given = history or []
    results = _deferred_results(request.answers) if request.answers else None
    deps = TurnDeps(workspace=request.workspace, journal=sink, limits=request.limits)
    reply: list[str] = []
    async with agent.iter(
        request.prompt,
        message_history=history,
        deferred_tool_results=results,
        deps=deps,
    ) as run:
        node = run.next_node
        while not Agent.is_end_node(node):
            if Agent.is_model_request_node(node):
                async with node.stream(run.ctx) as stream:
                    async for event in stream:
                        text = _text_of(event)
                        if text:
                            reply.append(text)
                            await sink.text(text)
            node = await run.next(node)
            if Agent.is_model_request_node(node):
                # About to ask the model: what it will be asked is a safe point to resume
                # from. Only what changed is dumped: the cost does not grow with the
                # session's length.
                messages = run.all_messages()
                start = _first_change(messages, given)
                tail = list(messages[start:])
                if not tail or tail[-1] is not node.request:
                    tail.append(node.request)
                await sink.checkpoint(start, _json(tail))
        assert run.result is not None
        output = run.result.output
        messages = run.result.all_messages()
    new_start = _first_change(messages, given)
    new_messages = _json(messages[new_start:])
    if isinstance(output, DeferredToolRequests):
        return TurnOutcome(
            new_start=new_start,
            new_messages=new_messages,
            messages=messages,
            reply=None,
            requests=tuple(
                ToolRequest(
                    call.tool_call_id,
                    call.tool_name,
                    call.args_as_dict(),
                    str(output.metadata.get(call.tool_call_id, {}).get(ASKED_BECAUSE, POLICY_ASK)),
                )
                for call in output.approvals
            ),
        )
    return TurnOutcome(
        new_start=new_start, new_messages=new_messages, messages=messages, reply="".join(reply)
    )


def _first_change(messages: Sequence[ModelMessage], given: Sequence[ModelMessage]) -> int:
    """The first position where ``messages`` no longer holds the given history's own objects.

    pydantic-ai keeps a given history's messages as they are, except that it replaces a
    request the history ends with (a checkpoint taken before a model call, or a request
    that deferred results complete); comparing identities finds that in a pass of pointer
    comparisons, without dumping anything.
    """
    for position, message in enumerate(given):
        if position >= len(messages) or messages[position] is not message:
            return position
    return len(given)


def build_agent(model: Model, *, instructions: str, tools: tuple[ToolSetting, ...]) -> TurnAgent:
    """The pydantic-ai agent for a profile: its model, instructions and tools with policies."""
    return Agent(
        model,
        instructions=instructions or None,
        deps_type=TurnDeps,
        output_type=[str, DeferredToolRequests],
        toolsets=[build_toolset(tools, strict=False)],
    )


def _text_of(event: object) -> str:
    if isinstance(event, PartStartEvent) and isinstance(event.part, TextPart):
        return event.part.content
    if isinstance(event, PartDeltaEvent) and isinstance(event.delta, TextPartDelta):
        return event.delta.content_delta
    return ""


def _deferred_results(answers: dict[str, Answer]) -> DeferredToolResults:
    approvals: dict[str, bool | ToolApproved | ToolDenied] = {}
    for call_id, answer in answers.items():
        if answer.approved:
            approvals[call_id] = ToolApproved(override_args=answer.arguments)
        else:
            reason = answer.reason or "no reason given"
            approvals[call_id] = ToolDenied(f"A person rejected this tool call: {reason}")
    return DeferredToolResults(approvals=approvals)


def _messages(history: Sequence[Any] | None) -> list[ModelMessage] | None:
    if not history:
        return None
    if all(isinstance(message, ModelRequest | ModelResponse) for message in history):
        return list(history)  # handed over by this process's previous turn: already parsed
    return ModelMessagesTypeAdapter.validate_python(history)


def _json(messages: Sequence[ModelMessage]) -> list[Any]:
    dumped: list[Any] = ModelMessagesTypeAdapter.dump_python(list(messages), mode="json")
    return dumped
