"""The run executor: claims queued runs and carries out their turns in this process.

A turn is many short units of work, never one long transaction (SPEC invariant 3):
claim (one UPDATE with a lease, and the turn's context read in the same transaction) → run
the agent with no transaction open, appending events in small fenced batches → pause for
approval, or finish.

- Every write of a run names the lease (owner and attempt) and the ``running`` status; a
  process that lost its lease (paused, cancelled, taken over) writes nothing and stops.
- One lease keeper per process pushes out the leases of all its runs (one statement per
  round, not one per run); runs of a dead process become claimable when their
  lease runs out (PostgreSQL), or at once when the server starts (SQLite: one process).
- Before a tool runs, its ``tool.call`` event is committed; after, its ``tool.result``. A
  retried attempt that finds tool calls after the last history checkpoint runs nothing again
  by itself (invariant 6): it rebuilds the turn from the journal, stores the results of the
  calls that finished, and asks a person again about each call whose outcome is unknown.
- At an approval the run becomes ``awaiting_approval`` and no process holds it; a decision
  re-queues it and any process resumes it from the stored history.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
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
    JournaledCall,
    TurnAgent,
    TurnOutcome,
    TurnRequest,
    build_agent,
    new_calls,
    open_tool_calls,
    recovered_turn,
    run_turn,
)
from countersign.agent.tools import ToolLimits, tools_generation
from countersign.db.repositories import fits_one_statement
from countersign.db.uow import UnitOfWork
from countersign.domain.errors import CountersignError, LeaseLost, Unavailable
from countersign.domain.events import (
    AssistantReply,
    EventType,
    NewEvent,
    RunBatch,
    RunEvent,
    assistant_text,
    text_delta,
)
from countersign.domain.models import (
    Agent,
    Approval,
    ApprovalId,
    ApprovalStatus,
    ClaimedRun,
    JSONObject,
    Lease,
    MessageId,
    Run,
    RunId,
    RunStatus,
    SessionId,
    ToolSetting,
    TurnContext,
)
from countersign.services import ServiceDeps
from countersign.services.approvals import expire_approvals
from countersign.services.writer import WRITER_LOOP, EventWriter
from countersign.supervisor import Loop, Shutdown, Supervisor

logger = logging.getLogger(__name__)

DELTAS_PER_BATCH = 64
MAX_CACHED_AGENTS = 1_000
MAX_CACHED_HISTORIES = 256
"""Sessions whose model history (parsed) this process keeps for their next turn."""
MAX_CACHED_MESSAGES = 20_000
"""And at most this many messages in all of them (a few long sessions must not fill memory)."""
MAX_OPEN_MODELS = 32
"""Opened models (each holds an HTTP connection pool) kept per process; the least recently
used one that no turn is using is closed when another is needed."""
EXECUTOR_LOOP = "executor"
LEASE_LOOP = "lease keeper"
STOP_SECONDS = 10.0
"""How long stopping waits for the cancelled turns (a tool records its stop meanwhile)."""


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
    max_attempts: int = 5


class Executor:
    """Carries out runs in background tasks owned by the application's lifespan."""

    def __init__(
        self,
        deps: ServiceDeps,
        options: ExecutorOptions,
        *,
        name: str,
        supervisor: Supervisor,
        shutdown: Shutdown | None = None,
    ) -> None:
        self.deps = deps
        self.shutdown = shutdown
        self.options = options
        self.name = name
        self.supervisor = supervisor
        self._tasks: set[asyncio.Task[None]] = set()
        self._reserved = 0
        """Slots promised to runs being started by requests of this process (``reserve``)."""
        self._turns: dict[RunId, _Turn] = {}
        """The turns in progress, by run: whose leases the lease keeper renews."""
        self._stopping = False
        self.writer = EventWriter(deps)
        self._models = _OpenModels(options.model_options)
        self._histories: OrderedDict[SessionId, tuple[tuple[int, RunId | None], list[Any]]] = (
            OrderedDict()
        )
        """Per session: the history length and messages its last turn here ended with."""
        self._cached_messages = 0
        self._agents: dict[tuple[str, str, tuple[ToolSetting, ...], int], TurnAgent] = {}

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
        self.supervisor.start(WRITER_LOOP, self.writer.run)
        self.supervisor.start(
            LEASE_LOOP, self._keep_leases, stale_after=max(10.0, self.options.lease_seconds)
        )
        # Stuck if it has not polled for five polls (and at least ten seconds): readiness 503.
        self.supervisor.start(
            EXECUTOR_LOOP,
            self._claim_loop,
            stale_after=max(10.0, 5 * self.options.poll_seconds),
        )

    @property
    def executing(self) -> int:
        """How many runs this executor carries out now."""
        return len(self._turns)

    @property
    def stopping(self) -> bool:
        """No run is taken on any more: the server is stopping (or was asked to)."""
        return self._stopping or (self.shutdown is not None and self.shutdown.requested)

    async def stop(self, *, grace: float = 0.0) -> None:
        """Stop claiming; give the turns in progress up to ``grace`` seconds to finish (their
        leases still renewed: a running tool is not cut off), then cancel the rest, each
        handing its run back (a tool cut off is recorded as stopped, and the retry asks a
        person again); then stop the writer (which the turns' last writes still need) and
        close the models. An urgent shutdown (a second signal) ends the grace at once."""
        self._stopping = True
        await self.supervisor.stop_loop(EXECUTOR_LOOP)
        pending = set(self._tasks)
        if pending and grace > 0:
            logger.info("waiting up to %g s for %d run(s) to finish", grace, len(pending))
            began = self.shutdown.requested_at if self.shutdown is not None else None
            deadline = (began if began is not None else time.monotonic()) + grace
            while pending and time.monotonic() < deadline and not self._urgent():
                step = min(0.2, deadline - time.monotonic())
                _done, pending = await asyncio.wait(pending, timeout=max(step, 0.0))
        if pending:
            logger.info("handing %d run(s) back", len(pending))
        for task in pending:
            task.cancel()
        if pending:
            _done, stuck = await asyncio.wait(pending, timeout=STOP_SECONDS)
            if stuck:
                logger.warning("%d run(s) did not stop within %s s", len(stuck), STOP_SECONDS)
        await self.supervisor.stop_loop(LEASE_LOOP)
        self.writer.stop()
        await self.supervisor.stop_loop(WRITER_LOOP)
        await self._models.close_all()

    def _urgent(self) -> bool:
        return self.shutdown is not None and self.shutdown.urgent

    async def turn_agent(self, profile: Agent) -> tuple[TurnAgent, str]:
        """The runnable agent for a profile (built once per process and profile version) and
        the model it holds in use; give the model back with ``release_model``."""
        model = await self._models.take(profile.model)
        # The tools on offer change when an MCP server connects with other tools: rebuilt then.
        key = (profile.model, profile.instructions, profile.tools, tools_generation())
        agent = self._agents.get(key)
        if agent is None or agent.model is not model:
            if len(self._agents) >= MAX_CACHED_AGENTS:
                self._agents.clear()
            try:
                agent = build_agent(model, instructions=profile.instructions, tools=profile.tools)
            except BaseException:
                # E.g. a plugin tool the agent names is no longer loaded: the model is not used.
                self._models.give_back(profile.model)
                raise
            self._agents[key] = agent
        return agent, profile.model

    # -- runs handed over by requests of this process (services.LocalExecutor) ---------------

    def reserve(self, *, now: datetime) -> Lease | None:
        """A lease for a run a request is starting, if a slot is free."""
        if self.stopping or self._free_slots() <= 0:
            return None
        self._reserved += 1
        return Lease(owner=self.name, attempt=1)

    def unreserve(self) -> None:
        """The reserved run was not started after all."""
        self._reserved -= 1

    def lease_until(self, now: datetime) -> datetime:
        """When a lease taken now runs out."""
        return now + timedelta(seconds=self.options.lease_seconds)

    def hand_off(self, run: Run, *, lease: Lease, context: TurnContext) -> None:
        """Carry out a run its request committed as claimed by us: the context it read in
        that transaction is all a first attempt needs."""
        self._reserved -= 1
        if self._stopping:
            return  # the run keeps its lease until it runs out; then it is claimed again
        claimed = ClaimedRun(run=run, lease=lease, history_seq=None, last_seq=0, checkpoint_seq=0)
        history = self._cached_history(run.session_id, context.history_length, context.history_tail)
        self._spawn(claimed, _Start(context, history=history), how=HANDED_OVER)

    def adopt(self, run: Run, *, lease: Lease, until: datetime) -> None:
        """Carry out a run whose start may or may not be stored: its one statement was cut
        off before its answer came back (a cancel, a lost connection), so the context it
        read is unknown. If the run is stored (as claimed by us, its lease running ``until``),
        its start is read back and it goes on as attempt 1, without waiting for its lease to
        run out and counting a retry; if not, the slot is free again."""
        self._reserved -= 1
        if self._stopping:
            return  # stored or not, the lease runs out and the run is claimed again
        claimed = ClaimedRun(run=run, lease=lease, history_seq=None, last_seq=0, checkpoint_seq=0)
        task = asyncio.create_task(self._adopt(claimed, until), name=f"run {run.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _adopt(self, claimed: ClaimedRun, until: datetime) -> None:
        run_id = claimed.run.id
        # The statement may still be running on the server (waiting for a lock) and commit
        # later: look until shortly before its lease would run out (after that the claim
        # loop takes the run over, as after a crash).
        deadline = until - timedelta(seconds=ADOPT_MARGIN_SECONDS)
        start: _Start | None = None
        while start is None:
            found = None
            try:
                async with self.deps.uow_factory(write=False) as uow:
                    found = await uow.runs.status_and_seq(run_id)
                    if found is not None and found[0] is RunStatus.RUNNING:
                        start = await _read_start(
                            uow, claimed, self.options.max_attempts, self._cached_history
                        )
            except CountersignError as error:
                logger.warning("run %s could not be read back yet: %s", run_id, error.message)
            except Exception:
                # A bug: logged with its traceback; the run's lease runs out and it is
                # claimed again, as after a crash.
                logger.exception("run %s could not be read back", run_id)
                self.deps.broker.work_available()
                return
            if start is not None:
                break
            if found is not None or self.stopping or self.deps.clock.now() >= deadline:
                # Ended already (cancelled), or never stored, or the server is stopping.
                logger.info(
                    "run %s: its start was not stored, or it ended; not carried out", run_id
                )
                self.deps.broker.work_available()  # this slot is free again
                return
            await asyncio.sleep(ADOPT_POLL_SECONDS)
        logger.debug("run %s attempt %d %s", run_id, claimed.lease.attempt, ADOPTED)
        self.deps.broker.data_changed()  # the request that stored it could not say so
        await self._carry_out(claimed, start)

    async def take(self, uow: UnitOfWork, run_id: RunId, *, now: datetime) -> _Taken | None:
        """Claim a run that ``uow`` re-queued (a decision) for this process, if a slot is free,
        and read its start in that transaction: no claim of its own, no wake-up, no poll."""
        if self.reserve(now=now) is None:
            return None
        try:
            claimed = await uow.runs.claim(
                owner=self.name, now=now, lease_until=self.lease_until(now), run_id=run_id
            )
            if not claimed:
                self.unreserve()
                return None
            start = await _read_start(
                uow, claimed[0], self.options.max_attempts, self._cached_history
            )
        except BaseException:
            self.unreserve()
            raise
        return _Taken(self, claimed[0], start)

    def _start_taken(self, claimed: ClaimedRun, start: _Start) -> None:
        self._reserved -= 1
        if not self._stopping:
            self._spawn(claimed, start, how=HANDED_OVER)

    # -- the sessions' model histories, kept for their next turn ----------------------------

    def _cached_history(
        self, session_id: SessionId, length: int, tail: RunId | None
    ) -> Sequence[Any] | None:
        """The session's history as this process's last turn of it left it, if the stored
        one is still that: the same length, its newest message stored by the same run."""
        if length == 0:
            return []
        found = self._histories.get(session_id)
        if found is None or found[0] != (length, tail):
            return None
        self._histories.move_to_end(session_id)
        return found[1]

    def remember_history(
        self, session_id: SessionId, *, length: int, tail: RunId | None, messages: list[Any]
    ) -> None:
        """Keep a session's history (pydantic-ai messages) for its next turn here."""
        self.forget_history(session_id)
        self._histories[session_id] = ((length, tail), list(messages))
        self._cached_messages += len(messages)
        while self._histories and (
            len(self._histories) > MAX_CACHED_HISTORIES
            or self._cached_messages > MAX_CACHED_MESSAGES
        ):
            _key, (_length, evicted) = self._histories.popitem(last=False)
            self._cached_messages -= len(evicted)

    def forget_history(self, session_id: SessionId) -> None:
        """The session's stored history changed in a way this process did not follow."""
        found = self._histories.pop(session_id, None)
        if found is not None:
            self._cached_messages -= len(found[1])

    async def history_of(
        self, session_id: SessionId, *, length: int, tail: RunId | None
    ) -> Sequence[Any]:
        """The session's first ``length`` model messages: kept here, or read."""
        cached = self._cached_history(session_id, length, tail)
        if cached is not None:
            return cached
        async with self.deps.uow_factory(write=False) as uow:
            return await uow.history.load(session_id, upto=length)

    def _free_slots(self) -> int:
        return self.options.concurrency - len(self._tasks) - self._reserved

    def _spawn(self, claimed: ClaimedRun, start: _Start, *, how: str) -> None:
        logger.debug("run %s attempt %d %s", claimed.run.id, claimed.lease.attempt, how)
        task = asyncio.create_task(self._carry_out(claimed, start), name=f"run {claimed.run.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def release_model(self, name: str) -> None:
        """A turn no longer uses this model."""
        self._models.give_back(name)

    async def _claim_loop(self, loop: Loop) -> None:
        # Any other error ends this call; the supervisor logs it and starts it again.
        next_expiry = 0.0
        while True:
            try:
                if time.monotonic() >= next_expiry:
                    next_expiry = time.monotonic() + self.options.poll_seconds
                    await expire_approvals(self.deps)
                while not self.stopping and (free := self._free_slots()) > 0:
                    # Held while the claim runs, so that requests do not reserve them too;
                    # a batch at most, so that a request starting a run meanwhile still
                    # finds a slot to claim it in its own statement (unless nearly full).
                    take = min(free, CLAIM_BATCH)
                    self._reserved += take
                    try:
                        claimed = await self._claim(take)
                    finally:
                        self._reserved -= take
                    for run, start in claimed:
                        self._spawn(run, start, how=CLAIMED)
                    if claimed:
                        self.deps.broker.data_changed()  # queued (or taken over) → running
                    if len(claimed) < take:
                        break  # nothing more is waiting
                loop.working()
            except CountersignError as error:
                # The database is busy or away; the next poll tries again.
                loop.last_error = error.message
                logger.warning("executor could not claim work: %s", error.message)
            await self.deps.broker.wait_for_work(self.options.poll_seconds)

    async def _keep_leases(self, loop: Loop) -> None:
        """Renew the leases of every run this process carries out, in one statement per
        ``lease_seconds / 3`` (not one per run); stop the turns whose lease is gone."""
        interval = self.options.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            # A turn writing its end is left alone: its fenced write tells it if it lost.
            held = {run_id: turn for run_id, turn in self._turns.items() if not turn.ending}
            if held:
                now = self.deps.clock.now()
                try:
                    async with self.deps.uow_factory() as uow:
                        kept = await uow.runs.extend_leases(
                            owner=self.name,
                            run_ids=list(held),
                            until=now + timedelta(seconds=self.options.lease_seconds),
                        )
                        await uow.commit()
                except CountersignError as error:
                    loop.last_error = error.message
                    logger.warning("could not renew the runs' leases: %s", error.message)
                    continue
                for run_id, turn in held.items():
                    if (run_id, turn.lease.attempt) in kept or turn.ending:
                        continue
                    turn.lease_lost = True
                    if turn.task is not None:
                        turn.task.cancel()
            loop.working()

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
            starts = [
                await _read_start(uow, run, self.options.max_attempts, self._cached_history)
                for run in claimed
            ]
            await uow.commit()
        return list(zip(claimed, starts, strict=True))

    async def _carry_out(self, claimed: ClaimedRun, start: _Start) -> None:
        turn = _Turn(self, claimed, start)
        turn.task = asyncio.current_task()
        self._turns[turn.run_id] = turn
        try:
            await turn.carry_out()
        except LeaseLost:
            logger.info("run %s was taken over or ended elsewhere; letting go", claimed.run.id)
        except CountersignError as error:
            # E.g. the database went away mid-turn: the run is handed back (or its lease runs
            # out) and another attempt follows, up to the run's maximum.
            logger.warning(
                "run %s stopped (attempt %d): %s; it will be tried again",
                claimed.run.id,
                claimed.lease.attempt,
                error.message,
            )
            await turn.hand_back()
        except asyncio.CancelledError:
            if not turn.lease_lost:
                if self._stopping:
                    # Stopped by a shutdown: another process (or the next start) takes the
                    # run over at once, without waiting for its lease to run out.
                    await turn.hand_back(a_retry=False)
                raise
            # The lease keeper found the lease gone and stopped the turn: say so, as above.
            logger.info("run %s was taken over or ended elsewhere; letting go", claimed.run.id)
        except Exception:
            # A bug in this process: the run is failed with a sentence (never the error's own
            # text, which may quote data); the traceback goes to the log with the run's id.
            logger.exception("run %s failed unexpectedly", claimed.run.id)
            await turn.fail_quietly(UNEXPECTED_FAILURE)
        finally:
            if self._turns.get(turn.run_id) is turn:
                del self._turns[turn.run_id]
            if turn.flush_task is not None:
                turn.flush_task.cancel()
        if self._free_slots() <= 0:
            # The claim loop stopped at capacity; this slot is free now.
            self.deps.broker.work_available()


CLAIM_BATCH = 16
"""Runs the claim loop claims in one transaction at most (and the slots it holds meanwhile)."""
HANDED_OVER = "handed over in-process"
ADOPTED = "read back after its start's answer was lost"
ADOPT_POLL_SECONDS = 0.2
ADOPT_MARGIN_SECONDS = 1.0
"""A start read back stops looking this long before the lease it was given runs out."""
CLAIMED = "claimed by the claim loop"
UNEXPECTED_FAILURE = "the agent failed unexpectedly; the server's log has the details"


class _OpenModels:
    """Opened models by name, at most ``MAX_OPEN_MODELS``, least recently used closed first.

    A model in use by a turn is never closed; names are user-supplied (agent profiles), so
    the cache must not grow with them.
    """

    def __init__(self, options: ModelOptions) -> None:
        self._options = options
        self._open: OrderedDict[str, AgentModel] = OrderedDict()
        self._in_use: dict[str, int] = {}
        self._lock = asyncio.Lock()

    async def take(self, name: str) -> AgentModel:
        """The opened model of that name, marked in use."""
        async with self._lock:
            model = self._open.get(name)
            if model is None:
                await self._make_room()
                # Opened once per process: an opened model keeps its HTTP connection pool.
                model = await open_model(name, self._options)
                self._open[name] = model
            self._open.move_to_end(name)
            self._in_use[name] = self._in_use.get(name, 0) + 1
            return model

    def give_back(self, name: str) -> None:
        """One turn less uses the model."""
        left = self._in_use.get(name, 0) - 1
        if left > 0:
            self._in_use[name] = left
        else:
            self._in_use.pop(name, None)

    async def _make_room(self) -> None:
        while len(self._open) >= MAX_OPEN_MODELS:
            idle = next((name for name in self._open if name not in self._in_use), None)
            if idle is None:
                return  # every open model is busy: go over the bound for a while
            model = self._open.pop(idle)
            try:
                await close_model(model)
            except Exception:
                logger.exception("closing the model %s failed", idle)

    async def close_all(self) -> None:
        """Close every opened model (the server stops)."""
        models, self._open = list(self._open.values()), OrderedDict()
        await asyncio.gather(*(close_model(model) for model in models), return_exceptions=True)


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
        self.task: asyncio.Task[Any] | None = None
        self.ending = False
        """Set when the turn starts writing its end (pause, finish, fail)."""
        self.tools_running = 0
        self.tools_since_checkpoint = claimed.history_seq is not None
        """Whether a tool may have run since the stored checkpoint (a resumed run: decided)."""
        self.deferred_checkpoint: tuple[_Messages, int] | None = None
        """A checkpoint to store with the next batch, and how many queued events it covers."""
        self.history_base = (
            start.context.history_length if claimed.history_seq is None else claimed.history_seq
        )
        """How many of the session's model messages the turn started from."""
        self.stored_length = self.history_base
        """How many of the session's model messages are stored, as far as this turn knows."""
        self.last_stored: _Messages | None = None
        """What this turn stored last (its position and messages)."""
        self.tail: RunId | None = (
            start.context.history_tail if claimed.history_seq is None else claimed.run.id
        )
        """The run that stored the session's newest model message."""
        self.streamed = False
        """Whether this attempt has streamed any text yet."""
        self.announced: set[str] = set()
        """The calls of the model's current reply this attempt has journaled, or named as
        another's other calls (cleared at each checkpoint: providers may reuse call ids)."""
        self.write_error: Exception | None = None
        """Why a write failed: the turn stops at its next step (nothing is written twice,
        since a failed commit may have committed after all)."""

    # -- the sink -------------------------------------------------------------------------

    async def text(self, delta: str) -> None:
        """Queue a text delta; commit a batch when it is full or the interval has passed."""
        if self.write_error is not None:
            raise self.write_error
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

    async def tool_started(
        self,
        *,
        call_id: str,
        tool: str,
        arguments: dict[str, Any],
        other_calls: Sequence[dict[str, Any]] = (),
    ) -> None:
        """Commit the tool call before the tool runs; the first call of a model response
        also names the response's other calls, so that a crash loses none of them."""
        data: JSONObject = {"tool": tool, "arguments": arguments, "call_id": call_id}
        unnamed = [call for call in other_calls if call["call_id"] not in self.announced]
        if call_id not in self.announced and unnamed:
            data["other_calls"] = unnamed
        self.announced.add(call_id)
        self.announced.update(call["call_id"] for call in unnamed)
        event = NewEvent(EventType.TOOL_CALL, data)
        self.tools_since_checkpoint = True
        self.tools_running += 1
        await self.flush(event)

    async def tool_finished(
        self, *, call_id: str, tool: str, output: str, stopped: bool = False
    ) -> None:
        """Commit the tool's result: at once if it stopped or other tools still run, else with
        the checkpoint that follows the tools (before the model is asked again)."""
        data: JSONObject = {"tool": tool, "output": output, "call_id": call_id}
        if stopped:
            data["stopped"] = True  # its outcome is unknown: a retry asks again
        event = NewEvent(EventType.TOOL_RESULT, data)
        self.tools_running -= 1
        if stopped or self.tools_running:
            await self.flush(event)
        else:
            self.pending.append(event)

    async def checkpoint(self, start: int, messages: list[Any]) -> None:
        """Store the turn's new messages (and the events before them) so a retry continues
        from here.

        With no tool call since the last stored checkpoint, a retry from the older one repeats
        nothing but model calls: this one then goes with the next batch, a transaction fewer.
        """
        self.announced.clear()  # the model is asked again: its next reply's call ids are new
        if self.tools_since_checkpoint:
            await self._write([], checkpoint=_Messages(start, messages))
        elif (
            self.claimed.history_seq is None
            and self.last_stored is None
            and self.deferred_checkpoint is None
        ):
            # A new run's first request: a retry without any checkpoint starts from the very
            # same place (the user's message), so there is nothing to store.
            return
        else:
            self.deferred_checkpoint = (_Messages(start, messages), len(self.pending))

    # -- the turn -------------------------------------------------------------------------

    async def hand_back(self, *, a_retry: bool = True) -> None:
        """Give the run up so that a retry need not wait for the lease to run out (best
        effort: when the database is away, the lease runs out by itself). A run handed back
        by a shutdown (``a_retry=False``) did not fail: its next claim is not counted, the
        first ``max_attempts`` times (a run every stop cuts off still ends)."""
        try:
            async with self.deps.uow_factory() as uow:
                await uow.runs.release_lease(
                    self.run_id,
                    self.lease,
                    at=self.deps.clock.now(),
                    free_handbacks=None if a_retry else self.executor.options.max_attempts,
                )
                await uow.commit()
        except CountersignError as error:
            logger.info(
                "run %s could not be handed back (%s); its lease will run out",
                self.run_id,
                error.message,
            )
        except Exception:
            logger.exception("run %s could not be handed back", self.run_id)

    async def fail_quietly(self, reason: str) -> None:
        """Fail the run with ``reason``, or leave it to its lease if even that is impossible."""
        try:
            await self._fail(reason)
        except CountersignError as error:
            logger.warning("run %s could not be failed: %s", self.run_id, error.message)
        except Exception:
            logger.exception("run %s could not be failed", self.run_id)

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
        continue_from: list[Any] | None = None
        if self.start.recovered:
            recovered = await self._recover()
            if recovered.requests:
                await self._pause(recovered)  # a call whose outcome is unknown asks again
                return
            continue_from = recovered.messages
        model_name: str | None = None
        try:
            request, model_name = await self._request(
                self.start.context, self.start.approvals, continue_from
            )
            outcome = await run_turn(request, self)
        except (LeaseLost, Unavailable, asyncio.CancelledError):
            # The database, not the model: the run is tried again (up to its maximum).
            raise
        except CountersignError as error:
            # Written for a person (e.g. a model that needs a key nobody configured).
            await self._fail(error.message)
            return
        except Exception as error:
            reason = describe_model_error(error)
            if reason is None:
                raise  # a bug: _carry_out logs it and fails the run with a plain sentence
            # The run's reason is a sentence; what the provider's library said goes to the log.
            logger.warning(
                "run %s: the model call failed (%r): %r, caused by %r",  # %r: escaped text
                self.run_id,
                reason,
                error,
                error.__cause__ or error.__context__,
            )
            await self._fail(reason)
            return
        finally:
            if model_name is not None:
                self.executor.release_model(model_name)
        if outcome.requests:
            await self._pause(outcome)
        else:
            await self._finish(outcome)

    async def _history(self) -> Sequence[Any]:
        history = self.start.history
        if history is None:
            history = await self.executor.history_of(
                self.claimed.run.session_id,
                length=self.history_base,
                tail=self.start.context.history_tail,
            )
        return history

    async def _recover(self) -> TurnOutcome:
        """Where the earlier attempt stopped inside its tool calls, rebuilt from the journal.

        With a call whose outcome is unknown, the turn pauses there and asks a person again.
        When every call finished, their results are stored and the turn goes on from them.
        """
        history = await self._history()
        prompt = self.start.context.prompt if self.claimed.history_seq is None else None
        calls = self.start.recovered
        # The text the stopped attempt streamed in the response that made its new calls: after
        # the checkpoint, before the first of them.
        first = min((call.seq for call in new_calls(history, calls, prompt=prompt)), default=0)
        text = assistant_text(
            list(self.start.text_events), between=(self.claimed.checkpoint_seq, first)
        )
        outcome = recovered_turn(history, calls, prompt=prompt, text=text)
        if not outcome.requests:
            await self._write([], checkpoint=_Messages(outcome.new_start, outcome.new_messages))
        return outcome

    async def _request(
        self,
        context: TurnContext,
        approvals: tuple[Approval, ...],
        continue_from: list[Any] | None = None,
    ) -> tuple[TurnRequest, str]:
        options = self.executor.options
        answers: dict[str, Answer] = {}
        prompt: str | None = None
        # After a recovery, the model goes on from the results of the calls it made.
        history = continue_from if continue_from is not None else await self._history()
        if continue_from is None and self.claimed.history_seq is None:
            prompt = context.prompt
        else:
            open_calls = set(open_tool_calls(history))
            for approval in approvals:
                if approval.tool_call_id in open_calls:
                    answers[approval.tool_call_id] = _answer(approval)
        workspace = options.workspace_root / str(self.claimed.run.session_id)
        agent, model_name = await self.executor.turn_agent(context.agent)
        return TurnRequest(
            agent=agent,
            workspace=workspace,
            limits=options.tool_limits,
            history=history,
            prompt=prompt,
            answers=answers,
        ), model_name

    def _changed(self, messages: _Messages) -> _Messages:
        """The part of ``messages`` not already stored as it is by this turn's last write."""
        last = self.last_stored
        if last is None or last.start != messages.start:
            return messages
        same = 0
        for old, new in zip(last.items, messages.items, strict=False):
            if old != new:
                break
            same += 1
        return _Messages(messages.start + same, messages.items[same:])

    def _stored(self, messages: _Messages, changed: _Messages) -> None:
        """Note that ``messages`` are stored (``changed`` being what was written)."""
        self.last_stored = messages
        self.stored_length = messages.start + len(messages.items)
        if changed.items:
            self.tail = self.run_id

    def _final_messages(self, outcome: TurnOutcome) -> tuple[_Messages, _Messages]:
        """The turn's final history and the part of it that differs from what is stored."""
        messages = _Messages(outcome.new_start, outcome.new_messages)
        return messages, self._changed(messages)

    async def _store_messages(
        self, uow: UnitOfWork, messages: _Messages, changed: _Messages
    ) -> None:
        """Store the turn's final history where it differs from what is stored.

        Called after the run's own UPDATE: the run first, then its rows elsewhere, the one
        lock order (a cancel updates the run, then deletes the run's messages), so that a
        turn ending while it is cancelled queues behind the cancel instead of deadlocking.
        """
        if changed.start < self.stored_length:
            await uow.history.truncate(self.claimed.run.session_id, after=changed.start)
        await uow.history.append(
            self.claimed.run.session_id,
            self.run_id,
            changed.items,
            after=changed.start,
            at=self.deps.clock.now(),
        )
        self._stored(messages, changed)

    async def _pause(self, outcome: TurnOutcome) -> None:
        self.ending = True
        self._raise_write_error()
        now = self.deps.clock.now()
        expires_at = now + timedelta(seconds=self.deps.settings.approval_ttl_seconds)
        events: list[NewEvent] = []
        async with self.lock, self.deps.uow_factory() as uow:
            # Again under the lock: a background flush that held it may just have failed,
            # and ending now would store the run without that batch's text.
            self._raise_write_error()
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
                    asked_because=tool_request.asked_because,
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
                            "asked_because": approval.asked_because,
                        },
                    )
                )
            written = [*self._take_pending(), *events]
            messages, changed = self._final_messages(outcome)
            stored = await self._append(
                uow,
                written,
                values={
                    "status": RunStatus.AWAITING_APPROVAL.value,
                    "history_seq": messages.start + len(messages.items),
                    "owner": None,
                    "lease_expires_at": None,
                },
                checkpoint_after=len(written),
            )
            await self._store_messages(uow, messages, changed)
            await uow.commit()
        self.executor.remember_history(
            self.claimed.run.session_id,
            length=self.stored_length,
            tail=self.tail,
            messages=outcome.messages,
        )
        self.deps.broker.run_changed(self.run_id, stored)
        self.deps.broker.data_changed()

    async def _finish(self, outcome: TurnOutcome) -> None:
        self.ending = True
        self._raise_write_error()
        now = self.deps.clock.now()
        async with self.lock:
            # Again under the lock: a background flush that held it may just have failed,
            # and finishing now would store a reply whose deltas miss that batch's text.
            self._raise_write_error()
            content = self.start.earlier_text + (outcome.reply or "")
            reply = AssistantReply(MessageId(self.deps.new_id()), content)
            messages, changed = self._final_messages(outcome)
            batch = RunBatch(
                run_id=self.run_id,
                session_id=self.claimed.run.session_id,
                lease=self.lease,
                events=[
                    *self._take_pending(),
                    # Its "seq" is the stored message's, filled in by the write.
                    NewEvent(
                        EventType.MESSAGE_COMPLETED,
                        {"message_id": str(reply.message_id), "content": content},
                    ),
                    NewEvent(EventType.RUN_FINISHED, {"status": RunStatus.SUCCEEDED.value}),
                ],
                values={
                    "status": RunStatus.SUCCEEDED.value,
                    "history_seq": messages.start + len(messages.items),
                    "finished_at": now,
                    "owner": None,
                    "lease_expires_at": None,
                },
                messages=changed.items,
                messages_after=changed.start,
                truncate=changed.start < self.stored_length,
            )
            # The run, its events, the reply and the history: on PostgreSQL one statement
            # when the history is only added to.
            async with self.deps.uow_factory(one_statement=fits_one_statement(batch)) as uow:
                stored = await uow.runs.write(batch, at=now, reply=reply)
                await uow.commit()
            self._stored(messages, changed)
        self.executor.remember_history(
            self.claimed.run.session_id,
            length=self.stored_length,
            tail=self.tail,
            messages=outcome.messages,
        )
        self.deps.broker.run_changed(self.run_id, stored)
        self.deps.broker.data_changed()

    async def _fail(self, reason: str) -> None:
        self.ending = True
        now = self.deps.clock.now()
        async with self.lock, self.deps.uow_factory() as uow:
            # After a failed write the queued events may be stored already (a commit can
            # fail after it happened): they are left out rather than risk them twice.
            pending = [] if self.write_error is not None else self._take_pending()
            stored = await self._append(
                uow,
                [*pending, NewEvent(EventType.RUN_FAILED, {"reason": reason})],
                values={
                    "status": RunStatus.FAILED.value,
                    "error": reason,
                    "finished_at": now,
                    "owner": None,
                    "lease_expires_at": None,
                },
            )
            await uow.approvals.expire_pending_of_run(self.run_id, reason="the run failed", at=now)
            # The session's history goes on from its last successful turn.
            await uow.history.discard_run(self.run_id)
            await uow.commit()
        self.executor.forget_history(self.claimed.run.session_id)
        self.deps.broker.run_changed(self.run_id, stored)
        self.deps.broker.data_changed()

    # -- writing --------------------------------------------------------------------------

    async def flush(self, *extra: NewEvent) -> None:
        """Commit the queued events (and ``extra``) now."""
        await self._write(list(extra))

    async def _flush_later(self) -> None:
        # Loops, because deltas may arrive while a batch commits; each gets committed soon.
        try:
            while self.pending and self.write_error is None:
                await asyncio.sleep(self.executor.options.flush_seconds)
                await self._write([])
        except CountersignError as error:
            # write_error is set: the turn stops at its next step, and the run is retried
            # from its checkpoint (nothing unwritten was ever shown to anyone).
            logger.warning("could not write events of run %s: %s", self.run_id, error.message)
        except Exception:  # noqa: BLE001 - kept in write_error; the writer logged the traceback
            logger.warning("could not write events of run %s", self.run_id)

    def _raise_write_error(self) -> None:
        if self.write_error is not None:
            raise self.write_error

    async def _write(self, extra: list[NewEvent], *, checkpoint: _Messages | None = None) -> None:
        """Commit the queued events and ``extra``, with a checkpoint (or the deferred one),
        through the process's event writer.

        A write that fails stops the turn: it is not sent again, because a commit that failed
        may have happened after all (a connection lost in the middle of COMMIT), and sending
        it twice would store its events twice. The run is tried again from its checkpoint.
        """
        async with self.lock:
            self._raise_write_error()
            deferred = self.deferred_checkpoint
            events = [*self._take_pending(), *extra]
            if not events and checkpoint is None:
                return
            messages: _Messages | None = None
            checkpoint_after: int | None = None
            if checkpoint is not None:
                messages, checkpoint_after = checkpoint, len(events)
            elif deferred is not None:
                messages, checkpoint_after = deferred
            batch = RunBatch(
                run_id=self.run_id,
                session_id=self.claimed.run.session_id,
                lease=self.lease,
                events=events,
                checkpoint_after=checkpoint_after,
            )
            changed: _Messages | None = None
            if messages is not None:
                changed = self._changed(messages)
                batch = replace(
                    batch,
                    values={"history_seq": messages.start + len(messages.items)},
                    messages=changed.items,
                    messages_after=changed.start,
                    truncate=changed.start < self.stored_length,
                )
            try:
                # Group-committed with the other runs' batches of this process.
                stored = await self.executor.writer.write(batch)
            except Exception as error:
                self.write_error = error
                if isinstance(error, LeaseLost):
                    self.lease_lost = True
                raise
            if messages is not None and changed is not None:
                self._stored(messages, changed)
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


@dataclass(slots=True)
class _Taken:
    """A run claimed in a transaction not yet committed (``services.TakenRun``)."""

    executor: Executor
    claimed: ClaimedRun
    start_from: _Start
    done: bool = False

    def start(self) -> None:
        if not self.done:
            self.done = True
            self.executor._start_taken(self.claimed, self.start_from)

    def drop(self) -> None:
        if not self.done:
            self.done = True
            self.executor.unreserve()


@dataclass(frozen=True, slots=True)
class _Messages:
    """Part of a session's model history (JSON): its messages from position ``start`` on."""

    start: int
    items: list[Any]


@dataclass(frozen=True, slots=True)
class _Start:
    """What a claimed attempt starts from, read in the transaction that claimed it."""

    context: TurnContext
    interrupted: str | None = None
    """Why the run must not be tried again (it was tried too often)."""
    recovered: tuple[JournaledCall, ...] = ()
    """The tool calls an earlier attempt journaled after its last stored checkpoint."""
    approvals: tuple[Approval, ...] = ()
    """The run's decided approvals (a run resumed after a decision)."""
    earlier_text: str = ""
    """The reply text earlier attempts streamed before this attempt's starting point."""
    text_events: Sequence[RunEvent] = ()
    """The run's text deltas and starts, as far as they were read."""
    history: Sequence[Any] | None = None
    """The model messages the attempt continues, if already at hand (None: read them)."""


async def _read_start(
    uow: UnitOfWork,
    claimed: ClaimedRun,
    max_attempts: int,
    cached: Callable[[SessionId, int, RunId | None], Sequence[Any] | None],
) -> _Start:
    run = claimed.run
    context = await uow.runs.turn_context(run.id, session_id=run.session_id)
    if claimed.retries >= max_attempts:
        tries = "once" if max_attempts == 1 else f"{max_attempts} times"
        return _Start(
            context,
            interrupted=(
                f"the run was tried {tries} and never finished (the server stopped or lost "
                "the database each time); it was not tried again"
            ),
        )
    length = context.history_length if claimed.history_seq is None else claimed.history_seq
    # A kept history is only the stored one if it ends where the stored one does.
    history = cached(run.session_id, length, context.history_tail)
    if length != context.history_length:
        history = None
    if history is None:
        history = await uow.history.load(run.session_id, upto=length)
    if claimed.history_seq is None and not claimed.last_seq:
        return _Start(context, history=history)  # a new run: nothing before it
    # Resumed after an approval, or retried: what the earlier attempts left (one read).
    events = (
        await uow.runs.resume_events(run.id, journal_after=claimed.checkpoint_seq)
        if claimed.last_seq
        else None
    )
    approvals: list[Approval] = []
    if claimed.history_seq is not None:
        asked = None
        if events is not None:
            asked = [event for event in events if event.type is EventType.APPROVAL_REQUIRED]
        approvals = await uow.approvals.for_run(run.id, asked=asked)
    text_events = [event for event in events or () if event.type in _TEXT_TYPES]
    journal = [event for event in events or () if event.type in _JOURNAL_TYPES]
    return _Start(
        context,
        recovered=_journaled_calls(journal),
        approvals=tuple(approvals),
        earlier_text=assistant_text(text_events, resumed_from=claimed.checkpoint_seq),
        text_events=text_events,
        history=history,
    )


_TEXT_TYPES = (EventType.TEXT_DELTA, EventType.RUN_STARTED)
_JOURNAL_TYPES = (EventType.TOOL_CALL, EventType.TOOL_RESULT)


def _journaled_calls(events: list[RunEvent]) -> tuple[JournaledCall, ...]:
    """The tool calls an earlier attempt journaled after its last stored checkpoint, from its
    tool.call and tool.result events after it."""
    results = {
        event.data.get("call_id"): event.data
        for event in events
        if event.type is EventType.TOOL_RESULT
    }
    calls: dict[str, JournaledCall] = {}
    not_started: dict[str, JournaledCall] = {}
    for event in events:
        if event.type is not EventType.TOOL_CALL:
            continue
        call_id = str(event.data.get("call_id"))
        result = results.get(call_id)
        finished = result is not None and not result.get("stopped")
        calls[call_id] = JournaledCall(
            call_id=call_id,
            tool=str(event.data.get("tool")),
            arguments=_object(event.data.get("arguments")),
            output=str(result.get("output")) if finished and result is not None else None,
            seq=event.seq,
        )
        others = event.data.get("other_calls")
        for other in others if isinstance(others, list) else []:
            if isinstance(other, dict):
                not_started[str(other.get("call_id"))] = JournaledCall(
                    call_id=str(other.get("call_id")),
                    tool=str(other.get("tool")),
                    arguments=_object(other.get("arguments")),
                    output=None,
                    seq=event.seq,
                    started=False,
                )
    # The response's calls that never reached their tool (one that asks, one waiting its turn).
    never = [call for call_id, call in not_started.items() if call_id not in calls]
    return (*calls.values(), *never)


def _object(value: object) -> JSONObject:
    return value if isinstance(value, dict) else {}


def _answer(approval: Approval) -> Answer:
    if approval.status is ApprovalStatus.APPROVED:
        return Answer(approved=True, arguments=approval.arguments_to_use)
    reason = approval.reason or ("expired" if approval.status is ApprovalStatus.EXPIRED else None)
    return Answer(approved=False, reason=reason)
