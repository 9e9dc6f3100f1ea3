"""A real-HTTP fake of an OpenAI-compatible chat-completions server.

Tests point litellm (or httpx) at ``FakeLLMServer().url`` so that retries,
timeouts, keep-alive and JSON parsing run through a genuine socket instead of
a monkeypatched client. Standard library only; binds to 127.0.0.1 on a free
port and never touches any other network.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

__all__ = [
    "FakeReply",
    "FakeLLMServer",
    "AsyncFakeLLMServer",
    "Handler",
    "example_for_schema",
    "last_user_text",
]


CONTEXT_LENGTH_MESSAGE = (
    "This model's maximum context length is {limit} tokens. However, your messages resulted in {tokens} tokens. "
    "Please reduce the length of the messages."
)


@dataclass
class FakeReply:
    """One scripted answer; non-200 statuses become OpenAI-style error bodies."""

    content: str | dict | list | None = None
    status: int = 200
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    tool_calls: list[dict] | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error_code: str | None = None  # the error body's "code"; by default derived from the status
    error_body: dict | None = None  # a non-200 answer's body verbatim (e.g. FastAPI's {"detail": [...]} of a 422)

    @classmethod
    def context_length_exceeded(cls, limit: int = 128000, tokens: int = 130542) -> "FakeReply":
        """OpenAI's answer to a prompt longer than the model's context window."""
        return cls(status=400, error_code="context_length_exceeded",
                   content=CONTEXT_LENGTH_MESSAGE.format(limit=limit, tokens=tokens))


Handler = Callable[[dict], "FakeReply | str | dict"]

_MAX_DEPTH = 32

_STRING_FORMATS: dict[str, str] = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "00:00:00",
    "email": "user@example.com",
    "uri": "https://example.com/",
    "url": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
}


def example_for_schema(schema: dict, defs: dict | None = None) -> Any:
    """Build a minimal instance that validates against ``schema``.

    Lets the default handler satisfy any structured-output request without each
    test hand-writing a JSON answer. Covers the subset pydantic emits:
    ``$ref``/``$defs``, ``anyOf``/``oneOf``/``allOf``, ``enum``, ``const`` and
    the primitive types with their common bounds.
    """
    merged: dict = {}
    merged.update(schema.get("definitions") or {})
    merged.update(schema.get("$defs") or {})
    merged.update(defs or {})
    return _example(schema, merged, 0)


def _resolve_ref(ref: str, defs: dict) -> dict:
    """Resolve ``#/$defs/X`` or ``#/definitions/X``; only local refs exist in practice."""
    name = ref.rsplit("/", 1)[-1]
    if name not in defs:
        raise KeyError(f"unresolvable $ref {ref!r}")
    return defs[name]


def _is_null_schema(s: Any) -> bool:
    return isinstance(s, dict) and (s.get("type") == "null" or s.get("const", 0) is None)


def _example(schema: Any, defs: dict, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise RecursionError("schema recursion too deep for example_for_schema")
    if schema is True or not isinstance(schema, dict) or not schema:
        return "fake text"
    if schema.get("$defs") or schema.get("definitions"):
        defs = {**(schema.get("definitions") or {}), **(schema.get("$defs") or {}), **defs}
    if "$ref" in schema:
        return _example(_resolve_ref(schema["$ref"], defs), defs, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if options:
            non_null = [o for o in options if not _is_null_schema(o)]
            # Deep in a recursive schema, prefer null so the instance terminates.
            if non_null and not (depth > _MAX_DEPTH // 2 and len(non_null) < len(options)):
                return _example(non_null[0], defs, depth + 1)
            return None
    if schema.get("allOf"):
        parts = [_example(s, defs, depth + 1) for s in schema["allOf"]]
        if all(isinstance(p, dict) for p in parts):
            out: dict = {}
            for p in parts:
                out.update(p)
            return out
        return parts[0]

    typ = schema.get("type")
    if isinstance(typ, list):
        non_null_types = [t for t in typ if t != "null"]
        typ = non_null_types[0] if non_null_types else "null"
    if typ is None:
        if "properties" in schema:
            typ = "object"
        elif "items" in schema or "prefixItems" in schema:
            typ = "array"
        else:
            return "fake text"

    if typ == "object":
        props: dict = schema.get("properties") or {}
        required = schema.get("required")
        keys = list(props) if required is None else list(required)
        return {k: _example(props.get(k, {}), defs, depth + 1) for k in keys}
    if typ == "array":
        prefix = schema.get("prefixItems")
        if prefix:
            return [_example(s, defs, depth + 1) for s in prefix]
        min_items = int(schema.get("minItems") or 0)
        if min_items <= 0:
            return []
        item = schema.get("items", {})
        return [_example(item, defs, depth + 1) for _ in range(min_items)]
    if typ == "string":
        text = _STRING_FORMATS.get(schema.get("format", ""), "fake text")
        min_len = int(schema.get("minLength") or 0)
        if len(text) < min_len:
            text = text + "x" * (min_len - len(text))
        max_len = schema.get("maxLength")
        if max_len is not None and len(text) > max_len:
            text = text[: int(max_len)]
        return text
    if typ in ("integer", "number"):
        value: float = 0
        if "minimum" in schema:
            value = schema["minimum"]
        elif "exclusiveMinimum" in schema:
            value = schema["exclusiveMinimum"] + 1
        elif "maximum" in schema and schema["maximum"] < 0:
            value = schema["maximum"]
        elif "exclusiveMaximum" in schema and schema["exclusiveMaximum"] <= 0:
            value = schema["exclusiveMaximum"] - 1
        return int(math.ceil(value)) if typ == "integer" else value
    if typ == "boolean":
        return False
    if typ == "null":
        return None
    return "fake text"


def _text_of(content: Any) -> str:
    """Flatten OpenAI message content (str or list of parts) to plain text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "") if isinstance(p, dict) else str(p) for p in content
        )
    return json.dumps(content)


def last_user_text(request: dict) -> str:
    """Content of the last ``user`` message, so handlers can branch on the prompt."""
    for msg in reversed(request.get("messages") or []):
        if isinstance(msg, dict) and msg.get("role") == "user":
            return _text_of(msg.get("content"))
    return ""


def _default_handler(request: dict) -> FakeReply:
    """Answer structured-output requests with a schema-valid instance, else plain text."""
    fmt = request.get("response_format")
    if isinstance(fmt, dict):
        if fmt.get("type") == "json_schema":
            spec = fmt.get("json_schema") or {}
            return FakeReply(content=example_for_schema(spec.get("schema") or {}))
        if fmt.get("type") == "json_object":
            return FakeReply(content={})
    return FakeReply(content="fake reply")


def _as_reply(value: FakeReply | str | dict | list | None) -> FakeReply:
    return value if isinstance(value, FakeReply) else FakeReply(content=value)


_ERROR_KINDS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "permission_denied"),
    404: ("not_found_error", "model_not_found"),
    408: ("timeout_error", "timeout"),
    413: ("invalid_request_error", "request_too_large"),
    422: ("invalid_request_error", "unprocessable_entity"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


def _error_body(status: int, message: str, code: str | None = None) -> dict:
    typ, default_code = _ERROR_KINDS.get(
        status, ("server_error", "server_error") if status >= 500 else ("api_error", "error")
    )
    param = "messages" if code == "context_length_exceeded" else None
    return {"error": {"message": message, "type": typ, "code": code or default_code, "param": param}}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 2048  # the listen backlog: thousands of clients may connect at once
    fake: "FakeLLMServer"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Swallow client disconnects (expected in timeout tests); keep real bugs loud."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


@dataclass
class _Answer:
    """What the fake sends back for one request, after `delay_s` seconds."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0


def _json_answer(status: int, obj: Any, headers: dict[str, str] | None = None, delay_s: float = 0.0) -> _Answer:
    return _Answer(status, json.dumps(obj).encode(), headers=headers or {}, delay_s=delay_s)


def _answer(fake: "FakeLLMServer", method: str, target: str, raw: bytes) -> _Answer:
    """The answer to one request: the routes, the queue or handler's reply, OpenAI-style errors. Shared by
    both servers, so the lean one (AsyncFakeLLMServer) answers exactly as the threaded one does."""
    path = target.split("?", 1)[0].rstrip("/")
    if method == "GET":
        if path in ("/v1/models", "/models"):
            return _json_answer(200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in ("fake-model", "gpt-4o-mini")]})
        return _json_answer(404, _error_body(404, f"no route GET {target}"))
    if method != "POST" or path not in ("/v1/chat/completions", "/chat/completions"):
        return _json_answer(404, _error_body(404, f"no route {method} {target}"))
    try:
        request = json.loads(raw or b"null")
        if not isinstance(request, dict):
            raise ValueError("body must be a JSON object")
    except ValueError as exc:
        return _json_answer(400, _error_body(400, f"invalid JSON body: {exc}"))

    fake._record(request)
    try:
        reply = fake._next_reply(request)
    except Exception as exc:  # a broken test handler should fail visibly, not hang
        fake.errors.append(exc)
        return _json_answer(500, _error_body(500, f"fake handler raised {exc!r}"))
    if reply.status != 200:
        message = reply.content if isinstance(reply.content, str) else f"fake error {reply.status}"
        body = reply.error_body if reply.error_body is not None else _error_body(reply.status, message,
                                                                                  reply.error_code)
        return _json_answer(reply.status, body, reply.headers, reply.delay_s)
    if request.get("stream"):
        return _stream_answer(request, reply, fake._new_id())
    return _json_answer(200, _completion(request, reply, fake._new_id()), reply.headers, reply.delay_s)


def _stream_answer(request: dict, reply: FakeReply, completion_id: str) -> _Answer:
    """Whole SSE body with Content-Length: simple, and keep-alive still works."""
    full = _completion(request, reply, completion_id)
    base = {k: full[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    msg = full["choices"][0]["message"]
    delta: dict[str, Any] = {"role": "assistant", "content": msg["content"]}
    if "tool_calls" in msg:
        delta["tool_calls"] = [{"index": i, **tc} for i, tc in enumerate(msg["tool_calls"])]
    chunks = [
        base | {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
        base | {
            "choices": [{"index": 0, "delta": {}, "finish_reason": full["choices"][0]["finish_reason"]}],
            "usage": full["usage"],
        },
    ]
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    return _Answer(200, body.encode(), "text/event-stream", {"Cache-Control": "no-cache", **reply.headers},
                   reply.delay_s)


def _head(answer: _Answer, close: bool = False) -> bytes:
    lines = [f"HTTP/1.1 {answer.status} {HTTPStatus(answer.status).phrase}", f"Content-Type: {answer.content_type}",
             f"Content-Length: {len(answer.body)}", *(f"{k}: {v}" for k, v in answer.headers.items())]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # httpx reuses connections
    disable_nagle_algorithm = True  # headers and body go in separate writes: no delayed-ACK stall
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Silence the per-request access log so test output stays clean."""

    def do_GET(self) -> None:
        self._serve(b"")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self._serve(self.rfile.read(length) if length > 0 else b"")  # always drain: keep-alive stays in sync

    def _serve(self, raw: bytes) -> None:
        fake = self.server.fake
        answer = _answer(fake, self.command, self.path, raw)
        if answer.delay_s > 0 and fake._stopping.wait(answer.delay_s):
            self.close_connection = True
            return
        try:
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(answer.body)))
            for k, v in answer.headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(answer.body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True


def _normalise_tool_calls(tool_calls: list[dict]) -> list[dict]:
    """Fill the fields the OpenAI SDK insists on so tests can write terse tool calls."""
    out = []
    for i, tc in enumerate(tool_calls):
        fn = dict(tc.get("function") or {})
        args = fn.get("arguments", "{}")
        fn["arguments"] = args if isinstance(args, str) else json.dumps(args)
        fn.setdefault("name", "tool")
        out.append({"id": tc.get("id", f"call_{i}"), "type": tc.get("type", "function"), "function": fn})
    return out


def _completion(request: dict, reply: FakeReply, completion_id: str) -> dict:
    content = reply.content
    if isinstance(content, (dict, list)):
        content = json.dumps(content)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    finish = "stop"
    if reply.tool_calls:
        message["tool_calls"] = _normalise_tool_calls(reply.tool_calls)
        finish = "tool_calls"
    prompt_text = "".join(
        _text_of(m.get("content")) for m in request.get("messages") or [] if isinstance(m, dict)
    )
    prompt_tokens = reply.prompt_tokens if reply.prompt_tokens is not None else max(1, len(prompt_text) // 4)
    completion_tokens = (
        reply.completion_tokens if reply.completion_tokens is not None else max(1, len(content or "") // 4)
    )
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model", "fake-model"),
        "system_fingerprint": "fp_fake",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class FakeLLMServer:
    """OpenAI-compatible chat-completions server on 127.0.0.1 for tests.

    Replies come from the FIFO ``queue`` first, then from ``handler`` (default:
    schema-valid JSON for ``response_format`` requests, else ``"fake reply"``).
    """

    def __init__(self, handler: Handler | None = None) -> None:
        self._handler: Handler = handler or _default_handler
        self._queue: collections.deque[FakeReply] = collections.deque()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._stopping = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.url: str = ""
        self.requests: list[dict] = []
        self.errors: list[BaseException] = []  # exceptions raised by the handler

    @property
    def calls(self) -> int:
        return len(self.requests)

    def queue(self, *replies: FakeReply | str | dict) -> None:
        """Script the next replies (consumed before the handler is consulted)."""
        with self._lock:
            self._queue.extend(_as_reply(r) for r in replies)

    def set_handler(self, handler: Handler | None) -> None:
        """Swap the fallback handler; ``None`` restores the default one."""
        self._handler = handler or _default_handler

    def start(self) -> "FakeLLMServer":
        if self._httpd is not None:
            return self
        self._stopping.clear()
        httpd = _Server(("127.0.0.1", 0), _RequestHandler)
        httpd.fake = self
        self._httpd = httpd
        self.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-llm", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; delayed replies are abandoned rather than waited for."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None

    def __enter__(self) -> "FakeLLMServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- used by the request handler thread ------------------------------
    def _record(self, request: dict) -> None:
        with self._lock:
            self.requests.append(request)

    def _next_reply(self, request: dict) -> FakeReply:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
            handler = self._handler
        return _as_reply(handler(request))

    def _new_id(self) -> str:
        with self._lock:
            return f"chatcmpl-fake{next(self._ids)}"


class _Connection(asyncio.Protocol):
    """One client connection of AsyncFakeLLMServer: HTTP/1.1 requests with Content-Length, one at a time."""

    def __init__(self, fake: "AsyncFakeLLMServer"):
        self.fake = fake
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False  # an answer is pending (delayed): the next request waits in the buffer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.fake._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fake._connections.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._next()

    def _next(self) -> None:
        while not self.busy and self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
            method, target, _ = (lines[0].split(" ", 2) + ["", ""])[:3]
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            length = int(headers.get("content-length") or 0)
            if len(self.buffer) < end + 4 + length:
                return
            raw = bytes(self.buffer[end + 4:end + 4 + length])
            del self.buffer[:end + 4 + length]
            answer = _answer(self.fake, method, target, raw)
            close = headers.get("connection", "").lower() == "close"
            if answer.delay_s > 0:
                self.busy = True
                asyncio.get_running_loop().call_later(answer.delay_s, self._send, answer, close)
                return
            self._send(answer, close)

    def _send(self, answer: _Answer, close: bool) -> None:
        self.busy = False
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(_head(answer, close) + answer.body)
        if close:
            self.transport.close()
        else:
            self._next()


class AsyncFakeLLMServer(FakeLLMServer):
    """The same fake on one asyncio event loop in one thread: a connection costs no thread, a request a few
    microseconds. For the benchmark, whose 1,000 concurrent conversations would otherwise measure 1,000
    threads of ThreadingHTTPServer contending for the fake's GIL rather than the engine: a real provider's
    latency costs the client's machine nothing. Same answers (`_answer`), same queue, handler and records."""

    def __init__(self, handler: Handler | None = None) -> None:
        super().__init__(handler)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[_Connection] = set()

    def start(self) -> "AsyncFakeLLMServer":
        if self._loop is not None:
            return self
        loop = asyncio.new_event_loop()
        listening = threading.Event()

        def serve() -> None:  # the loop is set up in its own thread: the caller may be running an event loop
            asyncio.set_event_loop(loop)
            self._server = loop.run_until_complete(
                loop.create_server(lambda: _Connection(self), "127.0.0.1", 0, backlog=4096))
            listening.set()
            loop.run_forever()
        self._loop = loop
        self._thread = threading.Thread(target=serve, name="fake-llm-async", daemon=True)
        self._thread.start()
        if not listening.wait(10):
            raise RuntimeError("the asyncio fake LLM server did not start listening")
        assert self._server is not None
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1"
        return self

    def stop(self) -> None:
        """Stop serving; delayed replies are abandoned, open connections closed."""
        loop, self._loop = self._loop, None
        if loop is None:
            return

        def shut() -> None:
            assert self._server is not None
            self._server.close()
            for conn in list(self._connections):
                if conn.transport is not None:
                    conn.transport.abort()
            loop.call_soon(loop.stop)  # after the closes the aborts scheduled: clients see their connections end
        loop.call_soon_threadsafe(shut)
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=5)
        if thread is None or not thread.is_alive():
            loop.close()  # a loop still running (a handler blocking it) is left to its daemon thread
