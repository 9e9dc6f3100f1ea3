"""The transports under hostile input: real `convsim-mcp serve` subprocesses, raw bytes and real HTTP requests.

stdio: every malformed line gets a JSON-RPC error reply, and the next request is answered.
SSE and streamable HTTP: a bearer token gates every request; Host and Origin are checked on every bind,
0.0.0.0 included; a non-loopback bind without a token refuses to start. Servers bind or are reached on
127.0.0.1 only; nothing needs the network or an API key.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import mcp_types as types
import pytest
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.message import SessionMessage

from convsim_mcp.transport import MAX_MESSAGE_DEPTH, guarded_streams
from engine.limits import MAX_ARGUMENT_BYTES, MAX_JSON_DEPTH

from tests.servers import free_port, listening

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "convsim-test-token-0123456789abcdef"
REPLY_TIMEOUT = 15

pytestmark = [pytest.mark.slow]


def _child_env(home: Path, **extra: str) -> dict[str, str]:
    """No provider keys or convsim settings from the outer environment; our repo importable."""
    env = {k: v for k, v in os.environ.items()
           if not k.endswith("_API_KEY") and not k.startswith("CONVSIM_") and k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(ROOT), CONVSIM_HOME=str(home), PYTHONUNBUFFERED="1", **extra)
    return env




def _serve_args(transport: str, host: str, port: int, workdir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "convsim_mcp", "serve", "--transport", transport, "--host", host,
            "--port", str(port), "--db", str(workdir / "serve.sqlite"), *extra]


# --- stdio ----------------------------------------------------------------------------------------


class StdioWire:
    """A raw `convsim-mcp serve` over pipes: write lines, read reply lines (with a deadline)."""

    def __init__(self, workdir: Path):
        self.log = workdir / "stdio-server.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "convsim_mcp", "serve", "--db", str(workdir / "stdio.sqlite")],
                cwd=ROOT, env=_child_env(workdir / "home"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
            )
        self.lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.next_id = 1000

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def send(self, raw: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(raw + b"\n")
        self.proc.stdin.flush()

    def receive(self) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=REPLY_TIMEOUT)
        except queue.Empty:
            pytest.fail(f"no reply within {REPLY_TIMEOUT} s (server exit code: {self.proc.poll()})")
        line.decode("utf-8")  # strict: the server never writes undecodable bytes
        return json.loads(line)

    def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": self.next_id, "method": method}
        if params is not None:
            message["params"] = params
        self.send(json.dumps(message).encode())
        reply = self.receive()
        assert reply["id"] == self.next_id, reply
        return reply

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


@pytest.fixture(scope="module")
def wire(tmp_path_factory) -> Iterator[StdioWire]:
    w = StdioWire(tmp_path_factory.mktemp("stdio"))
    try:
        init = w.request("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                        "clientInfo": {"name": "raw", "version": "0"}})
        assert "result" in init, init
        w.send(b'{"jsonrpc":"2.0","method":"notifications/initialized"}')
        yield w
    finally:
        w.close()


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _tool_call(request_id: int, value: bytes) -> bytes:
    return (b'{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{"name":"list_runs","arguments":{"x":%s}}}'
            % (request_id, value))


BAD_LINES = {
    "not JSON": (b"this is not json", types.PARSE_ERROR, None, "not JSON"),
    "undecodable bytes": (b"\xff\xfe\xfd", types.PARSE_ERROR, None, "not JSON"),
    "truncated JSON": (b'{"jsonrpc":"2.0","id":3,"method":"tools/list"', types.PARSE_ERROR, None, "not JSON"),
    "nested 200 deep": (_tool_call(4, _nested(200)), types.INVALID_REQUEST, 4, "MAX_JSON_DEPTH"),
    "nested past the limit": (_tool_call(5, _nested(MAX_MESSAGE_DEPTH)), types.INVALID_REQUEST, 5,
                              "MAX_JSON_DEPTH"),
    "lone surrogate": (b'{"jsonrpc":"2.0","id":6,"method":"tools/list","params":{"cursor":"\\ud800"}}',
                       types.PARSE_ERROR, 6, "surrogate"),
    "lone low surrogate in a key": (b'{"jsonrpc":"2.0","id":7,"method":"tools/list","params":{"\\udc00x":1}}',
                                    types.PARSE_ERROR, 7, "surrogate"),
    "JSON array": (b'[{"jsonrpc":"2.0","id":8,"method":"tools/list"}]', types.INVALID_REQUEST, None, "batch"),
    "JSON number": (b"42", types.INVALID_REQUEST, None, "object"),
    "JSON string": (b'"tools/list"', types.INVALID_REQUEST, None, "object"),
    "no jsonrpc member": (b'{"id":9,"method":"tools/list"}', types.INVALID_REQUEST, 9, "jsonrpc"),
    "wrong jsonrpc version": (b'{"jsonrpc":"1.0","id":10,"method":"tools/list"}', types.INVALID_REQUEST, 10,
                              "jsonrpc"),
    "method not a string": (b'{"jsonrpc":"2.0","id":"eleven","method":11}', types.INVALID_REQUEST, "eleven",
                            "method"),
}


@pytest.mark.parametrize("name", BAD_LINES)
def test_stdio_answers_a_malformed_line_then_the_next_request(wire, name):
    raw, code, request_id, words = BAD_LINES[name]
    wire.send(raw)
    reply = wire.receive()
    assert reply["jsonrpc"] == "2.0"
    assert reply["id"] == request_id, reply
    assert reply["error"]["code"] == code, reply
    assert words.lower() in reply["error"]["message"].lower(), reply

    tools = wire.request("tools/list")
    assert "simulate_conversations" in {t["name"] for t in tools["result"]["tools"]}


def test_stdio_refuses_a_line_larger_than_max_argument_bytes(wire):
    filler = b"a" * (MAX_ARGUMENT_BYTES + 10)
    wire.send(b'{"jsonrpc":"2.0","id":12,"method":"tools/list","params":{"cursor":"%s"}}' % filler)
    reply = wire.receive()
    assert reply["id"] == 12
    assert reply["error"]["code"] == types.INVALID_REQUEST
    assert "MAX_ARGUMENT_BYTES" in reply["error"]["message"]
    assert wire.request("tools/list")["result"]["tools"]


def test_stdio_reads_a_value_nested_max_json_depth_deep(wire):
    wire.send(_tool_call(13, _nested(MAX_JSON_DEPTH)))
    reply = wire.receive()
    assert reply["id"] == 13
    # The tool itself answers (the value is not a valid argument), not the transport's depth limit.
    assert "MAX_JSON_DEPTH" not in json.dumps(reply), reply


def test_stdio_replaces_undecodable_bytes_inside_a_string(wire):
    wire.send(b'{"jsonrpc":"2.0","id":14,"method":"tools/call","params":{"name":"get_run",'
              b'"arguments":{"run_id":"r\xffx"}}}')
    reply = wire.receive()
    assert reply["id"] == 14
    assert "\ufffd" in json.dumps(reply["result"], ensure_ascii=False), reply  # the tool saw U+FFFD


def test_stdio_drops_a_notification_past_the_limit_without_a_reply(wire):
    wire.send(b'{"jsonrpc":"2.0","method":"notifications/cancelled","params":{"x":%s}}' % _nested(100))
    reply = wire.request("tools/list")  # the next line read is this answer, not an error for the notification
    assert reply["result"]["tools"]


@pytest.mark.anyio
async def test_outgoing_lone_surrogates_are_replaced_before_the_wire():
    """A tool result holding a lone surrogate would stop the SDK's stdout writer; the guard repairs it."""
    wire_in_send, wire_in = anyio.create_memory_object_stream[SessionMessage | Exception](1)
    wire_out, wire_out_read = anyio.create_memory_object_stream[SessionMessage](1)
    with anyio.fail_after(5):
        async with guarded_streams(wire_in, wire_out) as (_, write):
            await write.send(SessionMessage(types.JSONRPCResponse(
                jsonrpc="2.0", id=1, result={"text": "a\ud800b", "pair": "\ud83d\ude00"})))
            sent = await wire_out_read.receive()
            await write.aclose()
            await wire_in_send.aclose()
    encoded = json.loads(sent.message.model_dump_json())
    assert encoded["result"] == {"text": "a\ufffdb", "pair": "\U0001f600"}


# --- network transports: helpers ------------------------------------------------------------------


@dataclass
class Served:
    transport: str
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{'sse' if self.transport == 'sse' else 'mcp'}"


def _start(workdir: Path, transport: str, host: str, *extra: str, env: dict[str, str] | None = None,
           verbose: bool = False) -> Iterator[Served]:
    """`convsim-mcp serve` on a free port (reached through 127.0.0.1); yields once it accepts connections."""
    port = free_port()
    log = workdir / f"{transport}-{host}.log"
    args = _serve_args(transport, host, port, workdir, *extra)
    if verbose:
        args.insert(3, "-v")  # `convsim_mcp -v serve ...`: debug logs, the most a log could leak
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=_child_env(workdir / "home", **(env or {})),
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    with listening(proc, port, log):
        yield Served(transport, port, log)


@pytest.fixture(scope="module", params=["http", "sse"])
def loopback(request, tmp_path_factory) -> Iterator[Served]:
    """127.0.0.1 with a token (the flag for HTTP, CONVSIM_AUTH_TOKEN for SSE), debug logs on."""
    workdir = tmp_path_factory.mktemp(f"loopback-{request.param}")
    if request.param == "http":
        yield from _start(workdir, "http", "127.0.0.1", "--auth-token", TOKEN, verbose=True)
    else:
        yield from _start(workdir, "sse", "127.0.0.1", env={"CONVSIM_AUTH_TOKEN": TOKEN}, verbose=True)


@pytest.fixture(scope="module", params=["http", "sse"])
def everywhere(request, tmp_path_factory) -> Iterator[Served]:
    """0.0.0.0 with a token and one extra allowed Host name."""
    workdir = tmp_path_factory.mktemp(f"everywhere-{request.param}")
    yield from _start(workdir, request.param, "0.0.0.0", "--auth-token", TOKEN,
                      "--allowed-host", "mcp.example.test")


def _status(served: Served, token: str | None = TOKEN, **headers: str) -> int:
    """The HTTP status of the transport's opening request (POST initialize, or GET the SSE stream)."""
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    with httpx.Client(timeout=10) as http:
        if served.transport == "sse":
            with http.stream("GET", served.url, headers=headers) as response:  # the body is an endless stream
                return response.status_code
        body = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
                "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                           "clientInfo": {"name": "raw", "version": "0"}}}
        headers.setdefault("Accept", "application/json, text/event-stream")
        return http.post(served.url, json=body, headers=headers).status_code


async def _list_tools(served: Served, token: str) -> set[str]:
    """A real MCP client session over the transport, sending the bearer token."""
    headers = {"Authorization": f"Bearer {token}"}
    with anyio.fail_after(20):
        if served.transport == "sse":
            async with Client(sse_client(served.url, headers=headers)) as client:
                return {t.name for t in (await client.list_tools()).tools}
        async with (httpx2.AsyncClient(headers=headers, timeout=20) as http,
                    Client(streamable_http_client(served.url, http_client=http)) as client):
            return {t.name for t in (await client.list_tools()).tools}


# --- bearer token ---------------------------------------------------------------------------------


def test_a_request_without_the_token_gets_401(loopback):
    assert _status(loopback, token=None) == 401


def test_a_request_with_a_wrong_token_gets_401(loopback):
    assert _status(loopback, token="x" + TOKEN[1:]) == 401
    assert _status(loopback, token=TOKEN[:-1]) == 401  # a prefix is not the token


def test_a_non_bearer_authorization_header_gets_401(loopback):
    assert _status(loopback, token=None, Authorization=f"Basic {TOKEN}") == 401


@pytest.mark.anyio
async def test_a_client_with_the_token_gets_a_working_session(loopback):
    assert "simulate_conversations" in await _list_tools(loopback, TOKEN)


def test_the_token_never_appears_in_the_server_log(loopback):
    _status(loopback, token=TOKEN, Origin="http://evil.example")  # a refusal, logged
    _status(loopback, token=TOKEN)
    _status(loopback, token=TOKEN + "-wrong")
    time.sleep(0.3)  # the log is unbuffered, but written by another process
    log = loopback.log.read_text(errors="replace")
    assert "convsim: starting" in log and "Invalid Origin header" in log, log[-2000:]
    assert TOKEN not in log


# --- refusing to start ----------------------------------------------------------------------------


def _run_serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convsim_mcp", "serve", "--db", str(tmp_path / "x.sqlite"), *args],
                          cwd=ROOT, env=_child_env(tmp_path / "home", **(env or {})), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=30, check=False)


@pytest.mark.parametrize("transport", ["http", "sse"])
def test_a_non_loopback_bind_without_a_token_refuses_to_start(tmp_path, transport):
    done = _run_serve(tmp_path, "--transport", transport, "--host", "0.0.0.0", "--port", str(free_port()))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("InvalidOption: --host 0.0.0.0"), lines[0]
    assert "CONVSIM_AUTH_TOKEN" in lines[0] and "--auth-token" in lines[0] and "127.0.0.1" in lines[0]
    assert done.stdout == ""


def test_a_short_token_is_refused(tmp_path):
    done = _run_serve(tmp_path, "--transport", "http", "--port", str(free_port()),
                      env={"CONVSIM_AUTH_TOKEN": "short-secret"})
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("InvalidOption: the auth token is 12 characters; use at least 16"), line
    assert "short-secret" not in line


# --- Host and Origin ------------------------------------------------------------------------------


def test_a_0000_bind_refuses_a_foreign_host(everywhere):
    assert _status(everywhere, Host="evil.example") == 421
    assert _status(everywhere, Host=f"evil.example:{everywhere.port}") == 421


def test_a_0000_bind_refuses_a_foreign_origin(everywhere):
    assert _status(everywhere, Origin="http://evil.example") == 403
    assert _status(everywhere, Origin="null") == 403


def test_a_0000_bind_serves_loopback_and_bind_address_hosts(everywhere):
    assert _status(everywhere) == 200  # Host: 127.0.0.1:PORT
    assert _status(everywhere, Host=f"localhost:{everywhere.port}", Origin="http://localhost:3000") == 200
    assert _status(everywhere, Host=f"0.0.0.0:{everywhere.port}") == 200


def test_allowed_host_admits_another_name_and_its_origin(everywhere):
    name = f"mcp.example.test:{everywhere.port}"
    assert _status(everywhere, Host=name, Origin=f"http://{name}") == 200
    assert _status(everywhere, Host="mcp.example.test", Origin="https://mcp.example.test") == 200
    assert _status(everywhere, Host="mcp.example.test:1") == 421  # the name, on this port only


def test_a_0000_bind_checks_the_token_too(everywhere):
    assert _status(everywhere, token=None) == 401


def test_a_loopback_bind_refuses_a_foreign_host_and_origin(loopback):
    assert _status(loopback, Host="evil.example") == 421
    assert _status(loopback, Origin="http://evil.example") == 403
