"""Real local HTTP servers that speak enough of the Anthropic Messages API and of the Gemini API
for tests, scripted with the same replies as ``tests.support.fake_openai``::

    with FakeAnthropic() as server:
        server.script(tool_call("list_files", {"path": "."}), text("Two ", "files."))
        options = ModelOptions(anthropic_api_key=KEY, anthropic_base_url=server.base_url)
        model = resolve_model("anthropic:claude-test", options)
        ...

- ``FakeAnthropic``: ``POST /v1/messages``, streamed as Anthropic's SSE events (``message_start``,
  ``content_block_start``, ``content_block_delta`` with ``text_delta`` or ``input_json_delta``,
  ``content_block_stop``, ``message_delta``, ``message_stop``) when the body says
  ``"stream": true``, else one JSON message; errors as ``{"type": "error", "error": {...}}``.
- ``FakeGoogle``: ``POST /v1beta/models/MODEL:streamGenerateContent?alt=sse`` (``data:`` lines of
  ``GenerateContentResponse`` JSON, text parts or a ``functionCall`` part) and
  ``:generateContent``; errors as ``{"error": {"code", "message", "status"}}``.

Each request takes the next reply of the script: ``text(*chunks)``, ``tool_call(name, args)``,
``error(status, message)`` or ``hang(*chunks)``; an empty script answers 500. Every request is
recorded, headers in lower case.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from tests.support.fake_openai import (
    Error,
    FakeServer,
    Hang,
    RecordedRequest,
    Reply,
    Text,
    ToolCall,
    _fragments,
    _Handler,
    error,
    hang,
    text,
    tool_call,
)

__all__ = [
    "FakeAnthropic",
    "FakeGoogle",
    "RecordedRequest",
    "Reply",
    "error",
    "hang",
    "text",
    "tool_call",
]

ANTHROPIC_MESSAGES_PATH = "/v1/messages"
GOOGLE_MODELS_PATH = "/v1beta/models/"

_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
_GOOGLE_ERROR_STATUSES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


class _ScriptedHandler(_Handler):
    """Records each POST, takes the next reply and hands it to ``answer``."""

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
        try:
            self.answer(urlsplit(self.path).path, body, reply, number)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up; nothing to tell
            return

    def answer(self, path: str, body: Any, reply: Reply | None, number: int) -> None:
        raise NotImplementedError

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the body ends when the connection does
        self.end_headers()
        self.close_connection = True

    def _data(self, payload: dict[str, Any], event: str | None = None) -> None:
        line = b"" if event is None else b"event: " + event.encode() + b"\n"
        self.wfile.write(line + b"data: " + json.dumps(payload).encode() + b"\n\n")
        self.wfile.flush()


# --- Anthropic -------------------------------------------------------------------------------


class _AnthropicHandler(_ScriptedHandler):
    def answer(self, path: str, body: Any, reply: Reply | None, number: int) -> None:
        if path != ANTHROPIC_MESSAGES_PATH:
            self._send_json(404, _anthropic_error(404, f"Unknown path {path}."))
            return
        if reply is None:
            self._send_json(500, _anthropic_error(500, "The fake server's script is empty."))
            return
        if isinstance(reply, Error):
            self._send_json(reply.status, _anthropic_error(reply.status, reply.message))
            return
        model = str(body.get("model", "")) if isinstance(body, dict) else ""
        message_id = f"msg_fake_{number}"
        if isinstance(body, dict) and body.get("stream"):
            self._stream(reply, model, message_id)
        elif isinstance(reply, Hang):
            self._hang()
        else:
            self._send_json(200, _anthropic_message(reply, model, message_id))

    def _stream(self, reply: Text | ToolCall | Hang, model: str, message_id: str) -> None:
        self._start_stream()
        start = {**_anthropic_message(None, model, message_id), "stop_reason": None}
        start["usage"] = {"input_tokens": 10, "output_tokens": 1}
        self._send({"type": "message_start", "message": start})
        self._send({"type": "ping"})
        if isinstance(reply, ToolCall):
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": reply.call_id,
                "name": reply.name,
                "input": {},
            }
            deltas = [
                {"type": "input_json_delta", "partial_json": fragment}
                for fragment in _fragments(reply.arguments, reply.fragment_size)
            ]
        else:
            block = {"type": "text", "text": ""}
            deltas = [{"type": "text_delta", "text": chunk} for chunk in reply.chunks]
        if deltas or not isinstance(reply, Hang):
            self._send({"type": "content_block_start", "index": 0, "content_block": block})
        for delta in deltas:
            self._send({"type": "content_block_delta", "index": 0, "delta": delta})
        if isinstance(reply, Hang):
            self._hang()
            return
        self._send({"type": "content_block_stop", "index": 0})
        stop_reason = "tool_use" if isinstance(reply, ToolCall) else "end_turn"
        self._send(
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": len(deltas)},
            }
        )
        self._send({"type": "message_stop"})

    def _send(self, payload: dict[str, Any]) -> None:
        """One SSE event, named after its ``type`` as Anthropic does."""
        self._data(payload, str(payload["type"]))


def _anthropic_message(
    reply: Text | ToolCall | None, model: str, message_id: str
) -> dict[str, Any]:
    """A complete Messages API message (no content for ``None``: a stream's ``message_start``)."""
    content: list[dict[str, Any]] = []
    stop_reason = "end_turn"
    if isinstance(reply, ToolCall):
        block = {"type": "tool_use", "id": reply.call_id, "name": reply.name}
        content.append({**block, "input": json.loads(reply.arguments)})
        stop_reason = "tool_use"
    elif isinstance(reply, Text):
        content.append({"type": "text", "text": "".join(reply.chunks)})
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 5},
    }


def _anthropic_error(status: int, message: str) -> dict[str, Any]:
    kind = _ANTHROPIC_ERROR_TYPES.get(status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


class FakeAnthropic(FakeServer):
    """The fake Anthropic Messages API; ``base_url`` is what ``AnthropicProvider`` is given."""

    handler = _AnthropicHandler
    name = "fake Anthropic"


# --- Google (the Gemini API) ------------------------------------------------------------------


class _GoogleHandler(_ScriptedHandler):
    def answer(self, path: str, body: Any, reply: Reply | None, number: int) -> None:
        model, _, method = path.removeprefix(GOOGLE_MODELS_PATH).partition(":")
        known = ("streamGenerateContent", "generateContent")
        if not path.startswith(GOOGLE_MODELS_PATH) or method not in known:
            self._send_json(404, _google_error(404, f"Unknown path {path}."))
            return
        if reply is None:
            self._send_json(500, _google_error(500, "The fake server's script is empty."))
            return
        if isinstance(reply, Error):
            self._send_json(reply.status, _google_error(reply.status, reply.message))
            return
        response_id = f"fake-response-{number}"
        if method == "streamGenerateContent":
            self._stream(reply, model, response_id)
        elif isinstance(reply, Hang):
            self._hang()
        else:
            self._send_json(200, _google_chunk(_google_parts(reply), model, response_id, True))

    def _stream(self, reply: Text | ToolCall | Hang, model: str, response_id: str) -> None:
        self._start_stream()
        if isinstance(reply, ToolCall):
            self._data(_google_chunk(_google_parts(reply), model, response_id, True))
            return
        for index, chunk in enumerate(reply.chunks):
            last = index == len(reply.chunks) - 1 and not isinstance(reply, Hang)
            self._data(_google_chunk([{"text": chunk}], model, response_id, last))
        if isinstance(reply, Hang):
            self._hang()


def _google_parts(reply: Text | ToolCall) -> list[dict[str, Any]]:
    if isinstance(reply, ToolCall):
        call = {"id": reply.call_id, "name": reply.name, "args": json.loads(reply.arguments)}
        return [{"functionCall": call}]
    return [{"text": "".join(reply.chunks)}]


def _google_chunk(
    parts: list[dict[str, Any]], model: str, response_id: str, last: bool
) -> dict[str, Any]:
    """One ``GenerateContentResponse``; the last one of an answer says STOP and counts tokens."""
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
    chunk: dict[str, Any] = {
        "candidates": [candidate],
        "modelVersion": model,
        "responseId": response_id,
    }
    if last:
        candidate["finishReason"] = "STOP"
        chunk["usageMetadata"] = {
            "promptTokenCount": 10,
            "candidatesTokenCount": 5,
            "totalTokenCount": 15,
        }
    return chunk


def _google_error(status: int, message: str) -> dict[str, Any]:
    kind = _GOOGLE_ERROR_STATUSES.get(status, "UNKNOWN")
    return {"error": {"code": status, "message": message, "status": kind}}


class FakeGoogle(FakeServer):
    """The fake Gemini API; ``base_url`` is what ``GoogleProvider`` is given."""

    handler = _GoogleHandler
    name = "fake Google"
