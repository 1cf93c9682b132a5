"""The run executor: claims queued runs and carries out their turns in this process.

A turn is many short units of work, never one long transaction (SPEC invariant 3):
claim (one UPDATE with a lease) → read the turn's context → run the agent with no transaction
open, appending events in small fenced batches → pause for approval, or finish.

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
from countersign.domain.events import EventType, NewEvent, assistant_text, text_delta
from countersign.domain.models import (
    Agent,
    Approval,
    ApprovalId,
    ApprovalStatus,
    ClaimedRun,
    JSONObject,
    Lease,
    Message,
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

DELTAS_PER_BATCH = 32
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
                while len(self._tasks) < self.options.concurrency:
                    claimed = await self._claim()
                    if claimed is None:
                        break
                    task = asyncio.create_task(
                        self._carry_out(claimed), name=f"run {claimed.run.id}"
                    )
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            except CountersignError as error:
                # The database is busy or away; the next poll tries again.
                logger.warning("executor could not claim work: %s", error.message)
            await self.deps.broker.wait_for_work(self.options.poll_seconds)

    async def _claim(self) -> ClaimedRun | None:
        now = self.deps.clock.now()
        async with self.deps.uow_factory() as uow:
            claimed = await uow.runs.claim(
                owner=self.name,
                now=now,
                lease_until=now + timedelta(seconds=self.options.lease_seconds),
            )
            await uow.commit()
        return claimed

    async def _carry_out(self, claimed: ClaimedRun) -> None:
        turn = _Turn(self, claimed)
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

    def __init__(self, executor: Executor, claimed: ClaimedRun) -> None:
        self.executor = executor
        self.deps = executor.deps
        self.claimed = claimed
        self.run_id: RunId = claimed.run.id
        self.lease: Lease = claimed.lease
        self.pending: list[NewEvent] = []
        self.pending_deltas = 0
        self.last_flush = 0.0
        self.flush_task: asyncio.Task[None] | None = None
        self.lock = asyncio.Lock()
        self.lease_lost = False
        self.streamed = False
        """Whether this attempt has streamed any text yet."""
        self.earlier_text = ""
        """The reply text earlier attempts streamed before this attempt's starting point."""

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
        await self.flush(event)

    async def tool_finished(self, *, call_id: str, tool: str, output: str) -> None:
        """Commit the tool's result."""
        event = NewEvent(
            EventType.TOOL_RESULT, {"tool": tool, "output": output, "call_id": call_id}
        )
        await self.flush(event)

    async def checkpoint(self, history: list[Any]) -> None:
        """Store the history (and the events before it) so a retry continues from here."""
        await self._write([], values={"history": history}, checkpoint=True)

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
        async with self.deps.uow_factory(write=False) as uow:
            context = await uow.runs.turn_context(
                self.run_id, session_id=self.claimed.run.session_id
            )
            interrupted = await self._interrupted_tool_calls(uow)
            approvals = await uow.approvals.for_run(self.run_id) if self.claimed.history else []
            if self.claimed.last_seq:
                self.earlier_text = assistant_text(
                    await uow.runs.text_events(self.run_id),
                    resumed_from=self.claimed.checkpoint_seq,
                )
        # Written with the first checkpoint or batch, one transaction fewer per turn.
        self.pending.append(
            NewEvent(
                EventType.RUN_STARTED,
                {"attempt": self.lease.attempt, "resumed_from_seq": self.claimed.checkpoint_seq},
            )
        )
        if interrupted:
            await self._fail(interrupted)
            return
        try:
            request = await self._request(context, approvals)
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

    async def _request(self, context: TurnContext, approvals: list[Approval]) -> TurnRequest:
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

    async def _interrupted_tool_calls(self, uow: UnitOfWork) -> str | None:
        """Why the run must not be retried, if an earlier attempt left a tool call unsaved."""
        if self.claimed.last_seq <= self.claimed.checkpoint_seq:
            return None
        events = await uow.runs.tool_calls_after(self.run_id, after_seq=self.claimed.checkpoint_seq)
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
            await self._append(
                uow,
                [*self._take_pending(), *events],
                values={
                    "status": RunStatus.AWAITING_APPROVAL.value,
                    "history": outcome.history,
                    "owner": None,
                    "lease_expires_at": None,
                },
                checkpoint=True,
            )
            await uow.commit()
        self.deps.broker.run_changed(self.run_id)

    async def _finish(self, outcome: TurnOutcome) -> None:
        now = self.deps.clock.now()
        async with self.lock, self.deps.uow_factory() as uow:
            pending = self._take_pending()
            content = self.earlier_text + (outcome.reply or "")
            message = Message(
                id=MessageId(self.deps.new_id()),
                session_id=self.claimed.run.session_id,
                seq=await uow.messages.next_seq(self.claimed.run.session_id),
                role=MessageRole.ASSISTANT,
                content=content,
                run_id=self.run_id,
                created_at=now,
            )
            await uow.messages.add(message)
            await self._append(
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
        self.deps.broker.run_changed(self.run_id)

    async def _fail(self, reason: str) -> None:
        now = self.deps.clock.now()
        async with self.lock, self.deps.uow_factory() as uow:
            await self._append(
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
        self.deps.broker.run_changed(self.run_id)

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
            events = [*self._take_pending(), *extra]
            if not events and not values:
                return
            async with self.deps.uow_factory() as uow:
                await self._append(uow, events, values=values, checkpoint=checkpoint)
                await uow.commit()
            self.last_flush = time.monotonic()
        self.deps.broker.run_changed(self.run_id)

    async def _append(
        self,
        uow: UnitOfWork,
        events: list[NewEvent],
        *,
        values: JSONObject | None = None,
        checkpoint: bool = False,
    ) -> None:
        await uow.runs.append(
            self.run_id,
            events,
            at=self.deps.clock.now(),
            lease=self.lease,
            values=values,
            checkpoint=checkpoint,
        )

    def _take_pending(self) -> list[NewEvent]:
        pending, self.pending, self.pending_deltas = self.pending, [], 0
        if self.flush_task is not None and self.flush_task is not asyncio.current_task():
            self.flush_task.cancel()
            self.flush_task = None
        return pending


def _answer(approval: Approval) -> Answer:
    if approval.status is ApprovalStatus.APPROVED:
        return Answer(approved=True, arguments=approval.arguments)
    reason = approval.reason or ("expired" if approval.status is ApprovalStatus.EXPIRED else None)
    return Answer(approved=False, reason=reason)
