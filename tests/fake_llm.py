"""A real-HTTP fake of an OpenAI-compatible chat-completions server.

Tests point litellm (or httpx) at ``FakeLLMServer().url`` so that retries,
timeouts, keep-alive and JSON parsing run through a genuine socket instead of
a monkeypatched client. Standard library only; binds to 127.0.0.1 on a free
port and never touches any other network.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

__all__ = [
    "FakeReply",
    "FakeLLMServer",
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


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # httpx reuses connections
    disable_nagle_algorithm = True  # headers and body go in separate writes: no delayed-ACK stall
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Silence the per-request access log so test output stays clean."""

    # -- plumbing ---------------------------------------------------------
    def _send(self, status: int, body: bytes, content_type: str, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", headers or {})

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _path(self) -> str:
        return self.path.split("?", 1)[0].rstrip("/")

    # -- routes -------------------------------------------------------------
    def do_GET(self) -> None:
        try:
            if self._path() in ("/v1/models", "/models"):
                self._send_json(200, {
                    "object": "list",
                    "data": [
                        {"id": m, "object": "model", "created": 0, "owned_by": "fake"}
                        for m in ("fake-model", "gpt-4o-mini")
                    ],
                })
            else:
                self._send_json(404, _error_body(404, f"no route GET {self.path}"))
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def do_POST(self) -> None:
        try:
            self._handle_post()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _handle_post(self) -> None:
        raw = self._read_body()  # always drain, so keep-alive stays in sync
        if self._path() not in ("/v1/chat/completions", "/chat/completions"):
            self._send_json(404, _error_body(404, f"no route POST {self.path}"))
            return
        try:
            request = json.loads(raw or b"null")
            if not isinstance(request, dict):
                raise ValueError("body must be a JSON object")
        except ValueError as exc:
            self._send_json(400, _error_body(400, f"invalid JSON body: {exc}"))
            return

        fake = self.server.fake
        fake._record(request)
        try:
            reply = fake._next_reply(request)
        except Exception as exc:  # a broken test handler should fail visibly, not hang
            fake.errors.append(exc)
            self._send_json(500, _error_body(500, f"fake handler raised {exc!r}"))
            return

        if reply.delay_s > 0 and fake._stopping.wait(reply.delay_s):
            self.close_connection = True
            return

        if reply.status != 200:
            message = reply.content if isinstance(reply.content, str) else f"fake error {reply.status}"
            body = reply.error_body if reply.error_body is not None else _error_body(reply.status, message,
                                                                                      reply.error_code)
            self._send_json(reply.status, body, reply.headers)
            return

        if request.get("stream"):
            self._send_stream(request, reply)
        else:
            self._send_json(200, _completion(request, reply, fake._new_id()), reply.headers)

    def _send_stream(self, request: dict, reply: FakeReply) -> None:
        """Whole SSE body with Content-Length: simple, and keep-alive still works."""
        full = _completion(request, reply, self.server.fake._new_id())
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
        headers = {"Cache-Control": "no-cache", **reply.headers}
        self._send(200, body.encode(), "text/event-stream", headers)


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
