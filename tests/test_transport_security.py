"""The transports under hostile input: real `convsim-mcp serve` subprocesses fed raw bytes.

stdio: every malformed line gets a JSON-RPC error reply, and the next request is answered.
Nothing needs the network or an API key.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp.shared.message import SessionMessage

from convsim_mcp.transport import MAX_MESSAGE_DEPTH, guarded_streams
from engine.limits import MAX_ARGUMENT_BYTES, MAX_JSON_DEPTH

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
