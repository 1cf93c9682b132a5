"""The run executor: claims queued runs and carries out their turns in this process.

A turn is many short units of work, never one long transaction (SPEC invariant 3):
claim (one UPDATE with a lease, and the turn's context read in the same transaction) → run
the agent with no transaction open, appending events in small fenced batches → pause for
approval, or finish.

- Every write of a run names the lease (owner and attempt) and the ``running`` status; a
  process that lost its lease (paused, cancelled, taken over) writes nothing and stops.
- A heartbeat pushes the lease out; runs of a dead process become claimable when their
  lease runs out (PostgreSQL), or at once when the server starts (SQLite: one process).
- Before a tool runs, its ``tool.call`` event is committed; after, its ``tool.result``. A
  retried attempt that finds a tool call after the last history checkpoint does not run
  anything again: the tool's outcome is unknown, and the run fails saying so (invariant 6).
- At an approval the run becomes ``awaiting_approval`` and no process holds it; a decision
  re-queues it and any process resumes it from the stored history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from countersign.agent.models import (
    AgentModel,
    ModelOptions,
    close_model,
    describe_model_error,
    open_model,
)
from countersign.agent.runner import (
    Answer,
    TurnAgent,
    TurnOutcome,
    TurnRequest,
    build_agent,
    open_tool_calls,
    run_turn,
)
from countersign.agent.tools import ToolLimits
from countersign.db.uow import UnitOfWork
from countersign.domain.errors import CountersignError, LeaseLost
from countersign.domain.events import EventType, NewEvent, RunEvent, assistant_text, text_delta
from countersign.domain.models import (
    Agent,
    Approval,
    ApprovalId,
    ApprovalStatus,
    ClaimedRun,
    JSONObject,
    Lease,
    MessageId,
    MessageRole,
    RunId,
    RunStatus,
    ToolSetting,
    TurnContext,
)
from countersign.services import ServiceDeps
from countersign.services.approvals import expire_approvals

logger = logging.getLogger(__name__)

DELTAS_PER_BATCH = 64
MAX_CACHED_AGENTS = 1_000


def executor_name() -> str:
    """A name for this process's executor that no other process shares."""
    return f"{socket.gethostname()[:60]}:{os.getpid()}:{os.urandom(4).hex()}"


@dataclass(frozen=True, slots=True)
class ExecutorOptions:
    """How the executor works; built from Settings by the composition root."""

    concurrency: int
    lease_seconds: float
    poll_seconds: float
    flush_seconds: float
    workspace_root: Path
    model_options: ModelOptions
    tool_limits: ToolLimits


class Executor:
    """Carries out runs in background tasks owned by the application's lifespan."""

    def __init__(self, deps: ServiceDeps, options: ExecutorOptions, *, name: str) -> None:
        self.deps = deps
        self.options = options
        self.name = name
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._models: dict[str, AgentModel] = {}
        self._agents: dict[tuple[str, str, tuple[ToolSetting, ...]], TurnAgent] = {}

    async def start(self, *, single_process: bool) -> None:
        """Recover what a previous process left and begin claiming runs."""
        if single_process:
            # SQLite has one server process: a run still marked running was held by a
            # process that is gone, so it may be claimed again right away.
            async with self.deps.uow_factory() as uow:
                count = await uow.runs.expire_leases(now=self.deps.clock.now())
                await uow.commit()
            if count:
                logger.warning("recovering %d run(s) left running by a stopped server", count)
        self._loop_task = asyncio.create_task(self._claim_loop(), name="executor")

    async def stop(self) -> None:
        """Stop claiming and cancel the turns in progress (their runs will be recovered)."""
        tasks = [task for task in (self._loop_task, *self._tasks) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        models, self._models = list(self._models.values()), {}
        await asyncio.gather(*(close_model(model) for model in models), return_exceptions=True)

    async def turn_agent(self, profile: Agent) -> TurnAgent:
        """The runnable agent for a profile, built once per process and profile version."""
        key = (profile.model, profile.instructions, profile.tools)
        if key not in self._agents:
            if profile.model not in self._models:
                # Opened once per process: an opened model keeps its HTTP connection pool.
                model = await open_model(profile.model, self.options.model_options)
                if profile.model in self._models:  # another turn opened it meanwhile
                    await close_model(model)
                else:
                    self._models[profile.model] = model
            if len(self._agents) >= MAX_CACHED_AGENTS:
                self._agents.clear()
            self._agents[key] = build_agent(
                self._models[profile.model], instructions=profile.instructions, tools=profile.tools
            )
        return self._agents[key]

    async def _claim_loop(self) -> None:
        next_expiry = 0.0
        while True:
            try:
                if time.monotonic() >= next_expiry:
                    next_expiry = time.monotonic() + self.options.poll_seconds
                    await expire_approvals(self.deps)
                while (free := self.options.concurrency - len(self._tasks)) > 0:
                    claimed = await self._claim(free)
                    for run, start in claimed:
                        task = asyncio.create_task(
                            self._carry_out(run, start), name=f"run {run.run.id}"
                        )
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
                    if len(claimed) < free:
                        break  # nothing more is waiting
            except CountersignError as error:
                # The database is busy or away; the next poll tries again.
                logger.warning("executor could not claim work: %s", error.message)
            await self.deps.broker.wait_for_work(self.options.poll_seconds)

    async def _claim(self, limit: int) -> list[tuple[ClaimedRun, _Start]]:
        """Claim up to ``limit`` runs and read what their turns need, in one transaction."""
        now = self.deps.clock.now()
        async with self.deps.uow_factory() as uow:
            claimed = await uow.runs.claim(
                owner=self.name,
                now=now,
                lease_until=now + timedelta(seconds=self.options.lease_seconds),
                limit=limit,
            )
            starts = [await _read_start(uow, run) for run in claimed]
            await uow.commit()
        return list(zip(claimed, starts, strict=True))

    async def _carry_out(self, claimed: ClaimedRun, start: _Start) -> None:
        turn = _Turn(self, claimed, start)
        heartbeat = asyncio.create_task(turn.heartbeat(asyncio.current_task()))
        try:
            await turn.carry_out()
        except LeaseLost:
            logger.info("run %s was taken over or ended elsewhere; letting go", claimed.run.id)
        except CountersignError as error:
            # E.g. the database went away mid-turn: the lease runs out and a retry follows.
            logger.warning("run %s stopped: %s", claimed.run.id, error.message)
        except asyncio.CancelledError:
            if not turn.lease_lost:
                raise
            # The heartbeat found the lease gone and stopped the turn: say so, as above.
            logger.info("run %s was taken over or ended elsewhere; letting go", claimed.run.id)
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
        if len(self._tasks) >= self.options.concurrency:
            # The claim loop stopped at capacity; this slot is free now.
            self.deps.broker.work_available()


class _Turn:
    """One claimed attempt at a run; also the sink the agent runner reports to."""

    def __init__(self, executor: Executor, claimed: ClaimedRun, start: _Start) -> None:
        self.executor = executor
        self.deps = executor.deps
        self.claimed = claimed
        self.start = start
        self.run_id: RunId = claimed.run.id
        self.lease: Lease = claimed.lease
        self.pending: list[NewEvent] = []
        self.pending_deltas = 0
        self.last_flush = 0.0
        self.flush_task: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()
        self.lease_lost = False
        self.tools_running = 0
        self.tools_since_checkpoint = claimed.history is not None
        """Whether a tool may have run since the stored checkpoint (a resumed run: decided)."""
        self.deferred_checkpoint: tuple[list[Any], int] | None = None
        """A checkpoint to store with the next batch: its history, and how many queued
        events it covers."""
        self.streamed = False
        """Whether this attempt has streamed any text yet."""

    # -- the sink -------------------------------------------------------------------------

    async def text(self, delta: str) -> None:
        """Queue a text delta; commit a batch when it is full or the interval has passed."""
        self.pending.append(text_delta(delta))
        self.pending_deltas += 1
        first = not self.streamed
        self.streamed = True
        # The first delta goes out at once (time to first token); later ones in batches,
        # by count here or by time in the background, never one transaction per delta.
        if first or self.pending_deltas >= DELTAS_PER_BATCH:
            await self.flush()
        elif self.flush_task is None or self.flush_task.done():
            self.flush_task = asyncio.create_task(self._flush_later())

    async def tool_started(self, *, call_id: str, tool: str, arguments: dict[str, Any]) -> None:
        """Commit the tool call before the tool runs."""
        event = NewEvent(
            EventType.TOOL_CALL, {"tool": tool, "arguments": arguments, "call_id": call_id}
        )
        self.tools_since_checkpoint = True
        self.tools_running += 1
        await self.flush(event)

    async def tool_finished(
        self, *, call_id: str, tool: str, output: str, stopped: bool = False
    ) -> None:
        """Commit the tool's result: at once if it stopped or other tools still run, else with
        the checkpoint that follows the tools (before the model is asked again)."""
        event = NewEvent(
            EventType.TOOL_RESULT, {"tool": tool, "output": output, "call_id": call_id}
        )
        self.tools_running -= 1
        if stopped or self.tools_running:
            await self.flush(event)
        else:
            self.pending.append(event)

    async def checkpoint(self, history: list[Any]) -> None:
        """Store the history (and the events before it) so a retry continues from here.

        With no tool call since the last stored checkpoint, a retry from the older one repeats
        nothing but model calls: this one then goes with the next batch, a transaction fewer.
        """
        if self.tools_since_checkpoint:
            await self._write([], values={"history": history}, checkpoint=True)
        else:
            self.deferred_checkpoint = (history, len(self.pending))

    # -- the turn -------------------------------------------------------------------------

    async def heartbeat(self, turn_task: asyncio.Task[Any] | None) -> None:
        """Push the lease out until cancelled; cancel the turn if the lease is gone."""
        interval = self.executor.options.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            now = self.deps.clock.now()
            try:
                async with self.deps.uow_factory() as uow:
                    await uow.runs.extend_lease(
                        self.run_id,
                        self.lease,
                        until=now + timedelta(seconds=self.executor.options.lease_seconds),
                    )
                    await uow.commit()
            except LeaseLost:
                self.lease_lost = True
                if turn_task is not None:
                    turn_task.cancel()
                return
            except CountersignError as error:
                logger.warning("heartbeat of run %s failed: %s", self.run_id, error.message)

    async def carry_out(self) -> None:
        """Run the turn to a pause, an answer or a failure."""
        # Written with the first checkpoint or batch, one transaction fewer per turn.
        self.pending.append(
            NewEvent(
                EventType.RUN_STARTED,
                {"attempt": self.lease.attempt, "resumed_from_seq": self.claimed.checkpoint_seq},
            )
        )
        if self.start.interrupted:
            await self._fail(self.start.interrupted)
            return
        try:
            request = await self._request(self.start.context, self.start.approvals)
            outcome = await run_turn(request, self)
        except LeaseLost:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as error:
            reason = describe_model_error(error)
            if reason is None:
                logger.exception("run %s failed", self.run_id)
                reason = f"the agent failed: {type(error).__name__}: {error}"[:500]
            await self._fail(reason)
            return
        if outcome.requests:
            await self._pause(outcome)
        else:
            await self._finish(outcome)

    async def _request(self, context: TurnContext, approvals: tuple[Approval, ...]) -> TurnRequest:
        options = self.executor.options
        history = self.claimed.history
        answers: dict[str, Answer] = {}
        prompt: str | None = None
        if history is None:
            history, prompt = context.prior_history, context.prompt
        else:
            open_calls = set(open_tool_calls(history))
            for approval in approvals:
                if approval.tool_call_id in open_calls:
                    answers[approval.tool_call_id] = _answer(approval)
        workspace = options.workspace_root / str(self.claimed.run.session_id)
        return TurnRequest(
            agent=await self.executor.turn_agent(context.agent),
            workspace=workspace,
            limits=options.tool_limits,
            history=history,
            prompt=prompt,
            answers=answers,
        )

    async def _pause(self, outcome: TurnOutcome) -> None:
        now = self.deps.clock.now()
        expires_at = now + timedelta(seconds=self.deps.settings.approval_ttl_seconds)
        events: list[NewEvent] = []
        async with self.lock, self.deps.uow_factory() as uow:
            for tool_request in outcome.requests:
                approval = Approval(
                    id=ApprovalId(self.deps.new_id()),
                    run_id=self.run_id,
                    session_id=self.claimed.run.session_id,
                    tool=tool_request.tool,
                    arguments=tool_request.arguments,
                    status=ApprovalStatus.PENDING,
                    decided_by=None,
                    decided_at=None,
                    reason=None,
                    expires_at=expires_at,
                    created_at=now,
                    tool_call_id=tool_request.call_id,
                )
                await uow.approvals.add(approval)
                events.append(
                    NewEvent(
                        EventType.APPROVAL_REQUIRED,
                        {
                            "approval_id": str(approval.id),
                            "tool": approval.tool,
                            "arguments": approval.arguments,
                            "expires_at": expires_at.isoformat(),
                        },
                    )
                )
            written = [*self._take_pending(), *events]
            stored = await self._append(
                uow,
                written,
                values={
                    "status": RunStatus.AWAITING_APPROVAL.value,
                    "history": outcome.history,
                    "owner": None,
                    "lease_expires_at": None,
                },
                checkpoint_after=len(written),
            )
            await uow.commit()
        self.deps.broker.run_changed(self.run_id, stored)

    async def _finish(self, outcome: TurnOutcome) -> None:
        now = self.deps.clock.now()
        async with self.lock, self.deps.uow_factory() as uow:
            pending = self._take_pending()
            content = self.start.earlier_text + (outcome.reply or "")
            message = await uow.messages.add_next(
                message_id=MessageId(self.deps.new_id()),
                session_id=self.claimed.run.session_id,
                role=MessageRole.ASSISTANT,
                content=content,
                run_id=self.run_id,
                at=now,
            )
            stored = await self._append(
                uow,
                [
                    *pending,
                    NewEvent(
                        EventType.MESSAGE_COMPLETED,
                        {"message_id": str(message.id), "seq": message.seq, "content": content},
                    ),
                    NewEvent(EventType.RUN_FINISHED, {"status": RunStatus.SUCCEEDED.value}),
                ],
                values={
                    "status": RunStatus.SUCCEEDED.value,
                    "history": outcome.history,
                    "finished_at": now,
                    "owner": None,
                    "lease_expires_at": None,
                },
            )
            await uow.commit()
        self.deps.broker.run_changed(self.run_id, stored)

    async def _fail(self, reason: str) -> None:
        now = self.deps.clock.now()
        async with self.lock, self.deps.uow_factory() as uow:
            stored = await self._append(
                uow,
                [*self._take_pending(), NewEvent(EventType.RUN_FAILED, {"reason": reason})],
                values={
                    "status": RunStatus.FAILED.value,
                    "error": reason,
                    "finished_at": now,
                    "owner": None,
                    "lease_expires_at": None,
                },
            )
            await uow.approvals.expire_pending_of_run(self.run_id, reason="the run failed", at=now)
            await uow.commit()
        self.deps.broker.run_changed(self.run_id, stored)

    # -- writing --------------------------------------------------------------------------

    async def flush(self, *extra: NewEvent) -> None:
        """Commit the queued events (and ``extra``) now."""
        await self._write(list(extra))

    async def _flush_later(self) -> None:
        # Loops, because deltas may arrive while a batch commits; each gets committed soon.
        try:
            while self.pending:
                await asyncio.sleep(self.executor.options.flush_seconds)
                await self._write([])
        except LeaseLost:
            self.lease_lost = True
        except CountersignError as error:
            logger.warning("could not write events of run %s: %s", self.run_id, error.message)

    async def _write(
        self, extra: list[NewEvent], *, values: JSONObject | None = None, checkpoint: bool = False
    ) -> None:
        async with self.lock:
            deferred = self.deferred_checkpoint
            events = [*self._take_pending(), *extra]
            if not events and not values:
                return
            checkpoint_after = len(events) if checkpoint else None
            if deferred is not None and not checkpoint:
                values = {**(values or {}), "history": deferred[0]}
                checkpoint_after = deferred[1]
            async with self.deps.uow_factory() as uow:
                stored = await self._append(
                    uow, events, values=values, checkpoint_after=checkpoint_after
                )
                await uow.commit()
            if checkpoint_after is not None:
                self.tools_since_checkpoint = False
            self.last_flush = time.monotonic()
        self.deps.broker.run_changed(self.run_id, stored)

    async def _append(
        self,
        uow: UnitOfWork,
        events: list[NewEvent],
        *,
        values: JSONObject | None = None,
        checkpoint_after: int | None = None,
    ) -> list[RunEvent]:
        return await uow.runs.append(
            self.run_id,
            events,
            at=self.deps.clock.now(),
            lease=self.lease,
            values=values,
            checkpoint_after=checkpoint_after,
        )

    def _take_pending(self) -> list[NewEvent]:
        pending, self.pending, self.pending_deltas = self.pending, [], 0
        self.deferred_checkpoint = None
        if self.flush_task is not None and self.flush_task is not asyncio.current_task():
            self.flush_task.cancel()
            self.flush_task = None
        return pending


@dataclass(frozen=True, slots=True)
class _Start:
    """What a claimed attempt starts from, read in the transaction that claimed it."""

    context: TurnContext
    interrupted: str | None = None
    """Why the run must not be retried, if an earlier attempt left a tool call unsaved."""
    approvals: tuple[Approval, ...] = ()
    """The run's decided approvals (a run resumed after a decision)."""
    earlier_text: str = ""
    """The reply text earlier attempts streamed before this attempt's starting point."""


async def _read_start(uow: UnitOfWork, claimed: ClaimedRun) -> _Start:
    run = claimed.run
    context = await uow.runs.turn_context(run.id, session_id=run.session_id)
    if claimed.history is None and not claimed.last_seq:
        return _Start(context)  # a new run: nothing before it
    # Resumed after an approval, or retried: what the earlier attempts left.
    approvals = await uow.approvals.for_run(run.id) if claimed.history else []
    earlier_text = (
        assistant_text(await uow.runs.text_events(run.id), resumed_from=claimed.checkpoint_seq)
        if claimed.last_seq
        else ""
    )
    return _Start(
        context,
        interrupted=await _interrupted_tool_calls(uow, claimed),
        approvals=tuple(approvals),
        earlier_text=earlier_text,
    )


async def _interrupted_tool_calls(uow: UnitOfWork, claimed: ClaimedRun) -> str | None:
    """Why the run must not be retried, if an earlier attempt left a tool call unsaved."""
    if claimed.last_seq <= claimed.checkpoint_seq:
        return None
    events = await uow.runs.tool_calls_after(claimed.run.id, after_seq=claimed.checkpoint_seq)
    finished = {
        event.data.get("call_id") for event in events if event.type is EventType.TOOL_RESULT
    }
    for event in events:
        if event.type is EventType.TOOL_CALL:
            tool = event.data.get("tool")
            if event.data.get("call_id") in finished:
                return (
                    f"the server stopped after the tool {tool} ran but before the run saved "
                    "its progress; it was not run again"
                )
            return (
                f"the server stopped while the tool {tool} was running; its outcome is "
                "unknown and it was not run again"
            )
    return None


def _answer(approval: Approval) -> Answer:
    if approval.status is ApprovalStatus.APPROVED:
        return Answer(approved=True, arguments=approval.arguments)
    reason = approval.reason or ("expired" if approval.status is ApprovalStatus.EXPIRED else None)
    return Answer(approved=False, reason=reason)
