"""The MCP server in-process, through the real MCP client (transports: test_mcp_transports.py)."""

from __future__ import annotations

import json

import anyio
import pytest
from mcp import Client

from convsim_mcp.server import build_server
from convsim_mcp.views import MAX_RESULT_BYTES, result_bytes

pytestmark = pytest.mark.anyio

CASES = [{"goal": "Check order A1. Ask about returns.", "id": "order"}, {"goal": "Say hi."}]


@pytest.fixture
def server(store):
    return build_server(store)


async def poll_until_done(client: Client, run_id: str, timeout: float = 20) -> dict:
    with anyio.fail_after(timeout):
        while True:
            result = await client.call_tool("get_run", {"run_id": run_id})
            if result.structured_content["status"] != "running":
                return result.structured_content
            await anyio.sleep(0.05)


async def test_tools_publish_schemas_with_descriptions(server):
    async with Client(server) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert {"simulate_conversations", "get_run", "list_runs", "cancel_run"} <= set(tools)
    sim = tools["simulate_conversations"]
    props = sim.input_schema["properties"]
    assert props["test_cases"]["items"]["properties"]["goal"]["description"]
    assert "wait" in props and "description" in props["max_turns"]
    assert sim.output_schema["properties"]["sessions"]


async def test_simulate_with_wait_reports_progress_per_turn(server):
    updates: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress, total, message):
        updates.append((progress, total, message))

    async with Client(server) as client:
        result = await client.call_tool(
            "simulate_conversations", {"target": "tests.agents:echo", "test_cases": CASES, "max_turns": 4},
            progress_callback=on_progress,
        )
    assert not result.is_error, result.content
    run = result.structured_content
    assert run["status"] == "completed" and run["offline"] is True
    assert {s["case_id"] for s in run["sessions"]} == {"order", None}
    assert all(s["stop_reason"] and s["last_agent_reply"].startswith("You said") for s in run["sessions"])
    assert updates and updates[-1][0] == updates[-1][1] == 8
    assert [u[0] for u in updates] == sorted(u[0] for u in updates)
    assert sum("turn" in (u[2] or "") for u in updates) == run["turns_done"]


async def test_background_run_then_get_run_until_done(server):
    async with Client(server) as client:
        started = await client.call_tool(
            "simulate_conversations", {"target": "tests.agents:echo", "test_cases": CASES, "wait": False}
        )
        assert started.structured_content["status"] == "running"
        assert 0 <= started.structured_content["progress"] < 1
        done = await poll_until_done(client, started.structured_content["run_id"])
        runs = (await client.call_tool("list_runs", {})).structured_content["runs"]
    assert done["status"] == "completed" and done["sessions_done"] == 2 and done["progress"] == 1.0
    assert runs[0]["run_id"] == done["run_id"]


async def test_cancel_run_stops_a_background_run_and_keeps_turns(server):
    async with Client(server) as client:
        started = await client.call_tool(
            "simulate_conversations",
            {"target": {"path": "tests.agents:slow", "timeout_s": 30}, "test_cases": [{"goal": "Ask A. Ask B. Ask C."}],
             "wait": False},
        )
        run_id = started.structured_content["run_id"]
        await anyio.sleep(2.3)  # the slow agent has answered turn 1
        cancelled = await client.call_tool("cancel_run", {"run_id": run_id})
        again = await client.call_tool("cancel_run", {"run_id": run_id})
        transcript = json.loads((await client.read_resource(f"convsim://runs/{run_id}")).contents[0].text)
    run = cancelled.structured_content
    assert run["status"] == "cancelled"
    assert run["sessions"][0]["stop_reason"] == "cancelled"
    assert run["sessions"][0]["last_agent_reply"] == "too late"
    assert again.is_error and "not running" in again.content[0].text
    assert [m["role"] for m in transcript["sessions"][0]["messages"]][:2] == ["user", "assistant"]


async def test_transcripts_are_resources(server):
    async with Client(server) as client:
        run = (await client.call_tool(
            "simulate_conversations", {"target": "tests.agents:echo", "test_cases": CASES[:1]}
        )).structured_content
        session = run["sessions"][0]
        body = json.loads((await client.read_resource(session["resource"])).contents[0].text)
        whole = json.loads((await client.read_resource(run["resource"])).contents[0].text)
        templates = [t.uri_template for t in (await client.list_resource_templates()).resource_templates]
    assert body["session_id"] == session["session_id"] and body["test_case"]["id"] == "order"
    assert body["messages"][0] == {"role": "user", "content": "Hello! I'd like to check order A1.", "turn": 1,
                                   "latency_ms": body["messages"][0]["latency_ms"], "usage": body["messages"][0]["usage"]}
    assert whole["run"]["run_id"] == run["run_id"] and len(whole["sessions"]) == 1
    assert "convsim://runs/{run_id}/sessions/{session_id}" in templates


@pytest.mark.parametrize(
    "arguments, expected",
    [
        pytest.param({"target": "no_such_pkg.agent:fn", "test_cases": CASES}, "no_such_pkg", id="bad-module"),
        pytest.param({"target": "tests.agents:no_history_param", "test_cases": CASES}, "'messages' or 'input'",
                     id="bad-signature"),
        pytest.param({"target": "tests.agents:echo", "test_cases": [{"goal": "ok"}, {"persona": "x"}]},
                     "test case 2, field 'goal': is required", id="case-missing-goal"),
        pytest.param({"target": "tests.agents:echo", "test_cases": [{"goal": "ok", "gaol": "x"}]},
                     "did you mean 'goal'", id="case-typo"),
        pytest.param({"target": "tests.agents:echo", "test_cases": "missing.yaml"}, "file not found", id="no-file"),
        pytest.param({"target": "tests.agents:echo", "test_cases": CASES, "max_turns": 0}, "max_turns", id="max-turns"),
        pytest.param({"target": "tests.agents:echo", "test_cases": CASES, "model": "gpt-4o"}, "provider prefix",
                     id="model-without-provider"),
    ],
)
async def test_bad_input_gets_a_specific_error(server, arguments, expected):
    async with Client(server) as client:
        result = await client.call_tool("simulate_conversations", arguments)
    assert result.is_error
    assert expected in result.content[0].text


async def test_unknown_run_id_is_a_specific_error(server):
    async with Client(server) as client:
        result = await client.call_tool("get_run", {"run_id": "run-nope"})
    assert result.is_error and "no run with id 'run-nope'" in result.content[0].text


async def test_list_scorers_describes_the_builtins(server):
    async with Client(server) as client:
        result = (await client.call_tool("list_scorers", {})).structured_content
    names = {s["name"]: s for s in result["scorers"]}
    assert {"goal_achievement", "knowledge_retention", "guidelines", "tool_call_efficiency"} <= set(names)
    assert names["user_frustration"]["output"].startswith("one of ['none', 'resolved', 'unresolved']")
    assert names["goal_achievement"]["default"] and "{{ conversation }}" in result["custom_judge_format"]


async def test_score_sessions_over_mcp_with_progress_and_resource(server):
    updates = []

    async def on_progress(progress, total, message):
        updates.append((progress, total))

    async with Client(server) as client:
        run = (await client.call_tool("simulate_conversations", {
            "target": "examples/support_agent.py:support_agent", "test_cases": "examples/support_cases.yaml",
            "max_turns": 6})).structured_content
        result = await client.call_tool("score_sessions", {
            "run_id": run["run_id"], "scorers": ["knowledge_retention", "goal_achievement"]},
            progress_callback=on_progress)
        scores = json.loads((await client.read_resource(f"convsim://runs/{run['run_id']}/scores")).contents[0].text)
        again = (await client.call_tool("get_run", {"run_id": run["run_id"]})).structured_content
    assert not result.is_error, result.content
    summary = {s["scorer"]: s for s in result.structured_content["scorers"]}
    remember = next(s["session_id"] for s in run["sessions"] if s["case_id"] == "remember-name")
    failing = summary["knowledge_retention"]["failing"]
    assert remember in {f["session_id"] for f in failing}
    assert all(f["turn"] and f["rationale"] for f in failing)
    assert summary["knowledge_retention"]["heuristic"] and result.structured_content["offline"]
    assert updates[-1] == (12, 12)
    assert {a["scorer"] for a in scores["assessments"]} == {"knowledge_retention", "goal_achievement"}
    assert all(a["evidence"] for a in scores["assessments"] if a.get("passed") is False)
    assert {s["scorer"] for s in again["scores"]} == {"knowledge_retention", "goal_achievement"}


async def test_score_inline_transcripts_over_mcp(server):
    transcript = {"messages": [{"role": "user", "content": "Never say 'guaranteed'."},
                               {"role": "assistant", "content": "Delivery is guaranteed by Friday."}]}
    async with Client(server) as client:
        result = await client.call_tool("score_sessions", {
            "transcripts": [transcript],
            "scorers": [{"name": "guidelines", "guidelines": ["Never say \"guaranteed\""]}]})
    (s,) = result.structured_content["scorers"]
    assert s["failed"] == 1 and s["failing"][0]["turn"] == 1


@pytest.mark.parametrize(
    "arguments, expected",
    [
        pytest.param({"run_id": "run-nope"}, "no run with id", id="unknown-run"),
        pytest.param({}, "exactly one of run_id", id="no-source"),
        pytest.param({"run_id": "r", "scorers": [{"name": "x", "instructions": "no variable"}]},
                     "must contain {{ conversation }}", id="custom-judge-without-conversation"),
        pytest.param({"run_id": "r", "scorers": ["tests.code_scorers:mixed"]}, "cannot also take", id="mixed-levels"),
    ],
)
async def test_bad_scoring_requests_get_specific_errors(server, arguments, expected):
    async with Client(server) as client:
        result = await client.call_tool("score_sessions", arguments)
    assert result.is_error and expected in result.content[0].text


AGENT = "examples/support_agent.py:support_agent"


async def test_test_agent_in_background_with_progress_then_report(server):
    async with Client(server) as client:
        started = await client.call_tool("test_agent", {"target": AGENT, "test_cases": "examples/support_cases.yaml",
                                                        "num_test_cases": 3, "max_turns": 6, "wait": False})
        run_id = started.structured_content["run_id"]
        assert started.structured_content["status"] == "running" and started.structured_content["report"] is None
        seen = []
        with anyio.fail_after(30):
            while True:
                run = (await client.call_tool("get_run", {"run_id": run_id})).structured_content
                seen.append(run["progress"])
                if run["status"] != "running":
                    break
                await anyio.sleep(0.02)
        result = (await client.call_tool("get_report", {"run_id": run_id, "markdown": True})).structured_content
        report_md = (await client.read_resource(f"convsim://runs/{run_id}/report.md")).contents[0].text
        report_json = json.loads((await client.read_resource(f"convsim://runs/{run_id}/report")).contents[0].text)
    assert run["status"] == "completed" and "get_report" in run["note"]
    assert seen == sorted(seen)
    digest = result["report"]
    assert digest["issues"][0]["severity"] == "high" and "KeyError" in digest["issues"][0]["title"]
    assert digest["issues"][0]["evidence"]["turn"] == 2
    assert report_md.startswith("# ")
    if result_bytes(result) + 2 * len(report_md.encode()) > MAX_RESULT_BYTES:  # inline only what fits
        assert result["markdown"] is None and f"convsim://runs/{run_id}/report.md" in result["note"]
    else:
        assert result["markdown"] == report_md
    assert report_json["issues"][0]["reproduction"]["scripted_turns"]
    assert set(result["resources"]) == {"report", "report_md", "report_html", "run", "scores"}


async def test_test_agent_waiting_reports_progress_per_stage(server):
    messages = []

    async def on_progress(progress, total, message):
        messages.append(message)

    async with Client(server) as client:
        result = await client.call_tool("test_agent", {"target": AGENT, "num_test_cases": 2, "max_turns": 4},
                                        progress_callback=on_progress)
    assert not result.is_error, result.content
    stages = [m.split(":")[0] for m in messages]
    for stage in ("describe", "generate", "simulate", "discover", "report", "done"):
        assert stage in stages
    assert result.structured_content["report"]["sessions"] == 2


async def test_generate_test_cases_then_simulate_by_test_set_id(server):
    async with Client(server) as client:
        generated = (await client.call_tool("generate_test_cases", {
            "target": AGENT, "num_test_cases": 3, "adversarial": 0.34})).structured_content
        sim = (await client.call_tool("simulate_conversations", {
            "target": AGENT, "test_cases": generated["test_set_id"], "max_turns": 4})).structured_content
        stored = json.loads((await client.read_resource(generated["resource"])).contents[0].text)
    assert generated["offline"] and len(stored["cases"]) == 3  # inline: the first cases that fit, and a count
    assert generated["cases"] == stored["cases"][:len(generated["cases"])]
    assert len(generated["cases"]) + generated["cases_left_out"] == 3 and result_bytes(generated) <= MAX_RESULT_BYTES
    assert sum(c["expectations"].get("kind") == "adversarial" for c in stored["cases"]) == 1
    assert "lookup_order" in " ".join(generated["agent"]["tools"])
    assert sim["sessions_total"] == 3 and stored["id"] == generated["test_set_id"]


async def test_rerun_issue_over_mcp_says_whether_it_still_reproduces(server):
    async with Client(server) as client:
        done = (await client.call_tool("test_agent", {"target": AGENT, "test_cases": "examples/support_cases.yaml",
                                                      "num_test_cases": 0, "max_turns": 6})).structured_content
        first = done["report"]["issues"][0]
        crash = first["id"]
        same = (await client.call_tool("rerun_issue", {"run_id": done["run_id"], "issue_id": crash})).structured_content
        fixed = (await client.call_tool("rerun_issue", {"run_id": done["run_id"], "issue_id": crash,
                                                        "target": "tests.fixed_agent:support_agent"})).structured_content
        bad = await client.call_tool("rerun_issue", {"run_id": done["run_id"], "issue_id": "ISS-nope"})
    # the digest carries what it takes to act: the compact reproducing case and up to three evidence items
    assert first["signature"].startswith("agent_error|KeyError|")
    assert first["reproduction"]["goal"] and first["reproduction"]["scripted_turns"]
    assert 1 <= len(first["evidence_items"]) <= 3
    assert {"session_id", "turn", "quote"} <= set(first["evidence_items"][0])
    assert (same["reproduces"], same["issues"][0]["status"]) == (1, "reproduces")
    assert (fixed["fixed"], fixed["issues"][0]["status"]) == (1, "fixed")
    assert fixed["issues"][0]["reason"] and fixed["new_issues"] == []
    assert bad.is_error and "has no issue 'ISS-nope'" in bad.content[0].text


async def test_get_report_before_a_report_exists_is_a_specific_error(server):
    async with Client(server) as client:
        run = (await client.call_tool("simulate_conversations", {"target": "tests.agents:echo",
                                                                 "test_cases": CASES[:1]})).structured_content
        result = await client.call_tool("get_report", {"run_id": run["run_id"]})
    assert result.is_error and "has no report" in result.content[0].text
