"""The real server as a subprocess, driven by the real MCP client over stdio, SSE and streamable HTTP.

Everything runs offline (no API key, the deterministic offline user) and binds 127.0.0.1 only.
The agents are in tests/agents.py: `echo` answers at once, `slow` takes 2 s per reply.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.stdio import StdioServerParameters

from tests.servers import free_port, listening

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow]

ECHO = "tests.agents:echo"
SLOW = {"path": "tests.agents:slow", "timeout_s": 30}
# The offline user reveals one goal sentence per turn, so these goals last 2 and 3 turns.
TWO_TURN_GOAL = "Ask about refunds. Then ask about shipping."
THREE_TURN_GOAL = "Ask about refunds. Then ask about shipping. Finally ask about returns."
TOOLS = {"simulate_conversations", "get_run", "list_runs", "cancel_run"}


# --- helpers ------------------------------------------------------------------------------------


def _child_env(home: Path) -> dict[str, str]:
    """The environment for a server subprocess: no provider keys or model settings, our repo importable."""
    env = {k: v for k, v in os.environ.items()
           if not k.endswith("_API_KEY") and not k.startswith("CONVSIM_") and k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(ROOT), CONVSIM_HOME=str(home), PYTHONUNBUFFERED="1")
    return env




@contextmanager
def _serve(transport: str, workdir: Path, *extra: str) -> Iterator[int]:
    """`convsim-mcp serve --transport TRANSPORT` on a free 127.0.0.1 port; yields the port once it accepts.

    These tests run Python agents over network transports, so the server is started with --allow-code
    unless `extra` says otherwise (the refusal itself is tested in test_security.py)."""
    extra = extra or ("--allow-code",)
    port = free_port()
    log_path = workdir / f"{transport}-server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "convsim_mcp", "serve", "--transport", transport, "--host", "127.0.0.1",
             "--port", str(port), "--db", str(workdir / f"{transport}.sqlite"), *extra],
            cwd=ROOT, env=_child_env(workdir / "home"), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
    with listening(proc, port, log_path):
        yield port


@pytest.fixture(scope="module")
def sse_port(tmp_path_factory) -> Iterator[int]:
    with _serve("sse", tmp_path_factory.mktemp("sse")) as port:
        yield port


@pytest.fixture(scope="module")
def http_port(tmp_path_factory) -> Iterator[int]:
    with _serve("http", tmp_path_factory.mktemp("http")) as port:
        yield port


def _sse(port: int) -> Client:
    return Client(sse_client(f"http://127.0.0.1:{port}/sse"))


def _http(port: int) -> Client:
    return Client(f"http://127.0.0.1:{port}/mcp")


async def _call(client: Client, tool: str, args: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """Call a tool that must succeed; its structured result."""
    result = await client.call_tool(tool, args, **kw)
    assert not result.is_error, f"{tool} failed: {result.content}"
    assert result.structured_content is not None
    return result.structured_content


async def _poll_until_finished(client: Client, run_id: str, timeout: float = 20) -> dict[str, Any]:
    with anyio.fail_after(timeout):
        while True:
            run = await _call(client, "get_run", {"run_id": run_id})
            if run["status"] != "running":
                return run
            await anyio.sleep(0.2)


async def _read_json(client: Client, uri: str) -> Any:
    result = await client.read_resource(uri)
    return json.loads(result.contents[0].text)


# --- stdio --------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_stdio_simulation_reports_progress_and_serves_transcripts_as_resources(tmp_path):
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "convsim_mcp", "serve", "--db", str(tmp_path / "stdio.sqlite")],
        # stdio_client passes only HOME/PATH/...: no key reaches the child, so the offline user plays.
        env={"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "PYTHONPATH": str(ROOT),
             "CONVSIM_HOME": str(tmp_path / "home")},
        cwd=str(ROOT),
    )
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append((done, total, message))

    cases = [{"goal": "get a refund", "id": "refund"}, {"goal": TWO_TURN_GOAL, "persona": "terse"}]
    # A successful session is itself the check that the server wrote nothing but protocol to stdout.
    async with Client(params) as client:
        tools = {t.name for t in (await client.list_tools()).tools}
        assert TOOLS <= tools
        run = await _call(client, "simulate_conversations",
                          {"target": ECHO, "test_cases": cases, "max_turns": 3, "wait": True},
                          progress_callback=on_progress)

        assert run["status"] == "completed"
        assert run["offline"] is True
        assert run["sessions_total"] == 2 and run["sessions_done"] == 2
        assert len(run["sessions"]) == 2
        for s in run["sessions"]:
            assert s["stop_reason"] in {"goal_achieved", "user_ended", "max_turns"}, s
            assert s["turns"] >= 1

        assert progress, "no progress notifications reached the client"
        done = [p[0] for p in progress]
        assert done == sorted(done), f"progress went backwards: {progress}"
        assert all(total and done_ <= total for done_, total, _ in progress)
        assert done[-1] == progress[-1][1]  # the last report is 100 %
        assert any("ended" in (m or "") for _, _, m in progress)

        whole = await _read_json(client, f"convsim://runs/{run['run_id']}")
        assert whole["run"]["status"] == "completed"
        assert len(whole["sessions"]) == 2

        summary = next(s for s in run["sessions"] if s["case_index"] == 1)
        assert summary["resource"] == f"convsim://runs/{run['run_id']}/sessions/{summary['session_id']}"
        session = await _read_json(client, summary["resource"])
        assert session["session_id"] == summary["session_id"]
        assert session["stop_reason"] == summary["stop_reason"]
        messages = session["messages"]
        users = [m for m in messages if m["role"] == "user"]
        agents = [m for m in messages if m["role"] == "assistant"]
        assert len(users) == len(agents) == 2
        for u, a in zip(users, agents):
            assert u["content"] and a["content"] == "You said: " + u["content"]
        assert "refunds" in users[0]["content"] and "shipping" in users[1]["content"]


# --- SSE ----------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_sse_background_run_completes_and_is_pollable(sse_port):
    async with _sse(sse_port) as client:
        started = await _call(client, "simulate_conversations", {
            "target": ECHO, "test_cases": [{"goal": "track my order"}, {"goal": TWO_TURN_GOAL}],
            "max_turns": 3, "model": "offline", "wait": False,
        })
        assert started["status"] in {"running", "completed"}
        assert started["sessions_total"] == 2
        run = await _poll_until_finished(client, started["run_id"])
    assert run["status"] == "completed"
    assert run["sessions_done"] == 2
    assert all(s["stop_reason"] for s in run["sessions"])
    assert run["turns_done"] == 3  # 1 + 2 turns


@pytest.mark.anyio
async def test_background_run_outlives_the_connection_that_started_it(sse_port):
    async with _sse(sse_port) as client:
        started = await _call(client, "simulate_conversations", {
            "target": SLOW, "test_cases": [{"goal": TWO_TURN_GOAL}], "max_turns": 3, "model": "offline",
            "wait": False,
        })
    run_id = started["run_id"]
    assert started["status"] == "running"

    async with _sse(sse_port) as client:  # a new connection: the first one is closed
        again = await _call(client, "get_run", {"run_id": run_id})
        assert again["status"] in {"running", "completed"}, again
        listed = await _call(client, "list_runs", {"limit": 50})
        assert run_id in {r["run_id"] for r in listed["runs"]}
        run = await _poll_until_finished(client, run_id, timeout=30)
    assert run["status"] == "completed", run
    [session] = run["sessions"]
    assert session["stop_reason"] == "goal_achieved"
    assert session["turns"] == 2
    assert session["last_agent_reply"] == "too late"


@pytest.mark.anyio
async def test_cancel_run_stops_a_background_run_and_keeps_completed_turns(sse_port):
    async with _sse(sse_port) as client:
        started = await _call(client, "simulate_conversations", {
            "target": SLOW, "test_cases": [{"goal": THREE_TURN_GOAL}, {"goal": THREE_TURN_GOAL, "id": "second"}],
            "max_turns": 3, "model": "offline", "wait": False,
        })
        run_id = started["run_id"]
        # Wait until the first exchange of each session is complete (the agent takes 2 s per reply).
        with anyio.fail_after(15):
            while True:
                run = await _call(client, "get_run", {"run_id": run_id})
                assert run["status"] == "running", run
                if all(s["last_agent_reply"] for s in run["sessions"]):
                    break
                await anyio.sleep(0.2)

        cancelled = await _call(client, "cancel_run", {"run_id": run_id})
        assert cancelled["status"] == "cancelled"
        assert cancelled["sessions_done"] == 2
        assert cancelled["stop_reasons"] == {"cancelled": 2}
        for s in cancelled["sessions"]:
            assert s["stop_reason"] == "cancelled"
            assert s["turns"] >= 1
            assert s["last_agent_reply"] == "too late"

        # The completed turns are in the transcript.
        whole = await _read_json(client, f"convsim://runs/{run_id}")
        for session in whole["sessions"]:
            assert session["stop_reason"] == "cancelled"
            roles = [m["role"] for m in session["messages"]]
            # the second turn's reply was still 2 s away: cancel_run did not wait for the agent
            assert roles == ["user", "assistant", "user"], roles
            assert session["messages"][1]["content"] == "too late"

        # Still cancelled later (not overwritten by a late finish), and a second cancel is refused clearly.
        await anyio.sleep(0.5)
        assert (await _call(client, "get_run", {"run_id": run_id}))["status"] == "cancelled"
        again = await client.call_tool("cancel_run", {"run_id": run_id})
        assert again.is_error
        assert "not running" in again.content[0].text


# --- streamable HTTP ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_http_lists_the_four_tools(http_port):
    async with _http(http_port) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert TOOLS <= set(tools)
    schema = tools["simulate_conversations"].input_schema
    assert "target" in schema["required"]
    assert {"test_cases", "from_run"} <= set(schema["properties"])  # test_cases, or from_run an earlier run's


@pytest.mark.anyio
async def test_http_bad_target_error_names_the_missing_module(http_port):
    async with _http(http_port) as client:
        result = await client.call_tool("simulate_conversations", {
            "target": "no_such_module:fn", "test_cases": [{"goal": "hi"}], "model": "offline",
        })
    assert result.is_error
    text = result.content[0].text
    assert "no_such_module" in text, text
    assert text.strip() != "Error executing tool simulate_conversations"


@pytest.mark.anyio
async def test_http_bad_test_case_error_names_the_case_index_and_field(http_port):
    async with _http(http_port) as client:
        before = len((await _call(client, "list_runs", {"limit": 200}))["runs"])
        result = await client.call_tool("simulate_conversations", {
            "target": ECHO, "test_cases": [{"goal": "ok"}, {"persona": "x"}], "model": "offline",
        })
        assert result.is_error
        text = result.content[0].text
        assert "test case 2" in text and "goal" in text, text
        # The request was rejected before a run was created.
        assert len((await _call(client, "list_runs", {"limit": 200}))["runs"]) == before


@pytest.mark.anyio
async def test_http_background_run_completes_and_is_pollable(http_port):
    async with _http(http_port) as client:
        started = await _call(client, "simulate_conversations", {
            "target": ECHO, "test_cases": [{"goal": TWO_TURN_GOAL}], "max_turns": 3, "model": "offline",
            "wait": False,
        })
        run = await _poll_until_finished(client, started["run_id"])
        assert run["status"] == "completed"
        [session] = run["sessions"]
        assert session["stop_reason"] == "goal_achieved" and session["turns"] == 2
        transcript = await _read_json(client, session["resource"])
        assert [m["role"] for m in transcript["messages"]] == ["user", "assistant"] * 2


# --- the operator's policy over a network transport ------------------------------------------------


@pytest.mark.anyio
async def test_http_server_without_allow_code_refuses_code_targets_and_files(tmp_path):
    with _serve("http", tmp_path, "--allow-agent-host", "agents.internal") as port:
        async with _http(port) as client:
            code = await client.call_tool("simulate_conversations", {"target": ECHO, "test_cases": [{"goal": "hi"}]})
            file = await client.call_tool("simulate_conversations", {"target": "http://127.0.0.1:9/v1",
                                                                     "test_cases": "examples/support_cases.yaml"})
            host = await client.call_tool("simulate_conversations", {"target": "http://evil.example/v1",
                                                                     "test_cases": [{"goal": "hi"}]})
            runs = await _call(client, "list_runs", {})
    assert code.is_error and "not accepted over the http transport unless the server is started with --allow-code" \
        in code.content[0].text
    assert file.is_error and "file arguments are not accepted over the http transport" in file.content[0].text
    assert host.is_error and "host 'evil.example' is refused" in host.content[0].text
    assert runs["runs"] == []
