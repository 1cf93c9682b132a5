"""A real local HTTP server that speaks enough of the OpenAI Chat Completions API for tests.

``POST /v1/chat/completions`` answers from a script the test sets, streamed (SSE ``data:`` chunks
ending with ``data: [DONE]``) or not, as the request asks::

    with FakeOpenAI() as server:
        server.script(tool_call("list_files", {"path": "."}), text("Two ", "files."))
        model = resolve_model("openai:gpt-test", ModelOptions(openai_base_url=server.base_url))
        ...
        assert server.requests[0].body["tools"][0]["function"]["name"] == "list_files"

Each request takes the next reply of the script: ``text(*chunks)``, ``tool_call(name, arguments)``,
``error(status)`` (an OpenAI-style error body) or ``hang()`` (no answer until the server stops).
A request that finds the script empty gets a 500 saying so. Every request is recorded.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

CHAT_COMPLETIONS_PATH = "/v1/chat/completions"
STOP_TIMEOUT = 5.0
"""Seconds ``stop()`` waits for the server thread."""
HANG_LIMIT = 30.0
"""A hanging reply gives up on its own after this long, so a forgotten server cannot hang a run."""


@dataclass(frozen=True)
class Text:
    """Answer with text; streamed as these chunks, one SSE event each."""

    chunks: tuple[str, ...]
    hold_after: int | None = None
    """Stop after this many chunks until ``FakeOpenAI.go_on()`` (streamed requests only)."""


@dataclass(frozen=True)
class ToolCall:
    """Answer with one tool call; streamed with the id and name first, then argument fragments."""

    name: str
    arguments: str
    call_id: str
    fragment_size: int = 8
    saying: tuple[str, ...] = ()
    """Text chunks streamed before the call (the model saying what it is about to do)."""
    also: tuple[ToolCall, ...] = ()
    """More calls in the same response, after this one."""


@dataclass(frozen=True)
class Error:
    """Answer with an HTTP error status and an OpenAI-style ``{"error": {...}}`` body."""

    status: int
    message: str
    type: str
    code: str | None


@dataclass(frozen=True)
class Hang:
    """Send ``chunks`` (streamed requests only), then answer nothing until the server stops."""

    chunks: tuple[str, ...] = ()


Reply = Text | ToolCall | Error | Hang


def text(*chunks: str, hold_after: int | None = None) -> Text:
    """A text answer made of these streamed chunks (held after ``hold_after`` of them until
    the test calls ``go_on()``)."""
    return Text(chunks, hold_after)


def tool_call(
    name: str,
    arguments: Mapping[str, Any] | str | None = None,
    *,
    call_id: str = "call_fake_1",
    fragment_size: int = 8,
    saying: Sequence[str] = (),
    also: Sequence[ToolCall] = (),
) -> ToolCall:
    """A tool-call answer (after the text chunks ``saying``, if any); ``arguments`` is a
    mapping (sent as JSON) or raw JSON text; ``also``: more calls in the same response."""
    raw = arguments if isinstance(arguments, str) else json.dumps(dict(arguments or {}))
    return ToolCall(name, raw, call_id, fragment_size, tuple(saying), tuple(also))


_DEFAULT_ERRORS = {
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    403: ("You are not allowed to use this model.", "invalid_request_error", None),
    429: ("Rate limit reached for requests.", "requests", "rate_limit_exceeded"),
    500: ("The server had an error while processing your request.", "server_error", None),
}


def error(
    status: int, message: str | None = None, *, type: str | None = None, code: str | None = None
) -> Error:
    """An error answer; message, type and code default to what OpenAI sends for that status."""
    default_message, default_type, default_code = _DEFAULT_ERRORS.get(
        status, ("Something went wrong.", "server_error", None)
    )
    return Error(
        status,
        default_message if message is None else message,
        default_type if type is None else type,
        default_code if code is None else code,
    )


def pace(monkeypatch: Any, seconds: float) -> None:
    """Make every fake server of this test wait ``seconds`` before each streamed event, so a
    reply lasts long enough to be cut off (``monkeypatch``: pytest's fixture, undone after)."""
    send_event = _Handler._event

    def paced(handler: _Handler, payload: dict[str, Any]) -> None:
        time.sleep(seconds)
        send_event(handler, payload)

    monkeypatch.setattr(_Handler, "_event", paced)


def hang(*chunks: str) -> Hang:
    """An answer that never finishes (after streaming ``chunks``, if any)."""
    return Hang(chunks)


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    """Header names in lower case."""
    body: Any
    """The JSON body, parsed (None when it was not JSON)."""

    @property
    def authorization(self) -> str | None:
        """The Authorization header, if any."""
        return self.headers.get("authorization")

    @property
    def tools(self) -> list[dict[str, Any]]:
        """The ``tools`` the request offered the model (empty when none)."""
        body = self.body if isinstance(self.body, dict) else {}
        tools = body.get("tools") or []
        return list(tools)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The ``messages`` of the request."""
        body = self.body if isinstance(self.body, dict) else {}
        return list(body.get("messages") or [])


@dataclass
class _State:
    replies: deque[Reply] = field(default_factory=deque)
    requests: list[RecordedRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    released: threading.Event = field(default_factory=threading.Event)
    holding: threading.Event = field(default_factory=threading.Event)
    go_on: threading.Event = field(default_factory=threading.Event)
    counter: int = 0


class FakeServer:
    """A scripted fake model server: a context manager that starts it on 127.0.0.1 and stops it
    on exit. ``handler`` speaks the provider's protocol (``tests.support.fake_providers`` has
    Anthropic's and Google's); the script, the recorded requests and ``hang()`` are shared."""

    handler: type[_Handler]
    name = "fake model"

    def __init__(self) -> None:
        self._state = _State()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The TCP port the server listens on."""
        if self._server is None:
            raise RuntimeError(f"the {self.name} server is not running")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """The base URL a provider SDK is given for this server."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, oldest first."""
        with self._state.lock:
            return list(self._state.requests)

    def wait_until_holding(self, timeout: float) -> bool:
        """Wait until a ``hold_after`` reply has stopped; True if it did within ``timeout``."""
        return self._state.holding.wait(timeout)

    def go_on(self) -> None:
        """Let a held reply send the rest of its chunks."""
        self._state.go_on.set()

    def script(self, *replies: Reply) -> None:
        """Queue replies; each chat-completions request takes the next one."""
        with self._state.lock:
            self._state.replies.extend(replies)

    @property
    def unused(self) -> list[Reply]:
        """Scripted replies that no request took yet."""
        with self._state.lock:
            return list(self._state.replies)

    def start(self) -> Self:
        """Start serving on a free port of 127.0.0.1 (port 0: the OS picks, no race)."""
        Handler = type("Handler", (self.handler,), {"state": self._state})
        server = _Server(("127.0.0.1", 0), Handler)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Release hanging replies, stop serving and wait (bounded) for the server thread."""
        self._state.released.set()
        self._state.go_on.set()
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.shutdown()
        server.server_close()
        thread.join(STOP_TIMEOUT)
        if thread.is_alive():  # pragma: no cover - would mean serve_forever ignored shutdown
            raise RuntimeError(f"the {self.name} server did not stop")
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    """The standard threading server with a listen backlog for a burst of runs (a process
    taking over a stopped one's runs asks the model for all of them at once): past the
    standard backlog of 5, with SYN cookies on, Linux resets the connections it cannot queue,
    and the runs fail with "the connection to the model provider broke off"."""

    request_queue_size = 128
    daemon_threads = True


class _Handler(BaseHTTPRequestHandler):
    """The OpenAI Chat Completions protocol; the base of the other fakes' handlers."""

    state: _State
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        request = RecordedRequest(
            method="POST",
            path=self.path,
            headers={name.lower(): value for name, value in self.headers.items()},
            body=body,
        )
        with self.state.lock:
            self.state.requests.append(request)
            self.state.counter += 1
            number = self.state.counter
            reply = self.state.replies.popleft() if self.state.replies else None
        if self.path != CHAT_COMPLETIONS_PATH:
            self._send_json(404, _error_body(f"Unknown path {self.path}.", "not_found", None))
            return
        if reply is None:
            self._send_json(500, _error_body("The fake server's script is empty.", "server", None))
            return
        if isinstance(reply, Error):
            self._send_json(reply.status, _error_body(reply.message, reply.type, reply.code))
            return
        model = str(body.get("model", "")) if isinstance(body, dict) else ""
        completion_id = f"chatcmpl-fake-{number}"
        if isinstance(body, dict) and body.get("stream"):
            self._stream(reply, model, completion_id)
        elif isinstance(reply, Hang):
            self._hang()
        else:
            self._send_json(200, _completion(reply, model, completion_id))

    def _stream(self, reply: Text | ToolCall | Hang, model: str, completion_id: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the body ends when the connection does
        self.end_headers()
        self.close_connection = True
        try:
            deltas = list(_deltas(reply))
            hold_at = (
                reply.hold_after + 1  # the role delta comes first
                if isinstance(reply, Text) and reply.hold_after is not None
                else None
            )
            for index, delta in enumerate(deltas):
                if index == hold_at:
                    self.state.holding.set()
                    self.state.go_on.wait(HANG_LIMIT)
                self._event(_chunk(completion_id, model, delta, None))
            if isinstance(reply, Hang):
                self._hang()
                return
            finish = "tool_calls" if isinstance(reply, ToolCall) else "stop"
            self._event(_chunk(completion_id, model, {}, finish))
            usage = {"prompt_tokens": 10, "completion_tokens": len(deltas), "total_tokens": 0}
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            self._event({**_chunk(completion_id, model, None, None), "usage": usage})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up; nothing to tell
            return

    def _event(self, payload: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()

    def _hang(self) -> None:
        self.state.released.wait(HANG_LIMIT)
        self.close_connection = True

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()


class FakeOpenAI(FakeServer):
    """The fake OpenAI-compatible server."""

    handler = _Handler
    name = "fake OpenAI"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL of this server (``http://127.0.0.1:<port>/v1``)."""
        return f"http://127.0.0.1:{self.port}/v1"


def _error_body(message: str, type_: str, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}


def _deltas(reply: Text | ToolCall | Hang) -> Iterator[dict[str, Any]]:
    """The ``delta`` objects of a streamed answer, the role first."""
    yield {"role": "assistant", "content": ""}
    if isinstance(reply, ToolCall):
        for chunk in reply.saying:
            yield {"content": chunk}
        for index, call in enumerate((reply, *reply.also)):
            yield {
                "tool_calls": [
                    {
                        "index": index,
                        "id": call.call_id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": ""},
                    }
                ]
            }
            for fragment in _fragments(call.arguments, call.fragment_size):
                yield {"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}
        return
    for chunk in reply.chunks:
        yield {"content": chunk}


def _fragments(value: str, size: int) -> Sequence[str]:
    return [value[start : start + size] for start in range(0, len(value), max(size, 1))]


def _chunk(
    completion_id: str, model: str, delta: dict[str, Any] | None, finish: str | None
) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }


def _completion(reply: Text | ToolCall, model: str, completion_id: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": None}
    if isinstance(reply, ToolCall):
        message["content"] = "".join(reply.saying) or None
        message["tool_calls"] = [
            {
                "id": call.call_id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in (reply, *reply.also)
        ]
        finish = "tool_calls"
    else:
        message["content"] = "".join(reply.chunks)
        finish = "stop"
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
    }
