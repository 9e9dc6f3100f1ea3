"""Resume: a run killed (SIGKILL, for real) or cancelled goes on from its last stored turns and finishes as its job.

The CLI tests kill a real `convsim-mcp` subprocess once turns are stored (polling its SQLite file), then
resume it with `runs resume` and read the database back: every session finished, every turn once, the
turns stored before the kill untouched. The MCP test cancels a background run through a real client
and resumes it with the resume_run tool.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest
from mcp import Client

from convsim_mcp.server import build_server
from engine import InvalidOption, InvalidTarget, Message, RunStatus, StopReason
from engine.pipeline.resume import prepare_resume
from engine.pipeline.simulation import prepare_simulation
from engine.simulation.resume import resume_point
from tests.test_cli_faults import _env, convsim
from tests.test_junit import read_junit

ROOT = Path(__file__).resolve().parent.parent
AGENT = "tests.resume_agents:counting"
CASES = [{"goal": "Ask about A. Ask about B. Ask about C. Ask about D.", "id": "a"},
         {"goal": "Ask about E. Ask about F. Ask about G. Ask about H.", "id": "b"},
         {"goal": "Ask about I. Ask about J. Ask about K. Ask about L.", "id": "c"}]


def _rows(db: str, sql: str, *params) -> list[tuple]:
    if not Path(db).exists():
        return []
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError:  # the schema is not there yet
        return []


def _kill_once_stored(cmd: list[str], db: str, home: Path, replies: int) -> str:
    """Start the CLI, SIGKILL it once `replies` agent replies are stored; return the run id."""
    env = {**_env(home), "RESUME_AGENT_DELAY_S": "0.25"}
    proc = subprocess.Popen([sys.executable, "-m", "convsim_mcp", *cmd, "--db", db], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(_rows(db, "SELECT 1 FROM messages WHERE data LIKE '%\"assistant\"%'")) < replies:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        proc.kill()
    ((run_id,),) = _rows(db, "SELECT id FROM runs")
    return run_id


def _messages(db: str, run_id: str) -> dict[tuple[str, int], str]:
    return {(sid, seq): data for sid, seq, data in _rows(
        db, "SELECT m.session_id, m.seq, m.data FROM messages m JOIN sessions s ON s.id = m.session_id "
            "WHERE s.run_id = ?", run_id)}


def _check_transcripts(db: str, run_id: str, before: dict[tuple[str, int], str]) -> None:
    """Every session finished; seqs 0..n-1; each turn one user message answered once, with the whole history."""
    sessions = _rows(db, "SELECT id, stop_reason FROM sessions WHERE run_id = ?", run_id)
    assert sessions and all(reason not in (None, "cancelled") for _, reason in sessions), sessions
    after = _messages(db, run_id)
    for (sid, seq), data in before.items():
        if json.loads(data)["role"] == "user" or (sid, seq + 1) in before:  # a reply cut off mid-way may be redone
            assert after[(sid, seq)] == data, "a turn stored before the kill changed"
    for sid, _ in sessions:
        seqs = sorted(seq for s, seq in after if s == sid)
        assert seqs == list(range(len(seqs))), f"{sid}: seqs {seqs} are not contiguous"
        msgs = [json.loads(after[(sid, seq)]) for seq in seqs]
        users = [m["turn"] for m in msgs if m["role"] == "user"]
        assert users == list(range(1, len(users) + 1)), f"{sid}: user turns {users}"
        for m in msgs:
            if m["role"] == "assistant":  # the agent was sent every user message of the history, once
                assert m["content"].startswith(f"reply {m['turn']}:"), m
    grown = {sid for sid, seq in before if (sid, seq + 1) not in before and (sid, seq + 1) in after}
    assert grown, "no session was played on from its stored turns"


@pytest.mark.slow
def test_a_killed_simulation_resumes_from_its_last_stored_turn_and_completes(convsim_home, tmp_path):
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps(CASES))
    db = str(tmp_path / "sim.sqlite")
    run_id = _kill_once_stored(["simulate", AGENT, str(cases), "--max-turns", "5", "--model", "offline",
                                "--concurrency", "2", "--scorer", "goal_achievement"], db, convsim_home, replies=3)
    before = _messages(db, run_id)
    assert _rows(db, "SELECT status FROM runs") == [("running",)]  # the dead process could not say otherwise

    resumed = convsim("runs", "resume", run_id, "--db", db, "--json", str(tmp_path / "out.json"),
                      "--junit", str(tmp_path / "resumed.xml"), home=convsim_home)
    assert resumed.returncode == 0, resumed.stderr
    cases = read_junit(tmp_path / "resumed.xml").findall(".//testcase")  # valid JUnit: a case per session x scorer
    assert len(cases) == 3, [c.get("name") for c in cases]  # 3 sessions x goal_achievement
    assert "Traceback" not in resumed.stderr and resumed.stdout.startswith(f"run {run_id}  completed")
    _check_transcripts(db, run_id, before)
    summary = json.loads((tmp_path / "out.json").read_text())
    assert summary["status"] == "completed" and summary["resumed"] == 1 and summary["resumed_at"]
    assert summary["sessions_done"] == 3 and summary["scores"][0]["scorer"] == "goal_achievement"
    assert summary["scores"][0]["sessions"] == 3  # every session scored once, the ones kept and the ones resumed
    shown = json.loads(convsim("runs", "show", run_id, "--json", "--db", db, home=convsim_home).stdout)
    assert shown["resumed"] == 1 and shown["status"] == "completed"

    again = convsim("runs", "resume", run_id, "--db", db, home=convsim_home)
    assert again.returncode == 2 and "is complete: nothing to resume" in again.stderr


@pytest.mark.slow
def test_a_killed_test_agent_run_resumes_and_writes_its_report(convsim_home, tmp_path):
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps(CASES[:2]))
    db = str(tmp_path / "ta.sqlite")
    run_id = _kill_once_stored(["test-agent", AGENT, "--cases", str(cases), "--num-test-cases", "1",
                                "--max-turns", "4", "--model", "offline", "--concurrency", "2",
                                "--scorer", "goal_achievement", "--scorer", "dialogue_coherence"],
                               db, convsim_home, replies=2)
    before = _messages(db, run_id)

    resumed = convsim("runs", "resume", run_id, "--db", db, "--json", str(tmp_path / "report.json"),
                      "--report", str(tmp_path / "report.md"), "--junit", str(tmp_path / "report.xml"),
                      home=convsim_home)
    assert resumed.returncode == 0, resumed.stderr
    assert read_junit(tmp_path / "report.xml").findall(".//testcase")
    _check_transcripts(db, run_id, before)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["run_id"] == run_id and len(report["sessions"]) == 3 == len(report["test_cases"])
    assert {s["scorer"] for s in report["scores"]} == {"goal_achievement", "dialogue_coherence"}
    assert all(s["stop_reason"] not in (None, "cancelled") for s in report["sessions"])
    assert (tmp_path / "report.md").read_text().startswith("#")
    assert _rows(db, "SELECT status, resumed FROM runs") == [("completed", 1)]
    assert len(_rows(db, "SELECT 1 FROM test_sets")) == 1  # the cases made before the kill, not new ones
    assert _rows(db, "SELECT 1 FROM reports WHERE run_id = ?", run_id)


@pytest.mark.parametrize("messages, expected", [
    pytest.param([], (1, False, None, None), id="never-started"),
    pytest.param([Message(role="user", content="hi", turn=1), Message(role="assistant", content="yo", turn=1,
                                                                      latency_ms=3.0)],
                 (2, False, None, None), id="complete-turn"),
    pytest.param([Message(role="user", content="hi", turn=1)], (1, True, None, None), id="user-message-without-reply"),
    pytest.param([Message(role="user", content="hi", turn=1),
                  Message(role="assistant", tool_calls=[{"function": {"name": "f", "arguments": "{}"}}], turn=1)],
                 (1, True, 1, None), id="reply-cut-off-after-a-tool-call"),
    pytest.param([Message(role="user", content="hi", turn=1), Message(role="assistant", turn=1, error="boom")],
                 (2, False, None, StopReason.AGENT_ERROR), id="agent-error-not-recorded-as-stop"),
    pytest.param([Message(role="user", content="hi", turn=1), Message(role="assistant", content="", turn=1,
                                                                      latency_ms=1.0)],
                 (2, False, None, StopReason.AGENT_EMPTY), id="empty-reply-not-recorded-as-stop"),
])
def test_resume_point_reads_where_a_stored_transcript_stands(messages, expected):
    point = resume_point(messages)
    assert (point.turn, point.pending, point.drop_from, point.stop) == expected


@pytest.mark.anyio
async def test_a_cancelled_run_resumes_through_the_mcp_tool(store, monkeypatch):
    monkeypatch.setenv("RESUME_AGENT_DELAY_S", "0.3")
    server = build_server(store)
    async with Client(server) as client:
        started = await client.call_tool("simulate_conversations", {
            "target": AGENT, "test_cases": CASES[:2], "max_turns": 4, "concurrency": 1, "wait": False,
            "scorers": ["goal_achievement"]})
        run_id = started.structured_content["run_id"]
        busy = await client.call_tool("resume_run", {"run_id": run_id})
        with anyio.fail_after(20):
            while (await client.call_tool("get_run", {"run_id": run_id})).structured_content["turns_done"] < 2:
                await anyio.sleep(0.05)
        cancelled = (await client.call_tool("cancel_run", {"run_id": run_id})).structured_content
        before = {s.id: [m.model_dump() for m in s.messages] for s in await store.get_sessions(run_id)}
        resumed = await client.call_tool("resume_run", {"run_id": run_id})
        done = (await client.call_tool("get_run", {"run_id": run_id})).structured_content
        bad = await client.call_tool("resume_run", {"run_id": "run-; DROP TABLE runs"})
        unknown = await client.call_tool("resume_run", {"run_id": "run-0123456789ab"})
        complete = await client.call_tool("resume_run", {"run_id": run_id})
    assert busy.is_error and "running in this server" in busy.content[0].text
    assert cancelled["status"] == "cancelled"
    assert not resumed.is_error, resumed.content
    result = resumed.structured_content
    assert result["run"]["status"] == "completed" and result["run"]["resumed"] == 1
    assert result["continued"] + result["restarted"] + result["kept"] == 2 and result["continued"] >= 1
    assert done["stop_reasons"].get("cancelled") is None and done["sessions_done"] == 2
    assert done["scores"][0]["sessions"] == 2
    after = {s.id: [m.model_dump() for m in s.messages] for s in await store.get_sessions(run_id)}
    for sid, msgs in before.items():
        complete_turns = [m for m in msgs if m["role"] == "assistant" or any(
            n["role"] == "assistant" and n["turn"] == m["turn"] for n in msgs)]
        assert after[sid][:len(complete_turns)] == complete_turns  # completed turns untouched
        users = [m["turn"] for m in after[sid] if m["role"] == "user"]
        assert users == list(range(1, len(users) + 1))
        assert all(m["content"].startswith(f"reply {m['turn']}:") for m in after[sid] if m["role"] == "assistant")
    assert bad.is_error and "run_id must be a run id" in bad.content[0].text
    assert unknown.is_error and "no run with id" in unknown.content[0].text
    assert complete.is_error and "is complete" in complete.content[0].text


@pytest.mark.anyio
async def test_a_literal_header_secret_is_never_stored_and_must_be_passed_again(store, monkeypatch):
    monkeypatch.setenv("AGENT_TOKEN", "tok-value-never-stored-1234")
    monkeypatch.setenv("CONVSIM_AGENT_ENV", "AGENT_TOKEN")
    url = "http://127.0.0.1:9/v1/chat/completions"
    literal = await prepare_simulation(store, {"url": url, "headers": {"Authorization": "Bearer sk-literal-secret-999"}},
                                       CASES[:1], model="offline")
    ref = await prepare_simulation(store, {"url": url, "headers": {"Authorization": "Bearer ${AGENT_TOKEN}"}},
                                   CASES[:1], model="offline")
    for job in (literal, ref):
        await store.finish_run(job.run_id, RunStatus.CANCELLED, "cancelled")
    dump = "\n".join(store._db.iterdump())
    assert "sk-literal-secret-999" not in dump and "tok-value-never-stored" not in dump
    assert "${AGENT_TOKEN}" in dump  # the reference is stored, so a resume reads the variable again
    with pytest.raises(InvalidTarget, match="pass the target again"):
        await prepare_resume(store, literal.run_id)
    job = await prepare_resume(store, ref.run_id)
    assert job.inner.target.spec.headers == {"Authorization": "Bearer ${AGENT_TOKEN}"}
    with pytest.raises(InvalidOption, match="still running"):  # taken back by this process now
        await prepare_resume(store, ref.run_id)


@pytest.mark.anyio
async def test_a_test_agent_run_stopped_before_its_cases_existed_resumes_from_generation(store):
    from engine.pipeline.agent_test import prepare_agent_test

    job = await prepare_agent_test(store, AGENT, test_cases=CASES[:1], num_test_cases=1, max_turns=2, model="offline",
                                   scorers=["goal_achievement"])
    await store.finish_run(job.run_id, RunStatus.CANCELLED, "cancelled")  # before describe/generate ran
    resumed = await prepare_resume(store, job.run_id)
    assert (resumed.continued, resumed.restarted, resumed.kept) == (0, 0, 0)
    report = await resumed.run()
    assert report.run_id == job.run_id and len(report.sessions) == 2 and report.test_set_id
    run = await store.get_run(job.run_id)
    assert run["status"] == "completed" and run["resumed"] == 1
    assert run["options"]["test_set_id"] == report.test_set_id


@pytest.mark.anyio
async def test_a_failed_run_is_not_resumed(store):
    job = await prepare_simulation(store, AGENT, CASES[:1], model="offline")
    await store.finish_run(job.run_id, RunStatus.FAILED, "boom")
    with pytest.raises(InvalidOption, match="only an interrupted or cancelled run can be resumed"):
        await prepare_resume(store, job.run_id)
    assert (await store.get_run(job.run_id))["resumed"] == 0


@pytest.mark.anyio
async def test_a_resumed_replay_sends_the_recorded_turns_the_stop_cut_off(store, monkeypatch):
    """A replay cut mid-session goes on sending its recorded user turns, each turn noted once."""
    monkeypatch.setenv("RESUME_AGENT_DELAY_S", "0")
    script = {"id": "four", "goal": "Ask four things.", "scripted_turns": ["one", "two", "three", "four"]}
    first = await (await prepare_simulation(store, AGENT, [script], model="offline", workspace=ROOT,
                                            max_turns=4)).run()
    replay = await prepare_simulation(store, AGENT, None, from_run=first.run_id, mode="replay", model="offline",
                                      workspace=ROOT, max_turns=4)
    async with anyio.create_task_group() as tg:
        async def cut_after_turn_2(p) -> None:
            if p.done >= 2:
                tg.cancel_scope.cancel()
        tg.start_soon(replay.run, cut_after_turn_2)
    [cut] = await store.get_sessions(replay.run_id)
    assert [m.content for m in cut.messages if m.role == "user"] == ["one", "two"]
    await (await prepare_resume(store, replay.run_id, workspace=ROOT)).run()
    [done] = await store.get_sessions(replay.run_id)
    assert [m.content for m in done.messages if m.role == "user"] == ["one", "two", "three", "four"]
    assert done.replayed_turns == [1, 2, 3, 4] and done.stop_reason != StopReason.REPLAY_END


def _watch_close(job, monkeypatch) -> list[bool]:
    closed: list[bool] = []
    real_aclose = job.target.aclose

    async def aclose() -> None:
        closed.append(True)
        await real_aclose()
    monkeypatch.setattr(job.target, "aclose", aclose)
    return closed


@pytest.mark.anyio
async def test_a_run_cancelled_while_warming_up_ends_cancelled_and_resumes(store, monkeypatch):
    """A cancel before the first turn (the model's import, the pools) still ends the run and closes the agent."""
    monkeypatch.setenv("RESUME_AGENT_DELAY_S", "0")
    job = await prepare_simulation(store, AGENT, CASES[:2], model="offline", max_turns=2)
    warming = anyio.Event()

    async def slow_prepare() -> None:
        warming.set()
        await anyio.sleep_forever()
    monkeypatch.setattr(job.llm, "prepare", slow_prepare)
    closed = _watch_close(job, monkeypatch)
    async with anyio.create_task_group() as tg:
        tg.start_soon(job.run)
        await warming.wait()
        tg.cancel_scope.cancel()
    run = await store.get_run(job.run_id)
    assert run["status"] == "cancelled" and closed == [True]
    done = await (await prepare_resume(store, job.run_id)).run()
    assert done.status == RunStatus.COMPLETED and done.sessions_done == 2


@pytest.mark.anyio
async def test_a_run_whose_warm_up_fails_ends_failed_with_the_reason(store, monkeypatch):
    job = await prepare_simulation(store, AGENT, CASES[:2], model="offline", max_turns=2)

    async def broken_prepare() -> None:
        raise ImportError("no module named 'litellm'")
    monkeypatch.setattr(job.llm, "prepare", broken_prepare)
    closed = _watch_close(job, monkeypatch)
    summary = await job.run()
    assert summary.status == RunStatus.FAILED and "no module named 'litellm'" in summary.error
    assert closed == [True] and (await store.get_run(job.run_id))["status"] == "failed"
