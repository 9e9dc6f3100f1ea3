"""What the MCP layer costs an assistant, through the real client: results bounded whatever a run's size,
the sessions that need attention first, paging that loses and repeats nothing, a lean tools/list."""

from __future__ import annotations

import json

import anyio
import pytest
from mcp import Client

from convsim_mcp.server import build_server
from convsim_mcp.views import MAX_RESULT_BYTES, lean_schema
from engine.simulation import LLMSimulatedUser

pytestmark = pytest.mark.anyio

TOOLS_LIST_BUDGET = 12_000  # input schemas and descriptions of every tool, compact JSON bytes
N = 1000
EVERY, CRASH_AT, BREAK_AT = 100, 7, 42  # cases 7, 107, ...: the agent crashes (failed); 42, 142, ...: the
# simulated user fails (untested)
UNTESTABLE = "UNTESTABLE"


async def agent(messages, crash=False):
    if crash:
        raise KeyError("gift_card")
    return "Noted. Anything else I should know?"


class BreakingUser(LLMSimulatedUser):
    """The offline user, except on goals marked UNTESTABLE, where it fails: the session cannot test the agent."""

    async def next_turn(self, context):
        if UNTESTABLE in context.goal:
            raise RuntimeError("the simulated user's model went away")
        return await super().next_turn(context)


def _cases(n: int, every: int = EVERY) -> list[dict]:
    cases = []
    for i in range(n):
        case = {"goal": "Ask about opening hours. Ask about prices. Ask about parking.", "id": f"case-{i}"}
        if i % every == CRASH_AT % every:
            case["context"] = {"crash": True}
        if i % every == BREAK_AT % every:
            case["goal"] += f" {UNTESTABLE}"
        cases.append(case)
    return cases


async def _simulate(client: Client, n: int, every: int = EVERY):
    with anyio.fail_after(120):
        result = await client.call_tool("simulate_conversations", {
            "target": "tests.test_mcp_results:agent", "test_cases": _cases(n, every), "max_turns": 2,
            "model": "offline", "concurrency": 200, "user_agent": "tests.test_mcp_results:BreakingUser"})
    assert not result.is_error, result.content
    return result


def received(result) -> int:
    """Bytes the client got: structured content plus every text block."""
    structured = json.dumps(result.structured_content, ensure_ascii=False, separators=(",", ":")).encode()
    return len(structured) + sum(len(c.text.encode()) for c in result.content if c.type == "text")


RANK = {"failed": 0, "untested": 1, "running": 2, "ok": 3}


async def test_a_1000_session_run_stays_bounded_and_lists_failed_then_untested_first(store):
    async with Client(build_server(store)) as client:
        sim = await _simulate(client, N)
        run = sim.structured_content
        first = await client.call_tool("get_run", {"run_id": run["run_id"]})
        middle = await client.call_tool("get_run", {"run_id": run["run_id"], "offset": N // 2, "limit": 50})

    for result in (sim, first, middle):
        assert received(result) <= MAX_RESULT_BYTES, received(result)
    assert run["sessions_total"] == N and run["failed"] == N // EVERY and run["untested"] == N // EVERY
    listed = run["sessions"]
    assert 0 < len(listed) < N and run["left_out"] == N - len(listed) and run["next_offset"] == len(listed)
    assert [s["status"] for s in listed] == ["failed"] * len(listed)  # 10 failed come first, then 10 untested
    assert listed[0]["stop_reason"] == "agent_error" and "KeyError" in listed[0]["why"]
    assert [s["case_id"] for s in listed] == [f"case-{i}" for i in range(CRASH_AT, N, EVERY)][:len(listed)]
    assert first.structured_content["sessions"] == listed
    page = middle.structured_content
    assert page["offset"] == N // 2 and page["next_offset"] == N // 2 + len(page["sessions"])
    assert 0 < len(page["sessions"]) < 50 and page["left_out"] == N - len(page["sessions"])  # fewer than asked: fit
    assert {s["status"] for s in page["sessions"]} == {"ok"}


async def test_paging_a_run_returns_every_session_once_in_rank_order(store):
    n, every = 120, 10
    async with Client(build_server(store)) as client:
        run = (await _simulate(client, n, every)).structured_content
        pages, offset, seen = [], 0, []
        while offset is not None:
            page = await client.call_tool("get_run", {"run_id": run["run_id"], "offset": offset, "limit": 50})
            pages.append(page)
            seen += page.structured_content["sessions"]
            offset = page.structured_content["next_offset"]
    stored = await store.session_ids(run["run_id"])

    assert len(pages) > 1 and all(received(p) <= MAX_RESULT_BYTES for p in pages)
    ids = [s["session_id"] for s in seen]
    assert len(ids) == len(set(ids)) == n and set(ids) == set(stored)  # nothing lost, nothing twice
    statuses = [s["status"] for s in seen]
    assert statuses == sorted(statuses, key=RANK.get)
    assert statuses.count("failed") == statuses.count("untested") == n // every
    assert all(s["stop_reason"] == "simulator_error" and "simulated user failed" in s["why"]
               for s in seen if s["status"] == "untested")


async def test_tools_list_is_lean(store):
    async with Client(build_server(store)) as client:
        tools = (await client.list_tools()).tools
    compact = lambda x: len(json.dumps(x, ensure_ascii=False, separators=(",", ":")).encode())  # noqa: E731
    inputs = sum(compact(t.input_schema) + len((t.description or "").encode()) for t in tools)
    assert inputs <= TOOLS_LIST_BUDGET, inputs
    for t in tools:
        assert "title" not in json.dumps(t.input_schema).replace('"title": {', ""), t.name  # no pydantic titles
        if t.output_schema:
            assert lean_schema(t.output_schema, descriptions=False, defaults=False) == t.output_schema, t.name


@pytest.mark.parametrize("schema, lean", [
    pytest.param({"anyOf": [{"type": "string"}, {"type": "null"}], "default": None, "title": "X"},
                 {"type": ["string", "null"]}, id="optional-string"),
    pytest.param({"anyOf": [{"enum": ["a", "b"], "type": "string"}, {"type": "null"}]},
                 {"enum": ["a", "b", None]}, id="optional-enum"),
    pytest.param({"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}, {"type": "null"}]},
                 {"type": ["array", "string", "null"], "items": {"type": "string"}}, id="types-merge"),
    pytest.param({"anyOf": [{"type": "string", "minLength": 2}, {"type": "string"}]},
                 {"anyOf": [{"type": "string", "minLength": 2}, {"type": "string"}]}, id="same-type-kept"),
    pytest.param({"anyOf": [{"$ref": "#/$defs/A"}, {"type": "null"}]},
                 {"anyOf": [{"$ref": "#/$defs/A"}, {"type": "null"}]}, id="ref-kept"),
    pytest.param({"type": "object", "properties": {"title": {"type": "string", "title": "Title"}},
                  "additionalProperties": True}, {"type": "object", "properties": {"title": {"type": "string"}}},
                 id="a-field-named-title-stays"),
])
def test_lean_schema_drops_only_what_accepts_nothing_more(schema, lean):
    assert lean_schema(schema) == lean


async def test_test_agent_results_page_their_issues_within_the_budget(store):
    async with Client(build_server(store)) as client:
        done = await client.call_tool("test_agent", {"target": "examples/support_agent.py:support_agent",
                                                     "test_cases": "examples/support_cases.yaml",
                                                     "num_test_cases": 0, "max_turns": 6})
        run_id = done.structured_content["run_id"]
        pages, offset = [], 0
        while offset is not None:
            page = await client.call_tool("get_report", {"run_id": run_id, "offset": offset, "limit": 1})
            pages.append(page)
            offset = page.structured_content["next_offset"]
        full = json.loads((await client.read_resource(f"convsim://runs/{run_id}/report")).contents[0].text)

    assert all(received(r) <= MAX_RESULT_BYTES for r in (done, *pages))
    every = [i["id"] for i in full["issues"]]
    assert len(every) > 1 and [p.structured_content["report"]["issues"][0]["id"] for p in pages] == every
    first = done.structured_content
    listed = [i["id"] for i in first["report"]["issues"]]
    assert listed == every[:len(listed)] and first["left_out"] == len(every) - len(listed)
    assert pages[-1].structured_content["left_out"] == len(every) - 1


async def test_list_runs_stays_bounded_and_counts_the_runs_it_left_out(store):
    asked = 120
    for i in range(asked):
        await store.create_run(run_id=f"run-{i:012x}", kind="simulate", target={"path": "tests.agents:echo"},
                               options={}, model="offline", offline=True, test_cases=[], sessions_total=0)
    async with Client(build_server(store)) as client:
        result = await client.call_tool("list_runs", {"limit": asked})
    listed = result.structured_content
    assert received(result) <= MAX_RESULT_BYTES
    assert 0 < len(listed["runs"]) < asked and len(listed["runs"]) + listed["left_out"] == asked


async def test_scoring_a_run_stays_bounded_and_says_how_many_verdicts_it_listed(store):
    async with Client(build_server(store)) as client:
        run = (await _simulate(client, 60, 3)).structured_content
        scored = await client.call_tool("score_sessions", {"run_id": run["run_id"], "model": "offline"})
    assert not scored.is_error, scored.content
    summary = scored.structured_content
    whole = sum(s["failed"] + s["unscored"] for s in summary["scorers"]) + summary["untested"]
    listed = sum(len(s["failing"]) + len(s["errors"]) for s in summary["scorers"]) + len(summary["untested_sessions"])
    assert received(scored) <= MAX_RESULT_BYTES and 0 < listed < whole
    assert f"Listed {listed} of {whole}" in summary["note"]
