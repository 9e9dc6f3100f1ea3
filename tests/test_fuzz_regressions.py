"""Regressions for the bugs tests/test_fuzz_tools.py found: each input once crashed behind the server's
guard ("internal error in <tool>: ...", a convsim bug by its own words), failed a background run, or left
the store unable to list its runs. Now each is refused before anything runs, with a reason."""

from __future__ import annotations

import io
import json
import re

import pytest
from mcp import Client

from convsim_mcp.server import build_server
from engine import InvalidOption, InvalidTarget, Workspace
from engine.judging.registry import parse_scorers
from engine.records import record_to_session
from engine.simulation.targets import parse_target_spec, resolve_target

pytestmark = pytest.mark.anyio

AGENT = "def echo(messages):\n    return 'You said: ' + str(messages[-1]['content'])\n"


@pytest.fixture
def workspace(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    (root / "agent.py").write_text(AGENT)
    (root / "scorer.py").write_text("def always(session):\n    return True\n")
    return Workspace.default(base=root)


async def call(server, tool: str, arguments: dict) -> tuple[bool, str]:
    async with Client(server) as client:
        result = await client.call_tool(tool, arguments)
        listed = await client.call_tool("list_runs", {})
    assert not listed.is_error, listed.content  # the server still lists its runs afterwards
    return result.is_error, result.content[0].text


def assert_refused(failed: bool, text: str, reason: str) -> None:
    assert failed and reason in text, text
    assert "internal error" not in text, text


# --- lone surrogates (the server's guard) --------------------------------------------------------

@pytest.mark.parametrize("tool, arguments", [
    pytest.param("get_report", {"run_id": "run-\ud800"}, id="id-to-sqlite"),  # was UnicodeEncodeError from sqlite
    pytest.param("simulate_conversations", {"target": "agent.py:echo", "test_cases": [{"goal": "Say \udc80 hi"}],
                                            "max_turns": 1}, id="echoed-in-the-result"),  # was the masked error
    pytest.param("simulate_conversations", {"target": "http://127.0.0.1:9/\udc80", "test_cases": [{"goal": "hi"}],
                                            "wait": False}, id="stored-target"),  # was: list_runs failed ever after
    pytest.param("score_sessions", {"transcripts": [{"messages": [{"role": "user", "content": "hi"}],
                                                     "metadata": {"note": ["\udfff"]}}]}, id="nested"),
])
async def test_a_lone_surrogate_anywhere_in_the_arguments_is_refused_before_anything_runs(store, workspace, tool,
                                                                                           arguments):
    server = build_server(store, workspace=workspace)
    failed, text = await call(server, tool, arguments)
    assert_refused(failed, text, "holds a lone UTF-16 surrogate")
    assert await store.list_runs() == []


# --- paths (the workspace) -----------------------------------------------------------------------

@pytest.mark.parametrize("path, reason", [
    pytest.param("cases\x00.yaml", "contains a NUL character", id="nul"),  # was ValueError: embedded null byte
    pytest.param("~nosuchuser-convsim/cases.yaml", "is not a usable path", id="unknown-user"),  # was RuntimeError
    pytest.param("x" * 300 + ".yaml", "cannot be looked up: File name too long", id="name-too-long"),  # was OSError
])
def test_a_file_argument_that_cannot_be_a_path_is_refused(workspace, path, reason):
    with pytest.raises(InvalidOption, match=reason):
        workspace.resolve_file(path, what="test case file")
    with pytest.raises(InvalidTarget, match=reason):
        workspace.code_file(path.replace(".yaml", ".py") + ":fn", what="agent")


async def test_an_overlong_test_set_id_is_an_unknown_test_set(store, workspace):
    server = build_server(store, workspace=workspace)
    failed, text = await call(server, "simulate_conversations", {"target": "agent.py:echo",
                                                                 "test_cases": "set-" + "x" * 300})
    assert_refused(failed, text, "no test set with id")  # was OSError: File name too long


async def test_transcript_file_paths_are_checked_too(store, workspace):
    server = build_server(store, workspace=workspace)
    failed, text = await call(server, "score_sessions", {"file": "~nosuchuser-convsim/t.jsonl"})
    assert_refused(failed, text, "is not a usable path")


# --- targets -------------------------------------------------------------------------------------

@pytest.mark.parametrize("url, reason", [
    pytest.param("http://127.0.0.1:99999/", "port 99999 is not a TCP port", id="port"),  # was a failed run
    pytest.param("http://[::1/", "is not a valid URL", id="ipv6"),
    pytest.param("http://127.0.0.1:9/\x00", "is not a valid URL", id="nul"),  # was httpx.InvalidURL
    pytest.param("http://", "names no host", id="no-host"),
])
def test_a_url_that_httpx_cannot_send_to_is_refused_with_the_target(url, reason):
    with pytest.raises(InvalidTarget, match=reason):
        parse_target_spec(url)
    with pytest.raises(InvalidTarget, match=reason):
        parse_target_spec({"url": url, "kind": "json"})


def test_a_target_given_as_deeply_nested_json_is_refused():
    with pytest.raises(InvalidTarget, match="nested more than 32 levels"):  # was RecursionError
        parse_target_spec('{"a":' * 5000)


@pytest.mark.parametrize("headers", [{"Authorization": "Bearer café"}, {"Clé": "x"}])
def test_non_ascii_headers_are_refused_before_a_request_is_made(headers):
    with pytest.raises(InvalidTarget, match="must be ASCII") as e:  # was UnicodeEncodeError from httpx
        resolve_target({"url": "http://127.0.0.1:9/v1", "headers": headers})
    assert "café" not in str(e.value)  # a header value may be a secret: only the name is shown


async def test_generate_test_cases_with_a_malformed_agent_url_says_why(store, workspace):
    server = build_server(store, workspace=workspace)
    failed, text = await call(server, "generate_test_cases", {"target": "http://127.0.0.1:9/\x00"})
    assert_refused(failed, text, "is not a valid URL")


# --- scorers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, reason", [
    pytest.param({"name": "j", "instructions": "{{ conversation }}", "output": {"labels": ["a", "b"], "pass": None}},
                 "must be lists of labels", id="pass-null"),  # was TypeError
    pytest.param({"name": "j", "instructions": "{{ conversation }}", "output": {"labels": 3}},
                 "must be lists of labels", id="labels-number"),
    pytest.param({"name": "guidelines", "guidelines": -7}, "needs 'guidelines'", id="guidelines-number"),  # TypeError
    pytest.param({"path": None}, "'path' must be a string", id="path-null"),  # was AttributeError
    pytest.param({"path": "scorer.py:always", "name": 5.5}, "'name', if given, a string", id="name-number"),
    pytest.param({"name": ["goal_achievement"]}, "is not a built-in", id="name-list"),  # was TypeError: unhashable
    pytest.param('{"a":' * 5000, "nested too deeply", id="deep-json"),  # was RecursionError
])
def test_malformed_scorer_specs_are_refused(workspace, spec, reason):
    with pytest.raises(InvalidOption, match=reason):
        parse_scorers([spec], workspace=workspace)


async def test_a_code_scorer_with_a_numeric_name_no_longer_fails_the_run(store, workspace):
    server = build_server(store, workspace=workspace)
    failed, text = await call(server, "simulate_conversations", {
        "target": "agent.py:echo", "test_cases": [{"goal": "hi"}], "max_turns": 1,
        "scorers": [{"path": "scorer.py:always", "name": 5.5}]})
    assert_refused(failed, text, "'name', if given, a string")  # was: the run ended 'failed' (Assessment.scorer)


# --- transcripts ---------------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize("field, value", [
    ("session_id", 5), ("turns", "x"), ("repeat", "x"), ("usage", [1]), ("usage", {"judge": 3}), ("metadata", [1]),
    ("stop_detail", {"a": 1}),
])
def test_a_transcript_field_of_the_wrong_type_names_the_record(field, value):
    with pytest.raises(InvalidOption, match="^transcript 3: "):  # was ValidationError, TypeError, AttributeError
        record_to_session({"messages": MESSAGES, field: value}, 3, what="transcript")


async def test_a_jsonl_line_nested_too_deeply_to_parse_is_refused(store):
    line = "[" * 5000 + "]" * 5000
    with pytest.raises(InvalidOption, match="line 2: nested more than 32 levels deep"):  # was RecursionError
        await store.import_jsonl(io.StringIO(json.dumps(MESSAGES) + "\n" + line + "\n"))


async def test_inline_transcripts_with_a_bad_field_get_a_reason_over_mcp(store, workspace):
    server = build_server(store, workspace=workspace)
    failed, text = await call(server, "score_sessions", {"transcripts": [{"messages": MESSAGES, "metadata": 7}]})
    assert failed and re.search(r"^Error executing tool score_sessions: transcript 1: metadata must be an object",
                                text), text


@pytest.mark.parametrize("field", ["turns", "repeat"])
def test_a_transcript_count_too_large_for_sqlite_is_refused_with_a_reason(field):
    with pytest.raises(InvalidOption, match=f"^transcript 1: {field}: Input should be less than or equal to 1000000"):
        record_to_session({"messages": MESSAGES, field: 2**63}, 1, what="transcript")  # was OverflowError in SQLite
