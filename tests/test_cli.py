"""The `convsim-mcp` command line, run as a subprocess the way a terminal or CI job runs it.

Results go to stdout, progress to stderr; user errors exit 2 with one `Type: message` line, never a traceback.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow]

CASES = [
    {"goal": "Ask about refunds. Then ask about shipping.", "id": "refund"},  # two goal sentences: max_turns
    {"goal": "track my order"},  # one sentence: goal_achieved after the first exchange
]


def convsim(*args: str, home: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.endswith("_API_KEY") and not k.startswith("CONVSIM_") and k != "PYTHONPATH"}
    env.update(CONVSIM_HOME=str(home), PYTHONPATH=str(ROOT), CONVSIM_ROOTS=str(home.parent))  # tmp files readable
    return subprocess.run([sys.executable, "-m", "convsim_mcp", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture
def cases_file(tmp_path) -> Path:
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(CASES), encoding="utf-8")
    return path


@pytest.fixture
def db(tmp_path) -> str:
    return str(tmp_path / "cli.sqlite")


def simulate_json(cases_file: Path, db: str, home: Path) -> dict:
    proc = convsim("simulate", "tests.agents:echo", str(cases_file), "--max-turns", "2", "--db", db, "--json",
                   home=home)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], error_type: str | None) -> str:
    """Exit 2, nothing on stdout, exactly one `Type: message` line on stderr (any user-error type if None)."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got:\n{proc.stderr}"
    assert re.match(rf"{error_type or '[A-Z][A-Za-z]+'}: \S", lines[0]), proc.stderr
    return lines[0]


def test_simulate_prints_a_session_table_on_stdout_and_progress_on_stderr(cases_file, db, convsim_home):
    proc = convsim("simulate", "tests.agents:echo", str(cases_file), "--max-turns", "2", "--db", db,
                   home=convsim_home)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "completed" in out.splitlines()[0]
    assert "session" in out and "stop reason" in out
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith("sim-")}
    assert set(rows) == {"refund", "#2"}  # case column: the case id, else its number
    assert rows["refund"][2] == "max_turns" and rows["refund"][3] == "2"
    assert rows["#2"][2] == "goal_achieved" and rows["#2"][3] == "1"
    assert "offline" in out  # the user model, and the note that no LLM played the user
    # Progress goes to stderr (a line per finished session when stderr is not a terminal), never stdout.
    ended = [line for line in proc.stderr.splitlines() if "ended:" in line]
    assert len(ended) == 2, proc.stderr
    assert any("ended: max_turns" in line for line in ended)
    assert any("ended: goal_achieved" in line for line in ended)
    assert "ended:" not in out
    assert "Traceback" not in proc.stderr


def test_simulate_json_output_is_the_run_summary(cases_file, db, convsim_home):
    summary = simulate_json(cases_file, db, convsim_home)
    assert summary["status"] == "completed"
    assert summary["target"] == "tests.agents:echo"
    assert summary["offline"] is True
    assert summary["sessions_total"] == summary["sessions_done"] == 2
    assert summary["stop_reasons"] == {"max_turns": 1, "goal_achieved": 1}
    assert summary["turns_done"] == 3
    assert all(s["resource"].startswith(f"convsim://runs/{summary['run_id']}/sessions/") for s in summary["sessions"])


def test_runs_list_and_show_find_a_stored_run(cases_file, db, convsim_home):
    run_id = simulate_json(cases_file, db, convsim_home)["run_id"]

    listed = convsim("runs", "list", "--db", db, home=convsim_home)
    assert listed.returncode == 0, listed.stderr
    assert run_id in listed.stdout
    row = next(line for line in listed.stdout.splitlines() if line.startswith(run_id))
    assert "completed" in row and "tests.agents:echo" in row

    shown = convsim("runs", "show", run_id, "--json", "--db", db, home=convsim_home)
    assert shown.returncode == 0, shown.stderr
    summary = json.loads(shown.stdout)
    assert summary["run_id"] == run_id and summary["status"] == "completed"
    assert len(summary["sessions"]) == 2

    table = convsim("runs", "show", run_id, "--db", db, home=convsim_home)
    assert table.returncode == 0, table.stderr
    assert run_id in table.stdout and "max_turns" in table.stdout


def test_runs_use_convsim_home_when_no_db_is_given(cases_file, convsim_home):
    proc = convsim("simulate", "tests.agents:echo", str(cases_file), "--max-turns", "1", "--json", home=convsim_home)
    assert proc.returncode == 0, proc.stderr
    run_id = json.loads(proc.stdout)["run_id"]
    assert (convsim_home / "convsim.sqlite").is_file()
    listed = convsim("runs", "list", home=convsim_home)
    assert run_id in listed.stdout


def _export(run_id: str, db: str, out: Path, home: Path) -> list[dict]:
    proc = convsim("runs", "export", run_id, "-o", str(out), "--db", db, home=home)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "wrote 2 sessions" in proc.stderr
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def _import_and_show(path: Path, db: str, home: Path) -> dict:
    imported = convsim("runs", "import", str(path), "--db", db, home=home)
    assert imported.returncode == 0, imported.stderr
    assert "Traceback" not in imported.stderr
    new_id = imported.stdout.strip()
    assert new_id.startswith("run-") and "\n" not in new_id
    shown = convsim("runs", "show", new_id, "--json", "--db", db, home=home)
    assert shown.returncode == 0, shown.stderr
    summary = json.loads(shown.stdout)
    assert summary["run_id"] == new_id
    return summary


def test_exported_run_imports_into_another_database_with_the_same_sessions(cases_file, db, convsim_home, tmp_path):
    original = simulate_json(cases_file, db, convsim_home)
    records = _export(original["run_id"], db, tmp_path / "run.jsonl", convsim_home)
    assert len(records) == 2
    assert all(r["messages"] and r["stop_reason"] for r in records)

    copy = _import_and_show(tmp_path / "run.jsonl", str(tmp_path / "other.sqlite"), convsim_home)
    assert copy["kind"] == "import" and copy["status"] == "completed"
    assert len(copy["sessions"]) == len(original["sessions"]) == 2
    assert copy["stop_reasons"] == original["stop_reasons"]
    assert copy["turns_done"] == original["turns_done"]


def test_exported_run_imports_back_into_the_same_database_as_a_new_run(cases_file, db, convsim_home, tmp_path):
    original = simulate_json(cases_file, db, convsim_home)
    _export(original["run_id"], db, tmp_path / "run.jsonl", convsim_home)

    copy = _import_and_show(tmp_path / "run.jsonl", db, convsim_home)
    assert copy["run_id"] != original["run_id"]
    assert len(copy["sessions"]) == len(original["sessions"])
    assert copy["stop_reasons"] == original["stop_reasons"]
    # The original run is untouched.
    again = convsim("runs", "show", original["run_id"], "--json", "--db", db, home=convsim_home)
    assert json.loads(again.stdout)["sessions_done"] == 2


def test_import_of_a_file_that_is_not_jsonl_exits_2_with_one_line_error(db, convsim_home, tmp_path):
    bad = tmp_path / "notes.jsonl"
    bad.write_text("this is not json\n", encoding="utf-8")
    proc = convsim("runs", "import", str(bad), "--db", db, home=convsim_home)
    line = assert_one_line_error(proc, None)
    assert "line 1" in line


def test_import_of_a_file_with_a_repeated_session_stores_both_copies(cases_file, db, convsim_home, tmp_path):
    original = simulate_json(cases_file, db, convsim_home)
    records = _export(original["run_id"], db, tmp_path / "run.jsonl", convsim_home)
    twice = tmp_path / "twice.jsonl"
    twice.write_text(json.dumps(records[0]) + "\n" + json.dumps(records[0]) + "\n", encoding="utf-8")

    copy = _import_and_show(twice, str(tmp_path / "other.sqlite"), convsim_home)
    assert copy["status"] == "completed"
    assert len(copy["sessions"]) == 2
    assert len({s["session_id"] for s in copy["sessions"]}) == 2


def test_invalid_yaml_cases_file_exits_2_with_one_line_error(db, convsim_home, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("goal: [unclosed\n  - : :\n", encoding="utf-8")
    proc = convsim("simulate", "tests.agents:echo", str(bad), "--db", db, home=convsim_home)
    line = assert_one_line_error(proc, "InvalidTestCase")
    assert "bad.yaml" in line and "YAML" in line


def test_case_missing_goal_exits_2_naming_the_case_and_field(db, convsim_home, tmp_path):
    bad = tmp_path / "cases.yaml"
    bad.write_text("- goal: ok\n- persona: x\n", encoding="utf-8")
    proc = convsim("simulate", "tests.agents:echo", str(bad), "--db", db, home=convsim_home)
    line = assert_one_line_error(proc, "InvalidTestCase")
    assert "test case 2" in line and "line 2" in line and "goal" in line
    # Nothing was stored for the rejected request.
    assert "no runs yet" in convsim("runs", "list", "--db", db, home=convsim_home).stdout


def test_unknown_run_id_exits_2_with_not_found(db, convsim_home):
    for args in (["runs", "show", "run-nope"], ["runs", "export", "run-nope"]):
        proc = convsim(*args, "--db", db, home=convsim_home)
        line = assert_one_line_error(proc, "NotFound")
        assert "run-nope" in line


def test_demo_runs_the_bundled_example_offline(convsim_home, tmp_path):
    proc = convsim("demo", "--db", str(tmp_path / "demo.sqlite"), home=convsim_home)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert re.match(r"# .*support_agent: \d+ issues: \d+ high", proc.stdout.splitlines()[0]), proc.stdout[:200]
    assert "offline heuristics, not a model" in proc.stdout and "offline backend" in proc.stderr
    high = proc.stdout.split("\n### [")[1]
    assert high.startswith("HIGH]") and "KeyError" in high  # the crash comes first
    assert "Forgets facts the user gave earlier" in proc.stdout
    assert "scripted_turns:" in proc.stdout


def test_score_prints_pass_rates_and_failures_for_a_run(db, convsim_home):
    sim = convsim("simulate", "examples/support_agent.py:support_agent", "examples/support_cases.yaml",
                  "--max-turns", "6", "--json", "--db", db, home=convsim_home)
    run_id = json.loads(sim.stdout)["run_id"]
    proc = convsim("score", run_id, "--scorer", "knowledge_retention", "--scorer", "goal_achievement", "--db", db,
                   home=convsim_home)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"knowledge_retention\s+83%\s+5\s+1\s+0\s+offline", proc.stdout), proc.stdout
    assert "FAIL knowledge_retention" in proc.stdout and "turn 4" in proc.stdout
    assert "offline heuristics" in proc.stdout


def test_score_a_jsonl_file_with_a_custom_judge_offline_is_unscored(db, convsim_home, tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]) + "\n")
    judge = json.dumps({"name": "polite", "instructions": "Polite? {{ conversation }}"})
    proc = convsim("score", "--file", str(path), "--scorer", judge, "--json", "--db", db, home=convsim_home)
    assert proc.returncode == 3, proc.stderr  # a verdict that needs a model could not be given: not green
    assert "1 of 1 session(s) could not be tested" in proc.stderr
    result = json.loads(proc.stdout)
    (s,) = result["scorers"]
    assert s["unscored"] == 1 and "needs a model" in s["errors"][0]["rationale"]
    assert result["untested"] == 1 and "judge polite could not give a verdict" in result["untested_sessions"][0]["reason"]
    relaxed = convsim("score", "--file", str(path), "--scorer", judge, "--allow-untested", "1", "--db", db,
                      home=convsim_home)
    assert relaxed.returncode == 0, relaxed.stderr


def test_score_with_a_bad_scorer_exits_2(db, convsim_home):
    proc = convsim("score", "run-x", "--scorer", "no_such_judge", "--db", db, home=convsim_home)
    line = assert_one_line_error(proc, "InvalidOption")
    assert "unknown scorer 'no_such_judge'" in line


def test_test_agent_fail_on_sets_the_exit_code_and_writes_reports(db, convsim_home, tmp_path):
    md, js = tmp_path / "report.md", tmp_path / "report.json"
    args = ("test-agent", "examples/support_agent.py:support_agent", "--cases", "examples/support_cases.yaml",
            "--num-test-cases", "0", "--max-turns", "6", "--model", "offline", "--db", db)
    failing = convsim(*args, "--fail-on", "high", "--report", str(md), "--json", str(js), home=convsim_home)
    assert failing.returncode == 1, failing.stderr
    assert "at or above 'high'" in failing.stderr
    assert md.read_text().startswith("# ") and json.loads(js.read_text())["issues"][0]["severity"] == "high"
    lenient = convsim(*args, home=convsim_home)
    assert lenient.returncode == 0, lenient.stderr


def test_rerun_exits_1_while_an_issue_reproduces_and_0_once_fixed(db, convsim_home, tmp_path):
    js = tmp_path / "r.json"
    convsim("test-agent", "examples/support_agent.py:support_agent", "--cases", "examples/support_cases.yaml",
            "--num-test-cases", "0", "--max-turns", "6", "--json", str(js), "--db", db, home=convsim_home)
    report = json.loads(js.read_text())
    crash = report["issues"][0]["id"]
    still = convsim("rerun", report["run_id"], "--issue", crash, "--db", db, home=convsim_home)
    assert still.returncode == 1 and "REPRODUCES" in still.stdout
    out = tmp_path / "rerun.json"
    fixed = convsim("rerun", report["run_id"], "--issue", crash, "--target", "tests.fixed_agent:support_agent",
                    "--json", str(out), "--db", db, home=convsim_home)
    assert fixed.returncode == 0 and "fixed" in fixed.stdout
    written = json.loads(out.read_text())
    assert set(written) == {"run_id", "rerun_of", "issues", "new_issues"}
    assert [(i["id"], i["status"]) for i in written["issues"]] == [(crash, "fixed")]
    assert {"reason", "sessions"} <= set(written["issues"][0])


def test_generate_writes_a_loadable_file_and_a_runnable_test_set(db, convsim_home, tmp_path):
    out = tmp_path / "cases.yaml"
    proc = convsim("generate", "--target", "examples/support_agent.py:support_agent", "--num-test-cases", "3",
                   "-o", str(out), "--db", db, home=convsim_home)
    assert proc.returncode == 0, proc.stderr
    set_id = re.search(r"test set (set-\w+)", proc.stdout).group(1)
    sim = convsim("simulate", "examples/support_agent.py:support_agent", set_id, "--json", "--db", db,
                  home=convsim_home)
    assert json.loads(sim.stdout)["sessions_total"] == 3
    assert out.read_text().count("goal:") == 3


def test_simulate_takes_inline_json_test_cases_like_the_mcp_tool(db, convsim_home):
    proc = convsim("simulate", "tests.agents:echo", json.dumps(CASES), "--max-turns", "2", "--db", db, "--json",
                   home=convsim_home)
    assert proc.returncode == 0, proc.stderr
    sessions = json.loads(proc.stdout)["sessions"]
    assert [(s["case_id"], s["goal"]) for s in sessions] == [("refund", CASES[0]["goal"]), (None, CASES[1]["goal"])]


@pytest.mark.parametrize("cases, text", [
    pytest.param('[{"goal": "hi"', "inline test cases are not valid JSON", id="not-json"),
    pytest.param('[{"goal": "hi", "persna": "x"}]', "test case 1, field 'persna': unknown field 'persna' (did you mean 'persona'?)",
                 id="unknown-field"),
    pytest.param('["\\ud800"]', "lone UTF-16 surrogate", id="lone-surrogate"),
])
def test_bad_inline_test_cases_exit_2_naming_what_is_wrong(db, convsim_home, cases, text):
    proc = convsim("simulate", "tests.agents:echo", cases, "--db", db, home=convsim_home)
    line = assert_one_line_error(proc, "InvalidTestCase")
    assert text in line, line


def test_test_agent_plays_the_user_agent_given(db, convsim_home, tmp_path):
    out = tmp_path / "sessions.jsonl"
    proc = convsim("test-agent", "tests.agents:echo", "--cases", '[{"goal": "reset my password"}]',
                   "--num-test-cases", "0", "--max-turns", "2", "--model", "offline",
                   "--user-agent", "tests.test_simulator:ImpatientUser", "--json", str(tmp_path / "r.json"),
                   "--db", db, home=convsim_home)
    assert proc.returncode == 0, proc.stderr
    run_id = json.loads((tmp_path / "r.json").read_text())["run_id"]
    assert convsim("runs", "export", run_id, "-o", str(out), "--db", db, home=convsim_home).returncode == 0
    [session] = [json.loads(line) for line in out.read_text().splitlines()]
    assert session["messages"][0]["content"] == "I need help RIGHT NOW: reset my password"
