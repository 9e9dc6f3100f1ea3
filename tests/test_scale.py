"""Big runs: thousands of conversations at once, 10,000 test cases from one file, summaries from rows."""

from __future__ import annotations

import gc
import os
import json
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import anyio
import pytest

from engine import (InvalidOption, InvalidTestCase, Session, Workspace, load_test_cases, prepare_simulation,
                    simulate)
from engine.cases import loading
from engine.limits import MAX_TEST_CASES
from engine.models import StopReason, add_usage
from engine.pipeline import run_summary, session_summaries, summarize_session
from engine.pipeline._shared import MAX_CONCURRENCY
from engine.store import new_run_id, new_session_id
from tests.conftest import ROOT, agent

pytestmark = pytest.mark.anyio

INSTANT = "tests.agents:async_echo"  # an async agent that answers at once: no thread per call


def write_jsonl(path, n: int, goal: str = "Ask about refunds. Then ask about shipping.") -> None:
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"case-{i}", "goal": goal}) + "\n")


async def test_a_jsonl_file_of_10000_cases_plays_every_case_with_few_sessions_in_memory(store, tmp_path):
    path = tmp_path / "cases.jsonl"
    write_jsonl(path, 10_000)
    live_peak = 0

    async def progress(p):
        nonlocal live_peak
        if p.done % 2500 == 0:  # sessions alive now: the job builds each one only as it starts
            live_peak = max(live_peak, sum(isinstance(o, Session) for o in gc.get_objects()))

    summary = await simulate(store, INSTANT, str(path), model="offline", max_turns=1, concurrency=50,
                             workspace=Workspace(roots=(ROOT, tmp_path)), progress=progress)
    assert summary.status == "completed"
    assert (summary.sessions_total, summary.sessions_done, summary.turns_done) == (10_000, 10_000, 10_000)
    assert summary.stop_reasons == {"max_turns": 10_000}
    assert len(await store.session_ids(summary.run_id)) == 10_000
    assert len(await store.get_test_cases(summary.run_id)) == 10_000
    assert 0 < live_peak < 500, f"{live_peak} Session objects alive at once in a run of concurrency 50"


def test_a_jsonl_file_is_read_a_line_at_a_time_up_to_max_file_cases(tmp_path, monkeypatch):
    path = tmp_path / "cases.jsonl"
    write_jsonl(path, MAX_TEST_CASES + 1)  # more than a run takes inline, or from a JSON file
    assert len(load_test_cases(str(path), workspace=tmp_path)) == MAX_TEST_CASES + 1
    monkeypatch.setattr(loading, "MAX_FILE_CASES", 5)
    with pytest.raises(InvalidTestCase, match=r"more than 5 test cases; at most 5 per run from a JSONL file "
                                              r"\(MAX_FILE_CASES\)"):
        load_test_cases(str(path), workspace=tmp_path)


def test_json_files_and_inline_cases_stay_bounded_at_max_test_cases(tmp_path):
    cases = [{"goal": f"g{i}"} for i in range(MAX_TEST_CASES + 1)]
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(cases))
    for source in (cases, str(path)):
        with pytest.raises(InvalidTestCase, match="MAX_TEST_CASES"):
            load_test_cases(source, workspace=tmp_path)


@pytest.mark.parametrize(
    "text, message",
    [
        pytest.param('{"goal": "a"}\n\n{"goal": "b", "persna": 1}\n', "line 3, test case 2: 1 unknown field",
                     id="bad-case-names-line-and-case"),
        pytest.param('{"goal": "a"}\n[[[\n', "line 2 is not valid JSON", id="bad-json"),
        pytest.param("\n\n", "no test cases given", id="only-blank-lines"),
    ],
)
def test_a_streamed_jsonl_file_names_the_line_it_refuses(tmp_path, text, message):
    path = tmp_path / "cases.jsonl"
    path.write_text(text)
    with pytest.raises(InvalidTestCase, match=message):
        load_test_cases(str(path), workspace=tmp_path)


def test_a_jsonl_file_that_is_not_utf8_names_the_byte(tmp_path):
    path = tmp_path / "cases.jsonl"
    path.write_bytes(b'{"goal": "a"}\n{"goal": "\xff"}\n')
    with pytest.raises(InvalidTestCase, match=r"is not UTF-8 text \(byte 24\)"):
        load_test_cases(str(path), workspace=tmp_path)


async def test_a_run_creates_its_session_rows_in_one_transaction(store):
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    summary = await simulate(store, agent("echo"), [{"goal": f"g{i}"} for i in range(40)], model="offline",
                             max_turns=1, repeats=3, concurrency=10, workspace=ROOT)
    store._db.set_trace_callback(None)
    assert summary.sessions_done == 120
    inserts = [i for i, s in enumerate(statements) if s.startswith("INSERT INTO sessions")]
    assert len(inserts) == 120
    first, last = inserts[0], inserts[-1]
    assert statements[first - 1] == "BEGIN" and last - first == 119  # one after the other, in one transaction
    assert "COMMIT" not in statements[first:last]


async def test_bulk_session_rows_read_back_in_run_order(store):
    run_id = new_run_id()
    await store.create_run(run_id=run_id, kind="simulate", target={}, options={}, model="offline", offline=True,
                           test_cases=[], sessions_total=6)
    planned = [(new_session_id(), i, r) for i in range(3) for r in range(2)]
    await store.create_sessions(run_id, planned)
    sessions = await store.get_sessions(run_id)
    assert [(s.id, s.case_index, s.repeat) for s in sessions] == planned
    assert all(s.stop_reason is None and s.turns == 0 and s.usage == {} for s in sessions)
    assert await store.end_open_sessions(run_id, StopReason.CANCELLED, "not run") == 6
    assert {s.stop_reason.value for s in await store.get_sessions(run_id)} == {"cancelled"}


async def test_the_summary_from_session_rows_equals_one_built_from_full_sessions(store):
    cases = [{"goal": "Ask about refunds. Then ask about shipping.", "id": f"c{i}"} for i in range(6)]
    summary = await simulate(store, agent("crashes_on_turn_2"), cases[:3], model="offline", max_turns=3,
                             concurrency=4, workspace=ROOT, scorers=["goal_achievement"])
    mixed = await simulate(store, agent("echo"), cases, model="offline", max_turns=3, repeats=2, concurrency=5,
                           workspace=ROOT, scorers=["goal_achievement"])
    for s in (summary, mixed):
        full = await store.get_sessions(s.run_id)  # the old way: every transcript in memory
        again = await run_summary(store, s.run_id)
        assert again.sessions == [summarize_session(x) for x in full][:50]
        assert again.stop_reasons == dict(Counter(x.stop_reason.value for x in full))
        assert again.turns_done == sum(x.turns for x in full)
        usage: dict = {}
        for x in full:
            for role, u in x.usage.items():
                usage = add_usage(usage, role, u)
        assert again.usage["simulated_user"] == usage["simulated_user"]
        verdicts = await store.get_assessments([x.id for x in full])
        rows, total = await store.session_rows(s.run_id, limit=1000)
        assert total == len(full)
        for row in rows:
            mine = [v for v in verdicts if v.session_id == row.session.id]
            assert (row.passed, row.failed, row.unscored) == (
                sum(v.passed is True for v in mine), sum(v.passed is False for v in mine),
                sum(v.passed is None for v in mine))


async def test_session_summaries_page_and_put_failing_sessions_first(store):
    key = new_session_id()  # the agent crashes in every other session of a case, per this key
    cases = [{"goal": "Ask about refunds. Then ask about shipping.", "id": f"c{i}",
              "context": {"flaky_key": f"{key}-{i}"}} for i in range(2)]
    run = await simulate(store, agent("every_other_session_crashes"), cases, model="offline", max_turns=2,
                         repeats=2, concurrency=2, workspace=ROOT)
    in_order, total = await session_summaries(store, run.run_id, limit=100)
    assert total == 4 and [(s.case_index, s.repeat) for s in in_order] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    first, _ = await session_summaries(store, run.run_id, limit=100, attention_first=True)
    failed = [s.stop_reason.value == "agent_error" for s in first]
    assert failed == [True, True, False, False]  # the crashed sessions first, each group in run order
    page, _ = await session_summaries(store, run.run_id, offset=1, limit=2)
    assert [s.session_id for s in page] == [s.session_id for s in in_order[1:3]]


async def test_concurrency_up_to_2000_is_accepted(store):
    assert MAX_CONCURRENCY >= 2000
    job = await prepare_simulation(store, agent("echo"), [{"goal": "g"}], model="offline", concurrency=2000,
                                   workspace=ROOT)
    assert job.concurrency == 2000


@pytest.mark.parametrize("concurrency", [0, 2001])
async def test_concurrency_beyond_the_bound_is_refused_naming_the_field(store, concurrency):
    with pytest.raises(InvalidOption, match=rf"concurrency must be an integer from 1 to 2000, got {concurrency}"):
        await prepare_simulation(store, agent("echo"), [{"goal": "g"}], model="offline", concurrency=concurrency,
                                 workspace=ROOT)


async def test_a_run_of_more_sessions_than_max_run_sessions_is_refused(store, tmp_path, monkeypatch):
    from engine.pipeline import simulation

    monkeypatch.setattr(simulation, "MAX_RUN_SESSIONS", 10)
    with pytest.raises(InvalidOption, match=r"4 test cases x 3 repeats is 12 sessions; .*MAX_RUN_SESSIONS"):
        await prepare_simulation(store, agent("echo"), [{"goal": f"g{i}"} for i in range(4)], model="offline",
                                 repeats=3, workspace=ROOT)


def test_a_big_run_raises_the_open_file_limit_it_needs():
    probe = ("import resource\n"
             "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
             "resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))\n"
             "from engine.pipeline._shared import ensure_open_files\n"
             "ensure_open_files(2000)\n"
             "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True,
                         timeout=60)
    soft, hard = (int(x) for x in out.stdout.split())
    need = 2000 * 3 + 256  # three sockets per conversation, and spare
    assert soft >= (need if hard == -1 else min(need, hard))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # hundreds of conversations connect at once


def test_an_http_agent_gets_as_many_requests_at_once_as_the_run_has_conversations(store, tmp_path):
    """No request is answered until 300 are in flight: a connection pool smaller than the run (httpx's
    default is 100) would leave the rest queued until the barrier broke and every session failed."""
    barrier = threading.Barrier(300, timeout=60)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            barrier.wait()
            data = json.dumps({"choices": [{"message": {"role": "assistant", "content": "Noted."}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = _Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        target = {"url": f"http://127.0.0.1:{httpd.server_address[1]}/v1/chat/completions", "timeout_s": 90}
        cases = [{"goal": "Ask about refunds. Then ask about shipping.", "id": f"c{i}"} for i in range(150)]
        summary = anyio.run(lambda: simulate(store, target, cases, model="offline", max_turns=1, repeats=2,
                                             concurrency=300, workspace=ROOT))
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert summary.stop_reasons == {"max_turns": 300}


async def test_the_simulate_tool_refuses_concurrency_2001_naming_the_field(store):
    from mcp import Client

    from convsim_mcp.server import build_server

    async with Client(build_server(store)) as client:
        result = await client.call_tool("simulate_conversations", {
            "target": agent("echo"), "test_cases": [{"goal": "g"}], "model": "offline", "concurrency": 2001})
    assert result.is_error
    assert "concurrency must be an integer from 1 to 2000, got 2001" in result.content[0].text


@pytest.mark.slow
def test_the_cli_refuses_concurrency_2001_with_exit_2(tmp_path):
    cases = tmp_path / "cases.jsonl"
    write_jsonl(cases, 2)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONVSIM_") and k != "PYTHONPATH"}
    env.update(CONVSIM_HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "convsim_mcp", "simulate", agent("echo"), str(cases), "--model",
                           "offline", "--concurrency", "2001", "--root", str(tmp_path), "--db",
                           str(tmp_path / "x.sqlite")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "concurrency must be an integer from 1 to 2000, got 2001" in proc.stderr
