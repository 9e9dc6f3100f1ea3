"""Transports for `convsim-mcp serve`: a stdio wire that answers bad input, network binds that authenticate.

The caller may be a prompt-injected assistant, or anything else that can write to the wire or reach the port.

stdio. The MCP SDK's `stdio_server` keeps its fd claim (fd 0 reads the null device and fd 1 goes to stderr
while serving, so stray prints and child processes cannot corrupt the wire) and parses each line; a line it
cannot parse reaches the session as an exception, which the session drops, so the client hears nothing and
waits. `guarded_streams` sits between the SDK's streams and the session and answers every bad line with a
JSON-RPC error, then carries on with the next:

    not JSON                                  -32700, id null
    a lone surrogate escape ("\\ud800")        -32700 (not text), with the request's id if readable
    JSON, but not a JSON-RPC 2.0 message      -32600, with the request's id if readable
    nested deeper than MAX_MESSAGE_DEPTH      -32600, naming MAX_JSON_DEPTH
    larger than MAX_ARGUMENT_BYTES            -32600, naming MAX_ARGUMENT_BYTES

Bytes that are not UTF-8 are replaced with U+FFFD by the SDK's reader (as Python and most JSON readers do),
so a string with one bad byte is read, and a line of such bytes is "not JSON". On the way out, a message the
SDK could not encode (a lone surrogate in a tool result) would kill the SDK's writer and with it the server:
such strings are repaired (U+FFFD) before they reach the wire.

SSE and streamable HTTP. `NetworkConfig` decides, from the bind address, the bearer token and the
`--allowed-host` names, what the SDK enforces: a non-loopback bind needs a token (`network_config` refuses to
start without one); with a token every request without it or with a wrong one gets 401 (the SDK's
`RequireAuthMiddleware`, fed by `StaticTokenVerifier`); and the Host/Origin checks against DNS rebinding,
which the SDK turns on only for loopback binds, are on for every bind (foreign Host 421, foreign Origin 403).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import mcp_types as types
import uvicorn
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from mcp.server.stdio import stdio_server
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.message import SessionMessage
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from engine import secrets
from engine.errors import InvalidOption
from engine.limits import MAX_ARGUMENT_BYTES, MAX_JSON_DEPTH, has_lone_surrogate, json_depth

log = logging.getLogger("convsim.transport")

# A tool argument may nest MAX_JSON_DEPTH levels (the engine checks each value); around it on the wire are
# the message, its params, the arguments object and the list an item sits in (test cases, transcripts).
ENVELOPE_DEPTH = 4
MAX_MESSAGE_DEPTH = MAX_JSON_DEPTH + ENVELOPE_DEPTH

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
TOKEN_ENV = "CONVSIM_AUTH_TOKEN"
MIN_TOKEN_CHARS = 16
TOKEN_CHARS = re.compile(r"[A-Za-z0-9\-._~+/=]+")  # RFC 6750 b64token: what fits in `Authorization: Bearer`
MAKE_TOKEN = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"

NetworkTransport = Literal["sse", "http"]

LONE_SURROGATE = "Parse error: a string holds a lone UTF-16 surrogate escape (\\ud800-\\udfff), which is not text"
NO_BATCHES = "Invalid Request: JSON-RPC batches (arrays) are not supported; send one message object per line"


# --- stdio ----------------------------------------------------------------------------------------


async def serve_stdio(server: MCPServer) -> None:
    """Serve `server` over stdin/stdout until stdin closes, answering malformed lines instead of dropping them."""
    # MCPServer.run_stdio_async is this, minus the guard; the SDK has no public handle on the low-level
    # server that runs a session over given streams (its own in-memory client reaches for it the same way).
    lowlevel = server._lowlevel_server  # pyright: ignore[reportPrivateUsage]
    secrets.install_log_redaction()
    async with stdio_server() as (wire_in, wire_out), guarded_streams(wire_in, wire_out) as (read, write):
        await lowlevel.run(read, write, lowlevel.create_initialization_options())


@asynccontextmanager
async def guarded_streams(
    wire_in: Any, wire_out: Any
) -> AsyncIterator[tuple[MemoryObjectReceiveStream[SessionMessage | Exception], MemoryObjectSendStream[SessionMessage]]]:
    """The session's (read, write) streams over an SDK transport's pair, with bad input answered on the wire.

    `wire_in` yields what the SDK read (a `SessionMessage`, or the exception a line raised when parsed);
    `wire_out` takes what goes on the wire. Only good messages within the limits reach the session; a bad one
    is answered with a JSON-RPC error. Every outgoing message is made encodable first.
    """
    to_session, session_in = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    outgoing, session_out = anyio.create_memory_object_stream[SessionMessage](0)
    session_write = outgoing.clone()  # the session's; the original is the guard's own, for error replies

    async def read_wire() -> None:
        async with to_session, outgoing:
            async for item in wire_in:
                forward, reply = screen(item)
                if forward is not None:
                    await to_session.send(forward)
                elif reply is not None:
                    await outgoing.send(reply)

    async def write_wire() -> None:
        async with wire_out, session_out:
            async for message in session_out:
                await wire_out.send(encodable(message))

    async with anyio.create_task_group() as tg:
        tg.start_soon(read_wire)
        tg.start_soon(write_wire)
        yield session_in, session_write


def screen(item: SessionMessage | Exception) -> tuple[SessionMessage | None, SessionMessage | None]:
    """(message for the session, reply for the wire): at most one is set; neither when `item` is dropped."""
    if isinstance(item, Exception):
        return None, _reply(*_classify_unparsed(item))
    problem = _over_limits(item.message)
    if problem is None:
        return item, None
    if isinstance(item.message, types.JSONRPCRequest):
        return None, _reply(types.INVALID_REQUEST, problem, item.message.id)
    # A notification or a response gets no reply (JSON-RPC 2.0); the operator sees why it vanished.
    log.warning("dropped an incoming %s: %s", type(item.message).__name__, problem)
    return None, None


def _over_limits(message: types.JSONRPCMessage) -> str | None:
    size = len(types.jsonrpc_message_adapter.dump_json(message, by_alias=True, exclude_unset=True))
    if size > MAX_ARGUMENT_BYTES:
        return _too_large(f"the message ({size} bytes of JSON)")
    if json_depth(message.model_dump(by_alias=True, exclude_unset=True), MAX_MESSAGE_DEPTH) > MAX_MESSAGE_DEPTH:
        return _too_deep()
    return None


def _too_large(what: str) -> str:
    return f"Invalid Request: {what} is larger than MAX_ARGUMENT_BYTES={MAX_ARGUMENT_BYTES} bytes"


def _too_deep() -> str:
    return (f"Invalid Request: the message is nested more than {MAX_MESSAGE_DEPTH} levels deep "
            f"(a value may nest MAX_JSON_DEPTH={MAX_JSON_DEPTH} levels, plus {ENVELOPE_DEPTH} for the envelope)")


def _classify_unparsed(exc: Exception) -> tuple[int, str, types.RequestId | None]:
    """(code, message, id) for a line the SDK could not read as a JSON-RPC message."""
    if not isinstance(exc, ValidationError):
        return types.PARSE_ERROR, f"Parse error: {type(exc).__name__}", None
    errors = exc.errors()
    unparsable = next((e for e in errors if e["type"] == "json_invalid"), None)
    if unparsable is not None:
        raw = unparsable["input"] if isinstance(unparsable["input"], str) else ""
        reason = str(unparsable.get("ctx", {}).get("error") or unparsable["msg"])
        if len(raw.encode("utf-8", "surrogatepass")) > MAX_ARGUMENT_BYTES:
            return types.INVALID_REQUEST, _too_large("the line"), None
        try:  # Python's json is laxer: it reads lone surrogates, and nests deeper before giving up
            parsed: Any = json.loads(raw)
        except RecursionError:
            return types.INVALID_REQUEST, _too_deep(), None
        except ValueError:
            return types.PARSE_ERROR, f"Parse error: not JSON ({reason})", None
        if "recursion limit" in reason:
            return types.INVALID_REQUEST, _too_deep(), _readable_id(parsed)
        if has_lone_surrogate(parsed):
            return types.PARSE_ERROR, LONE_SURROGATE, _readable_id(parsed)
        return types.PARSE_ERROR, f"Parse error: {reason}", _readable_id(parsed)
    # Valid JSON, wrong shape. Errors report the value they failed on; a missing field reports the whole object.
    root = next((e["input"] for e in errors if len(e["loc"]) <= 1), None)
    obj = next((e["input"] for e in errors if e["type"] == "missing" and isinstance(e["input"], dict)), root)
    if isinstance(root, list):
        return types.INVALID_REQUEST, NO_BATCHES, None
    if root is not None and not isinstance(root, dict):
        return types.INVALID_REQUEST, f"Invalid Request: a JSON-RPC message is an object, not {_json_type(root)}", None
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"][1:]) or "message"
    return (types.INVALID_REQUEST, f"Invalid Request: not a JSON-RPC 2.0 message ({where}: {first['msg']})",
            _readable_id(obj))


def _readable_id(obj: Any) -> types.RequestId | None:
    value = obj.get("id") if isinstance(obj, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    return encodable_text(value) if isinstance(value, str) else value


def _json_type(value: Any) -> str:
    return {str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(type(value), "null")


def _reply(code: int, message: str, request_id: types.RequestId | None) -> SessionMessage:
    log.warning("answered a malformed message with %d: %s", code, message)
    error = types.JSONRPCError(jsonrpc="2.0", id=request_id, error=types.ErrorData(code=code, message=message))
    return SessionMessage(error)


# --- encoding what goes out -----------------------------------------------------------------------

_SURROGATE = re.compile("[\ud800-\udfff]")


def encodable(item: SessionMessage) -> SessionMessage:
    """`item`, or a copy whose strings can be written as UTF-8 (lone surrogates become U+FFFD)."""
    try:
        item.message.model_dump_json(by_alias=True, exclude_unset=True)
        return item
    except PydanticSerializationError:
        pass
    data = _repair(item.message.model_dump(by_alias=True, exclude_unset=True))
    log.warning("repaired text that could not be encoded as UTF-8 in an outgoing %s", type(item.message).__name__)
    return SessionMessage(types.jsonrpc_message_adapter.validate_python(data), metadata=item.metadata)


def encodable_text(text: str) -> str:
    """`text` with surrogate pairs joined and lone surrogates replaced by U+FFFD."""
    if not _SURROGATE.search(text):
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _repair(value: Any) -> Any:
    if isinstance(value, str):
        return encodable_text(value)
    if isinstance(value, dict):
        return {_repair(k): _repair(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_repair(v) for v in value]
    return value


# --- network transports ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StaticTokenVerifier:
    """The SDK's TokenVerifier for one operator-chosen bearer token, compared in constant time."""

    token: str = field(repr=False)

    async def verify_token(self, token: str) -> AccessToken | None:
        if hmac.compare_digest(token.encode("utf-8", "surrogatepass"), self.token.encode()):
            return AccessToken(token=token, client_id="convsim-operator", scopes=[])
        return None


@dataclass(frozen=True)
class NetworkConfig:
    """How an SSE or streamable-HTTP server binds, authenticates and checks Host/Origin."""

    host: str
    port: int
    token: str | None = field(default=None, repr=False)
    allowed_hosts: tuple[str, ...] = ()  # extra Host names (--allowed-host), as given

    def server_options(self) -> dict[str, Any]:
        """MCPServer constructor arguments: bearer-token auth through the SDK's hooks, when a token is set."""
        if not self.token:
            return {}
        base = f"http://{_bracketed(self.host)}:{self.port}"
        # Resource-server mode with one static token: no OAuth routes, no resource metadata; the issuer URL is
        # required by AuthSettings but only used by OAuth routes, which are not mounted.
        return {"token_verifier": StaticTokenVerifier(self.token),
                "auth": AuthSettings(issuer_url=base, resource_server_url=None)}

    def transport_security(self) -> TransportSecuritySettings:
        """DNS-rebinding protection for this bind: loopback names, the bind address and the allowed hosts."""
        hosts: list[str] = []
        origins: list[str] = []

        def allow(name: str, ports: Iterable[str]) -> None:
            for port in ports:
                host = f"{name}:{port}" if port else name
                if host not in hosts:
                    hosts.append(host)
                for scheme in ("http", "https"):
                    if f"{scheme}://{host}" not in origins:
                        origins.append(f"{scheme}://{host}")

        for name in LOOPBACK_HOSTS:  # any port, as the SDK allows for loopback: a local proxy or inspector
            allow(_bracketed(name), ("", "*"))
        allow(_bracketed(self.host), ("", str(self.port)))
        for extra in self.allowed_hosts:
            name, port = _split_host(extra)
            allow(name, (port,) if port else ("", str(self.port)))
        return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts,
                                         allowed_origins=origins)

    def describe(self, transport: NetworkTransport) -> str:
        """One stderr line for the operator: where it listens, how it authenticates, which Host names it takes."""
        path = "/sse" if transport == "sse" else "/mcp"
        auth = "bearer token required" if self.token else "no auth token (loopback only)"
        names = ", ".join(dict.fromkeys([*(_bracketed(h) for h in (*LOOPBACK_HOSTS, self.host)), *self.allowed_hosts]))
        return (f"convsim: starting {'SSE' if transport == 'sse' else 'streamable HTTP'} on "
                f"http://{_bracketed(self.host)}:{self.port}{path}; {auth}; accepted Host headers: {names} "
                f"(add names with --allowed-host)")


def network_config(host: str, port: int, token: str | None = None,
                   allowed_hosts: Iterable[str] | None = None) -> NetworkConfig:
    """Validate a network bind; `token` defaults to $CONVSIM_AUTH_TOKEN.

    Raises InvalidOption for a non-loopback bind without a token, a weak token or a malformed host name.
    """
    token = token or os.environ.get(TOKEN_ENV) or None
    if token is not None:
        if len(token) < MIN_TOKEN_CHARS:
            raise InvalidOption(f"the auth token is {len(token)} characters; use at least {MIN_TOKEN_CHARS} "
                                f"random ones, e.g. {TOKEN_ENV}=$({MAKE_TOKEN})")
        if not TOKEN_CHARS.fullmatch(token):
            raise InvalidOption("the auth token has characters that do not fit in an 'Authorization: Bearer' "
                                f"header; use letters, digits and -._~+/=, e.g. {TOKEN_ENV}=$({MAKE_TOKEN})")
        secrets.register(token)
    if token is None and not is_loopback(host):
        raise InvalidOption(f"--host {host} is reachable from other machines, and anyone who reaches the port "
                            f"could run tools: set {TOKEN_ENV} (or pass --auth-token) to a random string of "
                            f"{MIN_TOKEN_CHARS}+ characters, e.g. {TOKEN_ENV}=$({MAKE_TOKEN}), or bind --host "
                            "127.0.0.1")
    extra = []
    for name in allowed_hosts or ():
        name = name.strip()
        if not name or any(c in name for c in "/ ,") or name.startswith("*"):
            raise InvalidOption(f"--allowed-host {name!r} is not a host name: give one name or address per flag, "
                                "optionally with :PORT or :* (e.g. --allowed-host mcp.example.com)")
        extra.append(name)
    return NetworkConfig(host=host, port=port, token=token, allowed_hosts=tuple(extra))


def is_loopback(host: str) -> bool:
    return host.lower() in LOOPBACK_HOSTS


async def serve_network(server: MCPServer, transport: NetworkTransport, config: NetworkConfig) -> None:
    """Serve SSE or streamable HTTP with the config's Host/Origin checks (auth comes with the server options)."""
    security = config.transport_security()
    if transport == "sse":
        app = server.sse_app(transport_security=security, host=config.host)
    else:
        app = server.streamable_http_app(transport_security=security, host=config.host)
    # log_config=None: uvicorn's loggers propagate to the root handler on stderr, where the redaction filter
    # masks the token and every other registered secret (its default config adds handlers of its own).
    secrets.install_log_redaction()
    uv = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_config=None,
                                       log_level="warning", access_log=False))
    print(config.describe(transport), file=sys.stderr)
    await uv.serve()


def _bracketed(host: str) -> str:
    """A host as it appears in a Host header or URL: IPv6 literals in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _split_host(value: str) -> tuple[str, str]:
    """('name', 'port' or '') from 'name', 'name:port', '[v6]', '[v6]:port' or a bare IPv6 literal."""
    if value.startswith("["):
        name, _, rest = value.partition("]")
        return f"{name}]", rest[1:] if rest.startswith(":") else ""
    if value.count(":") == 1:
        name, _, port = value.partition(":")
        return name, port
    return _bracketed(value), ""
