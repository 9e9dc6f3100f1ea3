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
