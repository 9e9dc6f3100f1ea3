"""Faults injected for real against the `convsim-mcp` command line: big files, killed runs, stuck agents.

Each test runs the CLI as a subprocess (real files, real SQLite), injects the fault, then reads the
run back with `runs show` and `runs export`: whatever happened, the run stays readable.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.limits import MAX_TRANSCRIPTS

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow]

MAX_RSS_MB = 300

# `python -c MEASURE OUT ERR CMD...` runs CMD and prints its exit code, peak RSS (kB) and wall time:
# RUSAGE_CHILDREN of this wrapper holds CMD alone, not every subprocess the test session started before.
MEASURE = """
import resource, subprocess, sys, time
start = time.monotonic()
with open(sys.argv[1], "w") as out, open(sys.argv[2], "w") as err:
    code = subprocess.call(sys.argv[3:], stdout=out, stderr=err, stdin=subprocess.DEVNULL)
print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, time.monotonic() - start)
"""


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.endswith("_API_KEY") and not k.startswith("CONVSIM_") and k != "PYTHONPATH"}
    env.update(CONVSIM_HOME=str(home), PYTHONPATH=str(ROOT), CONVSIM_ROOTS=str(home.parent))
    return env


def convsim(*args: str, home: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "convsim_mcp", *args], cwd=ROOT, env=_env(home),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def measured(*args: str, home: Path, timeout: float = 120) -> tuple[subprocess.CompletedProcess[str], float, float]:
    """Run the CLI; returns (its result, its peak RSS in MB, its wall time in seconds)."""
    out, err = home.parent / "measured.out", home.parent / "measured.err"
    wrapper = subprocess.run([sys.executable, "-c", MEASURE, str(out), str(err), sys.executable, "-m", "convsim_mcp",
                              *args], cwd=ROOT, env=_env(home), capture_output=True, text=True, timeout=timeout)
    assert wrapper.returncode == 0, wrapper.stderr
    code, rss_kb, wall = wrapper.stdout.split()
    result = subprocess.CompletedProcess(args, int(code), out.read_text(), err.read_text())
    return result, int(rss_kb) / 1024, float(wall)


def _chats(n: int) -> str:
    """n transcripts, one per line, like a typical export of short support chats (~190 bytes a line)."""
    return "".join(json.dumps([{"role": "user", "content": f"Where is my order {i}? It was due on Monday."},
                               {"role": "assistant", "content": f"Order {i} shipped yesterday; it arrives Friday."}])
                   + "\n" for i in range(n))


def test_a_file_at_max_transcripts_imports_scores_and_exports_in_flat_memory(convsim_home, tmp_path):
    path = tmp_path / "limit.jsonl"
    path.write_text(_chats(MAX_TRANSCRIPTS), encoding="utf-8")
    db = str(tmp_path / "big.sqlite")

    scored, rss, wall = measured("score", "--file", str(path), "--model", "offline", "--json", "--db", db,
                                 home=convsim_home)
    assert scored.returncode == 0, scored.stderr[-2000:]
    print(f"score --file with {MAX_TRANSCRIPTS} transcripts: peak RSS {rss:.0f} MB, {wall:.1f} s")
    assert rss <= MAX_RSS_MB, f"peak RSS {rss:.0f} MB"
    result = json.loads(scored.stdout)
    assert result["sessions"] == MAX_TRANSCRIPTS
    assert {s["scorer"]: s["sessions"] for s in result["scorers"]}["goal_achievement"] == MAX_TRANSCRIPTS
    (run_id,) = result["run_ids"]

    shown, rss, wall = measured("runs", "show", run_id, "--json", "--db", db, home=convsim_home)
    assert shown.returncode == 0, shown.stderr
    print(f"runs show: peak RSS {rss:.0f} MB, {wall:.1f} s")
    summary = json.loads(shown.stdout)
    assert summary["status"] == "completed" and summary["sessions_total"] == MAX_TRANSCRIPTS
    assert summary["turns_done"] == MAX_TRANSCRIPTS and len(summary["sessions"]) == 50
    assert summary["scores"][0]["sessions"] == MAX_TRANSCRIPTS
    assert rss <= MAX_RSS_MB

    out = tmp_path / "export.jsonl"
    exported, rss, wall = measured("runs", "export", run_id, "-o", str(out), "--db", db, home=convsim_home)
    assert exported.returncode == 0, exported.stderr
    print(f"runs export: peak RSS {rss:.0f} MB, {wall:.1f} s")
    assert f"wrote {MAX_TRANSCRIPTS} sessions" in exported.stderr
    with out.open(encoding="utf-8") as f:
        first = json.loads(f.readline())
        assert sum(1 for _ in f) + 1 == MAX_TRANSCRIPTS
    assert first["messages"][1]["content"].startswith("Order 0 shipped")
    assert rss <= MAX_RSS_MB


def test_a_file_over_max_transcripts_is_refused_up_front_and_nothing_is_stored(convsim_home, tmp_path):
    path = tmp_path / "over.jsonl"
    path.write_text(_chats(MAX_TRANSCRIPTS + 1), encoding="utf-8")
    db = str(tmp_path / "over.sqlite")

    refused, rss, wall = measured("score", "--file", str(path), "--model", "offline", "--db", db, home=convsim_home)
    print(f"refusal of {MAX_TRANSCRIPTS + 1} transcripts: peak RSS {rss:.0f} MB, {wall:.1f} s")
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr and refused.stdout == ""
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("InvalidOption: ") and f"more than {MAX_TRANSCRIPTS} transcripts" in line
    assert "MAX_TRANSCRIPTS" in line
    assert rss <= MAX_RSS_MB  # refused before the transcripts were read into memory
    imported = convsim("runs", "import", str(path), "--db", db, home=convsim_home)
    assert imported.returncode == 2 and "MAX_TRANSCRIPTS" in imported.stderr, imported.stderr
    listed = convsim("runs", "list", "--db", db, home=convsim_home)
    assert listed.returncode == 0 and "no runs yet" in listed.stdout


def _stored(db: str, sql: str) -> list[tuple]:
    if not Path(db).exists():
        return []
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return conn.execute(sql).fetchall()
    except sqlite3.OperationalError:  # the schema is not there yet
        return []


def test_a_killed_simulation_reads_interrupted_everywhere_and_keeps_its_turns(convsim_home, tmp_path):
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps([{"goal": "A. B. C. D.", "id": "a"}, {"goal": "E. F. G. H.", "id": "b"}]))
    db = str(tmp_path / "killed.sqlite")
    # tests.agents:slow takes 2 s a reply: 5 turns would take 10 s
    sim = subprocess.Popen([sys.executable, "-m", "convsim_mcp", "simulate", "tests.agents:slow", str(cases),
                            "--max-turns", "5", "--db", db], cwd=ROOT, env=_env(convsim_home),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not _stored(db, "SELECT 1 FROM messages WHERE data LIKE '%too late%'"):  # one agent turn is stored
            assert sim.poll() is None and time.monotonic() < deadline, "the simulation ended before a turn was stored"
            time.sleep(0.05)
        ((run_id,),) = _stored(db, "SELECT id FROM runs")
        alive = convsim("runs", "list", "--db", db, home=convsim_home)
        assert "running" in next(line for line in alive.stdout.splitlines() if line.startswith(run_id))
        sim.send_signal(signal.SIGKILL)
        assert sim.wait(10) == -signal.SIGKILL
    finally:
        sim.kill()

    listed = convsim("runs", "list", "--db", db, home=convsim_home)
    assert listed.returncode == 0, listed.stderr
    assert "interrupted" in next(line for line in listed.stdout.splitlines() if line.startswith(run_id))

    table = convsim("runs", "show", run_id, "--db", db, home=convsim_home)
    assert table.returncode == 0, table.stderr
    assert table.stdout.startswith(f"run {run_id}  interrupted")
    shown = json.loads(convsim("runs", "show", run_id, "--json", "--db", db, home=convsim_home).stdout)
    assert shown["status"] == "interrupted" and "exited before it finished" in shown["error"]
    assert shown["stop_reasons"] == {"cancelled": 2} and shown["turns_done"] >= 1

    exported = convsim("runs", "export", run_id, "--db", db, home=convsim_home)
    assert exported.returncode == 0, exported.stderr
    records = [json.loads(line) for line in exported.stdout.splitlines()]
    assert len(records) == 2 and all(r["stop_reason"] == "cancelled" for r in records)
    replies = [m["content"] for r in records for m in r["messages"] if m["role"] == "assistant"]
    assert "too late" in replies  # the completed turns survived the kill


def test_a_sync_agent_blocked_past_its_timeout_ends_its_sessions_and_the_process_exits(convsim_home, tmp_path):
    """tests.agents:blocks sleeps 600 s. Its threads cannot be killed: they are abandoned, and must not
    keep the CLI alive once the run is done."""
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps([{"goal": "track my order"}, {"goal": "get a refund"}, {"goal": "change address"}]))
    db = str(tmp_path / "blocked.sqlite")
    target = json.dumps({"path": "tests.agents:blocks", "timeout_s": 2})
    proc = convsim("simulate", target, str(cases), "--max-turns", "3", "--json", "--db", db, home=convsim_home,
                   timeout=30)  # kept alive by the 600 s threads, it fails here with TimeoutExpired (child killed)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["status"] == "completed" and summary["stop_reasons"] == {"agent_error": 3}
    assert all(s["error"] == "agent did not reply within 2s" for s in summary["sessions"])

    shown = json.loads(convsim("runs", "show", summary["run_id"], "--json", "--db", db, home=convsim_home).stdout)
    assert shown["status"] == "completed" and shown["stop_reasons"] == {"agent_error": 3}
    exported = convsim("runs", "export", summary["run_id"], "--db", db, home=convsim_home)
    assert exported.returncode == 0, exported.stderr
    records = [json.loads(line) for line in exported.stdout.splitlines()]
    assert [r["stop_detail"] for r in records] == ["agent did not reply within 2s"] * 3
    assert all(r["messages"][0]["role"] == "user" and r["messages"][-1]["error"] for r in records)
