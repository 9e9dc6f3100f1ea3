"""Adapters that send a conversation to the agent under test and normalise its reply.

A target spec is a string or a `TargetSpec`:

- `"pkg.module:func"` / `"path/to/file.py:func"`: a Python callable, sync or
  async, taking `messages` (or `input`) plus keyword context: `session_id`,
  `mlflow_session_id` (same value, for agents written for MLflow) and the test
  case's `context`. Only keywords it accepts are passed.
- `"http(s)://..."` or `{url, kind: "openai", model, headers}`: an
  OpenAI-compatible chat endpoint; the full history is sent each turn.
- `{url, kind: "json", request, response_path}`: a stateful JSON agent that
  gets only the last user message and a session id.

Every reply shape becomes a list of transcript `Message`s (see
`normalise_reply`); a reply is never JSON-dumped into message text.
Failures raise `AgentError`; `InvalidTarget` is raised before any run.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import sysconfig
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import anyio
import httpx

from .. import secrets
from ..errors import AgentError, InvalidTarget
from ..limits import (
    MAX_JSON_DEPTH,
    MAX_MESSAGE_CHARS,
    MAX_REPLY_BYTES,
    MAX_REPLY_MESSAGES,
    MAX_TOOL_CALLS,
    json_depth,
)
from ..models import RESERVED_CONTEXT_KEYS, Message, TargetSpec, TestCase, ToolCall
from ..settings import env_list
from ..threads import run_sync
from ..workspace import Workspace, as_workspace

ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
SCHEME_ONLY = re.compile(r"\s*(?:Bearer|Basic|Token|Bot|ApiKey)?\s*", re.I)
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_.]*)\s*\}\}")
HISTORY_PARAMS = ("messages", "input")
SESSION_PARAMS = ("session_id", "mlflow_session_id")
DEFAULT_JSON_REQUEST = {"message": "{{message}}", "session_id": "{{session_id}}"}


@dataclass
class AgentReply:
    """The agent's reply as transcript messages; `text` is the final assistant content."""

    messages: list[Message]
    latency_ms: float

    @property
    def text(self) -> str:
        for m in reversed(self.messages):
            if m.role == "assistant":
                return (m.content or "").strip()
        return ""

    @property
    def empty(self) -> bool:
        return not self.text and not any(m.tool_calls for m in self.messages)


POOL_SHARD = 128  # connections per HTTP connection pool of an HTTP target (see _HTTPTarget._client)


class Target:
    """The agent under test. Implementations raise `AgentError` from `respond`."""

    spec: TargetSpec
    connections: int = 100  # requests in flight at once (a run's concurrency): an HTTP target's pool size

    def size_for(self, concurrency: int) -> None:
        """Take up to `concurrency` requests at once (call before the first): an HTTP target sizes its
        connection pool to it, so a 1,000-conversation run does not queue behind httpx's default 100."""
        self.connections = max(concurrency, 100)

    async def respond(self, history: list[Message], *, session_id: str, context: dict[str, Any]) -> AgentReply:
        """Send the conversation so far (ending with the user's message) and return the agent's reply."""
        started = time.perf_counter()
        # a bare deadline scope: what anyio.fail_after does, without its generator (a few us on every turn)
        with anyio.CancelScope(deadline=anyio.current_time() + self.spec.timeout_s) as deadline:
            raw = await self._call(history, session_id=session_id, context=context)
        if deadline.cancelled_caught:
            raise AgentError(f"agent did not reply within {self.spec.timeout_s:g}s", kind="timeout")
        latency = (time.perf_counter() - started) * 1000
        return AgentReply(messages=_bounded(normalise_reply(raw, history)), latency_ms=round(latency, 2))

    async def _call(self, history: list[Message], *, session_id: str, context: dict[str, Any]) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not implement _call")

    def check_cases(self, cases: list[TestCase]) -> None:
        """Raise InvalidTarget if the agent cannot be called for some case (before anything runs)."""

    async def aclose(self) -> None:
        """Release connections."""


def resolve_target(spec: str | dict[str, Any] | TargetSpec, *,
                   workspace: Workspace | str | Path | None = None) -> Target:
    """Build a target from its spec under the workspace's rules; raise InvalidTarget with what to fix."""
    spec = parse_target_spec(spec)
    ws = as_workspace(workspace)
    if spec.kind == "python":
        return PythonTarget(spec, workspace=ws)
    ws.check_agent_url(spec.url or "")
    if spec.kind == "openai":
        return OpenAITarget(spec)
    return JSONTarget(spec)


def parse_target_spec(spec: str | dict[str, Any] | TargetSpec) -> TargetSpec:
    if isinstance(spec, TargetSpec):
        parsed = spec
    elif isinstance(spec, str):
        text = spec.strip()
        if not text:
            raise InvalidTarget("target is empty: give 'pkg.module:func', 'path/to/file.py:func' or an http(s) URL")
        if text.startswith("{"):
            try:
                return parse_target_spec(json.loads(text))
            except json.JSONDecodeError as e:
                raise InvalidTarget(f"target looks like JSON but does not parse: {e}") from e
            except RecursionError:
                raise InvalidTarget(f"target JSON is nested more than {MAX_JSON_DEPTH} levels deep "
                                    "(MAX_JSON_DEPTH)") from None
        parsed = TargetSpec(url=text) if re.match(r"^https?://", text) else TargetSpec(path=text)
    elif isinstance(spec, dict):
        if "protocol" in spec and "kind" not in spec:  # the design guide's name for the same field
            spec = {("kind" if k == "protocol" else k): v for k, v in spec.items()}
        if json_depth(spec) > MAX_JSON_DEPTH:
            raise InvalidTarget(f"target object is nested more than {MAX_JSON_DEPTH} levels deep (MAX_JSON_DEPTH)")
        try:
            parsed = TargetSpec.model_validate(spec)
        except Exception as e:
            raise InvalidTarget(f"target object is invalid: {_first_error(e)}") from e
    else:
        raise InvalidTarget(f"target must be a string or an object, got {type(spec).__name__}")
    kind = parsed.kind or ("python" if parsed.path else "openai")
    if kind == "python" and not parsed.path:
        raise InvalidTarget("a python target needs 'path' ('pkg.module:func' or 'file.py:func')")
    if kind in ("openai", "json"):
        if not parsed.url or not re.match(r"^https?://", parsed.url):
            raise InvalidTarget(f"a {kind} target needs 'url' starting with http:// or https://")
        _register_url_secrets(parsed.url)
        _check_url(parsed.url)
    if kind != "json" and (parsed.request is not None or parsed.response_path):
        raise InvalidTarget("'request' and 'response_path' apply only to kind 'json' targets")
    return parsed.model_copy(update={"kind": kind})


def _check_url(url: str) -> None:
    """Raise InvalidTarget unless httpx can send to `url`: it parses, names a host, and its port is 0-65535."""
    shown = url if len(url) <= 200 else url[:200] + "..."
    try:
        parsed = httpx.URL(url)
        port = parsed.port
    except (httpx.InvalidURL, UnicodeError, ValueError) as e:
        raise InvalidTarget(f"target url {shown!r} is not a valid URL: {e}") from None
    if not parsed.host:
        raise InvalidTarget(f"target url {shown!r} names no host")
    if port is not None and not 0 <= port <= 65535:
        raise InvalidTarget(f"target url {shown!r}: port {port} is not a TCP port (0-65535)")


def redacted_spec(spec: TargetSpec) -> dict[str, Any]:
    """The spec as stored and shown: header values that are not ${VAR} references, and a URL's password
    and query values, become '***'."""
    data = spec.model_dump(exclude_none=True, exclude_defaults=True)
    data["kind"] = spec.kind
    if spec.headers:
        data["headers"] = {k: v if _only_references(v) else "***" for k, v in spec.headers.items()}
    if spec.url:
        data["url"] = redacted_url(spec.url)
    return data


def redacted_url(url: str) -> str:
    """`url` with the password of its userinfo and every query value masked (they are often keys)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = netloc.replace(f":{parts.password}@", ":***@", 1)
    query = "&".join(f"{k}=***" if v else k for k, v in parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit((parts.scheme, netloc, parts.path, query if parts.query else "", parts.fragment))


def _register_url_secrets(url: str) -> None:
    """A URL's password and query values are secrets: masked wherever the URL is echoed (errors, logs)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL at all: _check_url says so
        return
    secrets.register(password)
    for _, value in parse_qsl(parts.query):
        secrets.register(value)


def _only_references(value: str) -> bool:
    """True if a header value holds no literal secret: only ${VAR} references and an auth scheme word."""
    return bool(ENV_REF.search(value)) and bool(SCHEME_ONLY.fullmatch(ENV_REF.sub("", value)))


# --- Python callables ---------------------------------------------------------------------------


class PythonTarget(Target):
    """A function by import path. Sync functions run in a worker thread so they cannot block the loop."""

    def __init__(self, spec: TargetSpec, *, workspace: Workspace):
        self.spec = spec
        self._roots = workspace.roots
        self.fn = workspace.load_callable(spec.path or "", what="agent")
        self._is_async = inspect.iscoroutinefunction(self.fn) or inspect.iscoroutinefunction(
            getattr(self.fn, "__call__", None)
        )
        try:
            self._sig = inspect.signature(self.fn)
        except (TypeError, ValueError) as e:
            raise InvalidTarget(f"cannot read the signature of {spec.path}: {e}") from e
        params = self._sig.parameters
        self._history_param = next((p for p in HISTORY_PARAMS if p in params), None)
        if self._history_param is None:
            raise InvalidTarget(
                f"{spec.path} must take the conversation as a parameter named 'messages' or 'input' "
                f"(it takes: {', '.join(params) or 'nothing'})"
            )
        self._var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        # the parameters a keyword can fill, in order: read once, as every turn asks
        self._accepted = tuple(n for n, p in params.items()
                               if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))

    def _kwargs(self, history: list[dict[str, Any]], session_id: str, context: dict[str, Any]) -> dict[str, Any]:
        offered = {k: v for k, v in context.items() if k not in RESERVED_CONTEXT_KEYS}  # never ours to override
        offered.update({self._history_param: history, "session_id": session_id, "mlflow_session_id": session_id})
        if self._var_kw:
            return offered
        return {k: v for k, v in offered.items() if k in self._accepted}

    def check_cases(self, cases: list[TestCase]) -> None:
        supplied = {self._history_param, *SESSION_PARAMS}
        for i, case in enumerate(cases):
            missing = [
                n for n in self._accepted
                if self._sig.parameters[n].default is inspect.Parameter.empty
                and n not in supplied and n not in case.context
            ]
            if missing:
                raise InvalidTarget(
                    f"{self.spec.path} requires {', '.join(repr(m) for m in missing)}, which test case {i + 1} does not "
                    f"supply: add it to the case's 'context' or give the parameter a default"
                )

    async def _call(self, history, *, session_id, context):
        kwargs = self._kwargs([m.to_openai() for m in history], session_id, context)
        try:
            if self._is_async:
                return await self.fn(**kwargs)
            result = await run_sync(lambda: self.fn(**kwargs), what="agent")
            if inspect.isawaitable(result):
                return await result
            return result
        except (anyio.get_cancelled_exc_class(), AgentError):
            raise
        except Exception as e:
            raise AgentError(f"{type(e).__name__}: {e}", kind="exception",
                             frames=agent_frames(e, self._roots)) from e


# --- HTTP ---------------------------------------------------------------------------------------


class _HTTPTarget(Target):
    def __init__(self, spec: TargetSpec):
        self.spec = spec
        refs = sorted({m for v in spec.headers.values() for m in ENV_REF.findall(v)})
        allowed = set(env_list("CONVSIM_AGENT_ENV"))
        unlisted = [r for r in refs if r not in allowed]
        if unlisted:
            raise InvalidTarget(
                f"target headers reference ${{{unlisted[0]}}}, which the operator has not listed for agents: header "
                f"variables are expanded only when named in CONVSIM_AGENT_ENV (e.g. CONVSIM_AGENT_ENV="
                f"{','.join(unlisted)}), so that no caller can send the server's keys or other secrets to a URL"
            )
        missing = [r for r in refs if r not in os.environ]
        if missing:
            raise InvalidTarget(
                f"target headers reference environment variable(s) {', '.join(missing)}, which are not set; "
                "export them (for a stdio MCP server, pass them in the server's 'env' config)"
            )
        for name, value in spec.headers.items():  # HTTP sends headers as ASCII bytes; the value may be a secret
            if not (name.isascii() and ENV_REF.sub(lambda m: os.environ.get(m.group(1), ""), value).isascii()):
                raise InvalidTarget(f"target header {name[:60]!r}: header names and values must be ASCII text")
        self._clients: list[httpx.AsyncClient] = []
        self._turn = 0

    def _client(self) -> httpx.AsyncClient:
        """One of the pools, in turn. httpx's pool looks at every connection it holds on each request, so
        one pool of 2,000 connections costs O(2,000) per request; POOL_SHARD connections a pool keeps it flat.
        A run of up to POOL_SHARD conversations (the default) has one pool, as before."""
        if not self._clients:
            shards = -(-self.connections // POOL_SHARD)
            per = -(-self.connections // shards)
            per += per // 4 if shards > 1 else 0  # in turn is even over time, not at every instant: some slack
            keepalive = per if self.connections > 100 else 20
            self._clients = [httpx.AsyncClient(timeout=httpx.Timeout(self.spec.timeout_s), limits=httpx.Limits(
                max_connections=per, max_keepalive_connections=keepalive)) for _ in range(shards)]
        self._turn = (self._turn + 1) % len(self._clients)
        return self._clients[self._turn]

    def _headers(self) -> dict[str, str]:
        """The headers with ${VAR} expanded; every expanded value and literal token is registered as a secret."""
        headers = {}
        for name, value in self.spec.headers.items():
            expanded = ENV_REF.sub(lambda m: os.environ.get(m.group(1), ""), value)
            secrets.register(expanded)
            for part in expanded.split():
                secrets.register(part)
            headers[name] = expanded
        return headers

    async def _post(self, url: str, body: dict[str, Any]) -> Any:
        try:
            async with self._client().stream("POST", url, json=body, headers=self._headers()) as resp:
                raw = await _read_bounded(resp)
        except httpx.TimeoutException as e:
            raise AgentError(f"agent did not reply within {self.spec.timeout_s:g}s", kind="timeout") from e
        except (httpx.HTTPError, httpx.InvalidURL) as e:
            raise AgentError(f"could not reach the agent at {url}: {type(e).__name__}: {e}", kind="http") from e
        text = raw.decode(resp.encoding or "utf-8", errors="replace")
        if resp.status_code >= 400:
            raise AgentError(f"agent returned HTTP {resp.status_code}: {_excerpt(text)}", kind="http",
                             status=resp.status_code)
        content_type = resp.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type and "json" not in content_type:
            raise AgentError(f"agent replied {content_type}, expected JSON (application/json): "
                             f"{_excerpt(text, 120)}", kind="unparseable")
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            raise AgentError(f"agent reply is not JSON: {_excerpt(text, 120)}", kind="unparseable") from None

    async def aclose(self) -> None:
        clients, self._clients = self._clients, []
        for client in clients:
            await client.aclose()


class OpenAITarget(_HTTPTarget):
    """An OpenAI-compatible chat-completions endpoint. Stateless: the full history goes every turn."""

    def __init__(self, spec: TargetSpec):
        super().__init__(spec)
        url = (spec.url or "").rstrip("/")
        self.url = url + "/chat/completions" if url.endswith("/v1") else url

    async def _call(self, history, *, session_id, context):
        body: dict[str, Any] = {"messages": [m.to_openai() for m in history]}
        body["model"] = self.spec.model or "default"
        return await self._post(self.url, body)


class JSONTarget(_HTTPTarget):
    """A stateful JSON agent: gets the last user message and a session id, keeps its own history."""

    def __init__(self, spec: TargetSpec):
        super().__init__(spec)
        self.template = spec.request if spec.request is not None else DEFAULT_JSON_REQUEST
        names = set(_placeholders(self.template))
        unknown = sorted(n for n in names if n not in ("message", "session_id", "context") and not n.startswith("context."))
        if unknown:
            raise InvalidTarget(
                f"request template uses unknown placeholder(s) {', '.join(unknown)}; "
                "use {{message}}, {{session_id}}, {{context}} or {{context.KEY}}"
            )
        if "message" not in names:
            raise InvalidTarget("request template must contain {{message}} (where the user's message goes)")

    def check_cases(self, cases: list[TestCase]) -> None:
        keys = {n.split(".", 1)[1] for n in _placeholders(self.template) if n.startswith("context.")}
        for i, case in enumerate(cases):
            missing = sorted(k for k in keys if k not in case.context)
            if missing:
                raise InvalidTarget(
                    f"request template uses {{{{context.{missing[0]}}}}}, which test case {i + 1} does not supply in 'context'"
                )

    async def _call(self, history, *, session_id, context):
        last_user = next((m.content or "" for m in reversed(history) if m.role == "user"), "")
        values = {"message": last_user, "session_id": session_id, "context": context}
        body = _fill(self.template, values)
        data = await self._post(self.spec.url or "", body)
        if self.spec.response_path:
            return _dig(data, self.spec.response_path)
        return data


def _placeholders(template: Any) -> list[str]:
    if isinstance(template, str):
        return PLACEHOLDER.findall(template)
    if isinstance(template, dict):
        return [n for v in template.values() for n in _placeholders(v)]
    if isinstance(template, list):
        return [n for v in template for n in _placeholders(v)]
    return []


def _lookup(name: str, values: dict[str, Any]) -> Any:
    if name.startswith("context."):
        return values["context"].get(name.split(".", 1)[1])
    return values[name]


def _fill(template: Any, values: dict[str, Any]) -> Any:
    """Fill placeholders; a string that is exactly one placeholder takes the value's own JSON type."""
    if isinstance(template, str):
        whole = PLACEHOLDER.fullmatch(template.strip())
        if whole:
            return _lookup(whole.group(1), values)
        return PLACEHOLDER.sub(lambda m: _as_text(_lookup(m.group(1), values)), template)
    if isinstance(template, dict):
        return {k: _fill(v, values) for k, v in template.items()}
    if isinstance(template, list):
        return [_fill(v, values) for v in template]
    return template


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _dig(data: Any, path: str) -> Any:
    current = data
    for part in path.split("."):
        if isinstance(current, list) and part.isdigit() and int(part) < len(current):
            current = current[int(part)]
        elif isinstance(current, dict) and part in current:
            current = current[part]
        else:
            keys = list(current)[:10] if isinstance(current, dict) else type(current).__name__
            raise AgentError(
                f"response_path '{path}' not found in the agent's reply: no '{part}' (available: {keys})",
                kind="unparseable",
            )
    return current


# --- reply normalisation ------------------------------------------------------------------------


def normalise_reply(raw: Any, history: list[Message]) -> list[Message]:
    """Turn any supported reply shape into transcript messages (tool calls kept structured).

    Shapes: str; {"content": ...} or a message dict; a chat-completion dict or object
    ({"choices": [...]}); {"messages": [...]} (new messages after the history, else the
    trailing assistant/tool messages); objects with `model_dump()`.
    """
    if raw is None:
        return [Message(role="assistant", content="")]
    if isinstance(raw, str):
        return [Message(role="assistant", content=raw)]
    try:
        raw = _plain(raw)
    except RecursionError:
        raw = None
    if raw is None or json_depth(raw) > MAX_JSON_DEPTH:
        raise AgentError(f"agent reply is nested more than {MAX_JSON_DEPTH} levels deep", kind="unparseable")
    if isinstance(raw, list):
        raw = {"messages": raw}
    if not isinstance(raw, dict):
        raise AgentError(f"agent returned {type(raw).__name__}; expected a string or a message/dict", kind="unparseable")
    if isinstance(raw.get("choices"), list) and raw["choices"]:
        choice = raw["choices"][0]
        msg = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(msg, dict):
            raise AgentError("agent's chat completion has no choices[0].message", kind="unparseable")
        return [_message(msg)]
    if isinstance(raw.get("messages"), list):
        msgs = [m for m in raw["messages"] if isinstance(m, dict)]
        if len(msgs) > len(history) and all(
            m.get("role") == h.role and (m.get("content") or "") == (h.content or "") for m, h in zip(msgs, history)
        ):
            new = msgs[len(history):]
        else:
            last_user = max((i for i, m in enumerate(msgs) if m.get("role") == "user"), default=-1)
            new = msgs[last_user + 1:]
        new = [m for m in new if m.get("role") in ("assistant", "tool")]
        if len(new) > MAX_REPLY_MESSAGES:  # before building them: a reply of 300,000 messages costs nothing here
            raise AgentError(f"agent reply has {len(new)} messages; at most {MAX_REPLY_MESSAGES} "
                             "(MAX_REPLY_MESSAGES)", kind="unparseable")
        if not new:
            raise AgentError("agent's 'messages' reply contains no assistant message", kind="unparseable")
        return [_message(m) for m in new]
    if "content" in raw or "tool_calls" in raw:
        return [_message({"role": "assistant", **raw})]
    for key in ("output", "response", "reply", "text", "answer"):
        if key in raw and isinstance(raw[key], (str, dict)):
            return normalise_reply(raw[key], history)
    raise AgentError(
        f"cannot find the reply in the agent's output (keys: {', '.join(list(raw)[:10])}); return a string, "
        "{'content': ...}, a chat completion or {'messages': [...]}, or set the target's response_path",
        kind="unparseable",
    )


def _plain(value: Any) -> Any:
    """Objects (pydantic models, SDK response objects) as plain dicts and lists, recursively."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    if hasattr(value, "__dict__"):
        return {k: _plain(v) for k, v in vars(value).items() if not k.startswith("_")}
    return value


def _message(d: dict[str, Any]) -> Message:
    role = d.get("role") or "assistant"
    if role not in ("assistant", "tool"):
        role = "assistant"
    content = d.get("content")
    if isinstance(content, list):  # content parts: keep the text parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    elif content is not None and not isinstance(content, str):
        raise AgentError(f"agent message content must be text, got {type(content).__name__}", kind="unparseable")
    tool_calls = None
    if isinstance(d.get("tool_calls"), list) and len(d["tool_calls"]) > MAX_TOOL_CALLS:
        raise AgentError(f"agent message has {len(d['tool_calls'])} tool calls; at most {MAX_TOOL_CALLS} "
                         "(MAX_TOOL_CALLS)", kind="unparseable")
    if d.get("tool_calls"):
        try:
            tool_calls = [ToolCall.model_validate(_tool_call_dict(tc)) for tc in d["tool_calls"]]
        except Exception as e:
            raise AgentError(f"agent returned malformed tool_calls: {_first_error(e)}", kind="unparseable") from e
    return Message(role=role, content=content, tool_calls=tool_calls, tool_call_id=d.get("tool_call_id"), name=d.get("name"))


def _tool_call_dict(tc: dict[str, Any]) -> dict[str, Any]:
    fn = dict(tc.get("function") or {})
    if not isinstance(fn.get("arguments", ""), str):
        fn["arguments"] = json.dumps(fn["arguments"])
    return {"id": tc.get("id"), "type": tc.get("type") or "function", "function": fn}


async def _read_bounded(resp: httpx.Response) -> bytes:
    """The response body, refused once it passes MAX_REPLY_BYTES (nothing more is read)."""
    chunks, size = [], 0
    async for chunk in resp.aiter_bytes():
        size += len(chunk)
        if size > MAX_REPLY_BYTES:
            raise AgentError(f"agent reply is larger than {MAX_REPLY_BYTES} bytes (MAX_REPLY_BYTES)", kind="unparseable")
        chunks.append(chunk)
    return b"".join(chunks)


def _bounded(messages: list[Message]) -> list[Message]:
    """Agent messages with secrets masked (an agent may echo its own header) and within the size bounds."""
    if len(messages) > MAX_REPLY_MESSAGES:
        raise AgentError(f"agent reply has {len(messages)} messages; at most {MAX_REPLY_MESSAGES} "
                         "(MAX_REPLY_MESSAGES)", kind="unparseable")
    for m in messages:
        calls = m.tool_calls or []
        texts = [m.content or "", m.name or "", m.tool_call_id or "", *(json.dumps(c.function) for c in calls)]
        longest = max(len(t) for t in texts)
        if longest > MAX_MESSAGE_CHARS:
            raise AgentError(f"agent reply has a text of {longest} characters (content, name or tool call "
                             f"arguments); at most {MAX_MESSAGE_CHARS} (MAX_MESSAGE_CHARS)", kind="unparseable")
        if len(calls) > MAX_TOOL_CALLS:
            raise AgentError(f"agent message has {len(calls)} tool calls; at most {MAX_TOOL_CALLS} (MAX_TOOL_CALLS)",
                             kind="unparseable")
        if m.content:
            m.content = secrets.redact(m.content)
        for call in m.tool_calls or []:
            call.function = secrets.redact_data(call.function)
    return messages


MAX_ERROR_FRAMES = 8  # the agent's innermost frames kept on a crash


def agent_frames(error: BaseException, roots: tuple[Path, ...]) -> list[str]:
    """The agent's own frames of `error`'s traceback, outermost first, as "path/in/root.py:42 in respond".

    Only files under a workspace root count, named relative to it; convsim's own files, site-packages and
    the standard library are left out. Redacted like every other text. At most MAX_ERROR_FRAMES (innermost).
    """
    engine_dir = Path(__file__).resolve().parents[1]
    skip = [engine_dir, engine_dir.parent / "convsim_mcp"]
    skip += [Path(p).resolve() for p in {sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib")} if p]
    frames: list[str] = []
    for fs in traceback.extract_tb(error.__traceback__):
        try:
            file = Path(fs.filename).resolve()
        except (OSError, ValueError):
            continue
        if "site-packages" in file.parts or "dist-packages" in file.parts:
            continue
        if any(file == s or s in file.parents for s in skip):
            continue
        root = next((r for r in roots if r in file.parents), None)
        if root is None:
            continue
        frames.append(secrets.redact(f"{file.relative_to(root).as_posix()}:{fs.lineno} in {fs.name}"))
    return frames[-MAX_ERROR_FRAMES:]


def _excerpt(text: str, limit: int = 200) -> str:
    text = secrets.redact(" ".join(text.split()))
    return text if len(text) <= limit else text[:limit] + "..."


def _first_error(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        try:
            err = errors()[0]
            return f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
        except Exception:
            pass
    return str(e).splitlines()[0]
