"""Storage: turns written as they happen, JSONL round trip, interrupted runs."""

from __future__ import annotations

import json
import sqlite3

import pytest

from engine import InvalidOption, NotFound, StopReason, Store, simulate
from tests.conftest import ROOT, agent

pytestmark = pytest.mark.anyio


async def test_jsonl_export_import_round_trip(store, tmp_path):
    cases = [{"goal": "Check order A1. Ask about returns.", "id": "c1", "context": {"tier": "gold"}},
             {"goal": "g2", "scripted_turns": ["hello"]}]
    summary = await simulate(store, agent("messages_list"), cases, model="offline", workspace=ROOT, max_turns=3)
    lines = await store.export_jsonl(summary.run_id)
    assert len(lines) == 2
    record = json.loads(lines[0])
    assert record["session_id"].startswith("sim-") and record["test_case"]["id"] == "c1"
    assert record["stop_reason"] and record["messages"][0]["role"] == "user"
    tool_msgs = [m for m in record["messages"] if m["role"] == "tool"]
    assert tool_msgs and record["messages"][1]["tool_calls"][0]["function"]["name"] == "lookup_order"

    other = Store(tmp_path / "other.sqlite")
    new_run = await other.import_jsonl(lines)
    original = await store.get_sessions(summary.run_id)
    imported = await other.get_sessions(new_run)
    assert [s.id for s in imported] == [s.id for s in original]
    for a, b in zip(original, imported):
        assert [m.model_dump() for m in a.messages] == [m.model_dump() for m in b.messages]
        assert (a.test_case, a.stop_reason, a.turns) == (b.test_case, b.stop_reason, b.turns)


async def test_reimport_into_the_same_database_keeps_both_copies(store):
    summary = await simulate(store, agent("echo"), [{"goal": "g"}], model="offline", workspace=ROOT)
    lines = await store.export_jsonl(summary.run_id)
    (copy,) = await store.get_sessions(await store.import_jsonl(lines))
    assert copy.id != summary.sessions[0].session_id
    assert copy.metadata["original_session_id"] == summary.sessions[0].session_id


async def test_import_accepts_bare_message_lists(store):
    line = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    run_id = await store.import_jsonl([line, ""])
    (session,) = await store.get_sessions(run_id)
    assert session.id.startswith("sim-") and session.turns == 1
    assert [m.content for m in session.messages] == ["hi", "hello"]


async def test_import_rejects_bad_lines_with_line_numbers(store):
    with pytest.raises(InvalidOption, match="line 2"):
        await store.import_jsonl([json.dumps([{"role": "user", "content": "x"}]), json.dumps({"nope": 1})])


async def test_unknown_ids_are_not_found(store):
    with pytest.raises(NotFound, match="list_runs"):
        await store.get_run("run-missing")
    with pytest.raises(NotFound, match="sim-missing"):
        await store.get_session("sim-missing")


async def test_turns_are_on_disk_while_the_run_is_in_progress(store, tmp_path):
    """Another connection sees each turn as it completes (what a crash would leave behind)."""
    seen: list[int] = []

    async def progress(p):
        with sqlite3.connect(store.path) as db:
            seen.append(db.execute("SELECT COUNT(*) FROM messages").fetchone()[0])

    await simulate(store, agent("echo"), [{"goal": "A. B. C."}], model="offline", workspace=ROOT, progress=progress)
    assert seen[:3] == [2, 4, 6]


async def test_runs_left_running_by_a_dead_process_become_interrupted(store):
    summary = await simulate(store, agent("echo"), [{"goal": "g"}], model="offline", workspace=ROOT)
    store._db.execute("UPDATE runs SET status = 'running', pid = 999999999 WHERE id = ?", (summary.run_id,))
    store._db.execute("UPDATE sessions SET stop_reason = NULL WHERE run_id = ?", (summary.run_id,))
    assert await store.mark_interrupted() == 1
    assert (await store.get_run(summary.run_id))["status"] == "interrupted"
    (session,) = await store.get_sessions(summary.run_id)
    assert session.stop_reason == StopReason.CANCELLED and session.messages


# --- big and hostile transcript files: streamed, bounded, all or nothing ------------------------

from engine.limits import MAX_JSON_DEPTH, MAX_LINE_BYTES, MAX_MESSAGE_CHARS, MAX_MESSAGES, MAX_TRANSCRIPTS  # noqa: E402
from engine.pipeline import run_summary, score_sessions  # noqa: E402
from engine.store.sqlite import MAX_SQL_PARAMS  # noqa: E402

SECRET = "SECRET-VALUE-do-not-echo-4711"


def _chat(i: int) -> str:
    return json.dumps([{"role": "user", "content": f"where is order {i}?"},
                       {"role": "assistant", "content": f"order {i} ships today"}])


def _write(path, lines: list[str]):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


async def _nothing_stored(store: Store) -> None:
    assert await store.list_runs() == []
    for table in ("runs", "sessions", "messages", "test_cases"):
        assert store._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] == 0, table


async def test_a_file_over_max_transcripts_is_refused_before_anything_is_stored(store, tmp_path):
    # Line 3 is not JSON: the count is checked first, by streaming, before any line is parsed.
    lines = [_chat(i) for i in range(MAX_TRANSCRIPTS + 1)]
    lines[2] = "{not json"
    path = _write(tmp_path / "big.jsonl", lines)
    with pytest.raises(InvalidOption, match=f"more than {MAX_TRANSCRIPTS} transcripts.*MAX_TRANSCRIPTS"):
        await store.import_file(path)
    await _nothing_stored(store)


async def test_inline_transcripts_over_max_transcripts_are_refused_before_anything_is_stored(store):
    transcripts = [{"messages": [{"role": "user", "content": "hi"}]}] * (MAX_TRANSCRIPTS + 1)
    with pytest.raises(InvalidOption, match=f"{MAX_TRANSCRIPTS + 1} transcripts.*MAX_TRANSCRIPTS"):
        await score_sessions(store, transcripts=transcripts, scorers=["goal_achievement"], model="offline")
    await _nothing_stored(store)


def _nested(depth: int) -> object:
    value: object = "leaf"
    for _ in range(depth):
        value = {"k": value}
    return value


@pytest.mark.parametrize("line, expected", [
    pytest.param('["' + "x" * MAX_LINE_BYTES + '"]', "line 2 is longer than .*MAX_LINE_BYTES", id="line-bytes"),
    pytest.param(json.dumps([{"role": "user", "content": SECRET}] * (MAX_MESSAGES + 1)),
                 f"line 2: 'messages' has {MAX_MESSAGES + 1} entries.*MAX_MESSAGES", id="messages"),
    pytest.param(json.dumps([{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": SECRET * (MAX_MESSAGE_CHARS // len(SECRET) + 1)}]),
                 r"line 2: messages\[1\]\.content is .*MAX_MESSAGE_CHARS", id="message-chars"),
    pytest.param(json.dumps({"messages": [{"role": "user", "content": "hi"}], "metadata": _nested(MAX_JSON_DEPTH)}),
                 "line 2: nested more than .*MAX_JSON_DEPTH", id="depth"),
    pytest.param("[" * 200_000, "line 2: nested more than .*MAX_JSON_DEPTH", id="depth-beyond-the-parser"),
    pytest.param(json.dumps([{"role": SECRET, "content": "hi"}]), r"line 2: messages\[0\]\.role: Input should be",
                 id="pydantic-field"),
    pytest.param(json.dumps({"messages": [{"role": "user", "content": "hi"}], "stop_reason": SECRET}),
                 "line 2: stop_reason: Input should be", id="stop-reason"),
    pytest.param(json.dumps({"messages": [{"role": "user", "content": "hi"}], "test_case": {"goal": SECRET,
                                                                                           "persona": 7}}),
                 "line 2: test_case.persona: Input should be a valid string", id="test-case"),
    pytest.param(json.dumps({"messages": [{"role": "user", "content": "hi"}], "session_id": {"x": SECRET}}),
                 "line 2: session_id must be a string", id="session-id"),
    pytest.param(b'["\xff"]', "line 2 is not valid UTF-8", id="utf-8"),
])
async def test_a_bad_record_is_refused_naming_line_and_field_but_never_its_content(store, tmp_path, line, expected):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(_chat(0).encode() + b"\n" + (line if isinstance(line, bytes) else line.encode()) + b"\n")
    with pytest.raises(InvalidOption, match=expected) as e:
        await store.import_file(path)
    assert SECRET not in str(e.value) and "xxxxxxxx" not in str(e.value)
    assert len(str(e.value)) < 300
    await _nothing_stored(store)


async def test_a_secret_anywhere_in_an_imported_file_is_masked_in_the_database(store, tmp_path):
    from engine.secrets import register

    key = "sk-imported-0a1b2c3d4e5f"
    register(key)
    record = {"session_id": f"s-{key}", "run_id": key, "stop_reason": "agent_error", "stop_detail": f"401 {key}",
              "test_case": {"goal": f"use {key}"}, "metadata": {key: key}, "usage": {key: {"calls": 1}},
              "messages": [{"role": "user", "content": f"my key is {key}"},
                           {"role": "assistant", "content": None, "error": f"echoed {key}",
                            "tool_calls": [{"id": key, "function": {"name": "f", "arguments": key}}]}]}
    run_id = await store.import_file(_write(tmp_path / "secret.jsonl", [json.dumps(record)] * 2))
    assert len(await store.export_jsonl(run_id)) == 2
    for path in tmp_path.glob("test.sqlite*"):
        assert key.encode() not in path.read_bytes(), path.name


async def test_a_bad_line_after_committed_batches_leaves_nothing_stored(store, tmp_path):
    path = _write(tmp_path / "late.jsonl", [_chat(i) for i in range(1200)] + ['{"nope": 1}'])
    with pytest.raises(InvalidOption, match="line 1201"):
        await store.import_file(path)
    await _nothing_stored(store)


async def test_an_import_inserts_in_a_few_transactions_not_one_per_message(store, tmp_path):
    path = _write(tmp_path / "t.jsonl", [_chat(i) for i in range(1200)])
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)
    run_id = await store.import_file(path)
    store._db.set_trace_callback(None)
    assert sum(s.strip().upper().startswith("BEGIN") for s in statements) <= 5  # create run + 3 batches
    assert (await store.get_run(run_id))["sessions_total"] == 1200
    assert store._db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 2400


async def test_no_statement_binds_more_than_max_sql_params(store, tmp_path):
    """SQLite refuses statements past its variable limit: set it to MAX_SQL_PARAMS and use every reader."""
    store._db.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, MAX_SQL_PARAMS)
    n = 3 * MAX_SQL_PARAMS + 7
    records = [json.dumps({"session_id": f"s-{i}", "messages": json.loads(_chat(i))}) for i in range(n)]
    first = await store.import_file(_write(tmp_path / "t.jsonl", records))
    again = await store.import_jsonl(records)  # every id taken: each is renamed, in chunks
    ids = await store.session_ids(again)
    assert len(ids) == n and not set(ids) & set(await store.session_ids(first))
    by_run = await score_sessions(store, run_id=again, scorers=["goal_achievement"], model="offline")
    by_ids = await score_sessions(store, session_ids=ids, scorers=["goal_achievement"], model="offline")
    assert by_run.scorers[0].passed == by_ids.scorers[0].passed == n and by_ids.run_ids == [again]
    assert len(await store.get_assessments(ids)) == n
    assert len(await store.get_sessions(again)) == n
    assert len(await store.export_jsonl(again)) == n
    summary = await run_summary(store, again)
    assert summary.turns_done == n and summary.scores[0].passed == n and len(summary.sessions) == 50
    assert len((await run_summary(store, again, max_sessions=n)).sessions) == n
    assert [s.turns for s in await store.get_sessions_by_ids(ids)] == [1] * n
    assert await store.mark_interrupted() == 0


async def test_pages_of_sessions_stop_at_page_bytes_as_well_as_at_page_sessions(store, monkeypatch):
    run_id = await store.import_jsonl([json.dumps([{"role": "user", "content": f"{i} " + "x" * 1000}])
                                       for i in range(10)])
    monkeypatch.setattr("engine.store.sqlite.PAGE_BYTES", 2500)  # each session's message is ~1 KB of JSON
    pages = [page async for page in store.iter_sessions(run_id, page=4)]
    assert [len(p) for p in pages] == [3, 3, 3, 1]
    assert [s.id for p in pages for s in p] == await store.session_ids(run_id)
    assert all(s.messages[0].content.startswith(f"{i} ") for i, s in enumerate(x for p in pages for x in p))
    monkeypatch.setattr("engine.store.sqlite.PAGE_BYTES", 10**9)
    assert [len(p) async for p in store.iter_sessions(run_id, page=4)] == [4, 4, 2]


async def test_run_summary_lists_the_last_messages_without_reading_transcripts(store):
    summary = await simulate(store, agent("echo"), [{"goal": "A. B. C."}], model="offline", workspace=ROOT,
                             max_turns=3)
    (s,) = summary.sessions
    (full,) = await store.get_sessions(summary.run_id)
    assert s.last_agent_reply == next(m.content for m in reversed(full.messages) if m.role == "assistant")
    assert s.last_user_message == next(m.content for m in reversed(full.messages) if m.role == "user")
    (preview,) = await store.get_session_previews(summary.run_id, 50)
    assert [m.role for m in preview.messages] == ["user", "assistant"] and len(full.messages) == 6


# --- runs whose process died read 'interrupted' from every reader --------------------------------

import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from engine.store.sqlite import _proc_stat  # noqa: E402

linux_only = pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="process start times come from /proc")


async def _left_running(store: Store, pid: int, stamp: str | None) -> str:
    """A finished run rewritten as if its process were still running it (or had died running it)."""
    summary = await simulate(store, agent("echo"), [{"goal": "g"}], model="offline", workspace=ROOT)
    store._db.execute("UPDATE runs SET status = 'running', pid = ?, pid_start = ? WHERE id = ?",
                      (pid, stamp, summary.run_id))
    store._db.execute("UPDATE sessions SET stop_reason = NULL WHERE run_id = ?", (summary.run_id,))
    return summary.run_id


@pytest.mark.parametrize("read", ["get_run", "list_runs", "run_summary"])
async def test_every_read_marks_a_dead_process_run_interrupted(store, read):
    run_id = await _left_running(store, 999_999_999, None)
    if read == "get_run":
        status = (await store.get_run(run_id))["status"]
    elif read == "list_runs":
        (run,) = await store.list_runs()
        status = run["status"]
    else:
        status = (await run_summary(store, run_id)).status.value
    assert status == "interrupted"
    (session,) = await store.get_sessions(run_id)
    assert session.stop_reason == StopReason.CANCELLED and session.messages  # the turns are kept
    assert await store.mark_interrupted() == 0  # recorded once, by the read


@linux_only
async def test_a_live_process_keeps_its_run_running_until_it_is_killed(store):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run_id = await _left_running(store, proc.pid, _proc_stat(proc.pid)[1])
        assert (await store.get_run(run_id))["status"] == "running"
        assert [r["status"] for r in await store.list_runs()] == ["running"]
        proc.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 5
        # Not reaped yet (a zombie: its pid still answers signal 0), and already dead to the store.
        while (await store.get_run(run_id))["status"] == "running" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (await store.get_run(run_id))["status"] == "interrupted"
    finally:
        proc.kill()
        proc.wait()


@linux_only
async def test_a_recycled_pid_does_not_keep_a_dead_run_running(store):
    # The pid is alive (it is this very process) but the process that created the run started at another time.
    run_id = await _left_running(store, os.getpid(), "another-boot:12345")
    assert (await store.get_run(run_id))["status"] == "interrupted"


async def test_this_process_keeps_its_own_running_runs_running(store):
    run_id = await _left_running(store, os.getpid(), _proc_stat(os.getpid())[1] if _proc_stat(os.getpid()) else None)
    assert (await store.get_run(run_id))["status"] == "running"
    assert await store.mark_interrupted() == 0


async def test_a_database_from_before_pid_start_times_gains_the_column(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE runs (id TEXT PRIMARY KEY, kind TEXT NOT NULL, status TEXT NOT NULL, "
                   "created_at REAL NOT NULL, finished_at REAL, target TEXT NOT NULL, options TEXT NOT NULL, "
                   "model TEXT NOT NULL, offline INTEGER NOT NULL, sessions_total INTEGER NOT NULL, error TEXT, "
                   "pid INTEGER)")
        db.execute("INSERT INTO runs VALUES ('run-old', 'simulate', 'running', 1, NULL, '{}', '{}', 'offline', 1, "
                   "0, NULL, 999999999)")
    old = Store(path)
    try:
        assert (await old.get_run("run-old"))["status"] == "interrupted"
        assert "pid_start" in {r["name"] for r in old._db.execute("PRAGMA table_info(runs)")}
    finally:
        old.close()
