"""`convsim-mcp simulate/test-agent --from-run RUN_ID [--replay [--continue-after-replay]]`, as a subprocess."""

from __future__ import annotations

import json

import pytest

from tests.test_cli import assert_one_line_error, convsim

pytestmark = [pytest.mark.slow]

AGENT = "examples/support_agent.py:support_agent"
FIXED = "tests.fixed_agent:support_agent"


@pytest.fixture
def db(tmp_path) -> str:
    return str(tmp_path / "cli.sqlite")


def first_run(db: str, home, tmp_path) -> str:
    js = tmp_path / "first.json"
    proc = convsim("test-agent", AGENT, "--cases", "examples/support_cases.yaml", "--num-test-cases", "0",
                   "--max-turns", "6", "--model", "offline", "--json", str(js), "--db", db, home=home)
    assert proc.returncode == 0, proc.stderr
    return json.loads(js.read_text())["run_id"]


def exported(run_id: str, db: str, home) -> dict[tuple[str, int], dict]:
    proc = convsim("runs", "export", run_id, "--db", db, home=home)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    return {(r["test_case"]["id"], r["repeat"]): r for r in records}


def users(record: dict) -> list[str]:
    return [m["content"] for m in record["messages"] if m["role"] == "user"]


def test_simulate_replay_sends_the_recorded_messages_and_ends_replay_end(db, convsim_home, tmp_path):
    run_id = first_run(db, convsim_home, tmp_path)
    same = convsim("simulate", AGENT, "--from-run", run_id, "--replay", "--max-turns", "6", "--model", "offline",
                   "--json", "--db", db, home=convsim_home)
    assert same.returncode == 0, same.stderr
    changed = convsim("simulate", FIXED, "--from-run", run_id, "--replay", "--max-turns", "6", "--model", "offline",
                      "--json", "--db", db, home=convsim_home)
    assert changed.returncode == 0, changed.stderr
    old = exported(run_id, db, convsim_home)
    for proc in (same, changed):
        new = exported(json.loads(proc.stdout)["run_id"], db, convsim_home)
        assert set(new) == set(old)
        for pair, record in new.items():
            assert users(record) == users(old[pair]), pair
            assert record["replayed_turns"] == list(range(1, record["turns"] + 1))
    assert exported(json.loads(same.stdout)["run_id"], db, convsim_home)[("gift-card-refund", 0)]["stop_reason"] \
        == "agent_error"
    gift = exported(json.loads(changed.stdout)["run_id"], db, convsim_home)[("gift-card-refund", 0)]
    assert gift["stop_reason"] == "replay_end" and gift["messages"][-1]["role"] == "assistant"
    table = convsim("runs", "show", json.loads(changed.stdout)["run_id"], "--db", db, home=convsim_home)
    assert "replay_end" in table.stdout


def test_continue_after_replay_and_resimulate_on_the_command_line(db, convsim_home, tmp_path):
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps([{"goal": "Ask about refunds. Then ask about shipping. Then ask about returns.",
                                  "id": "steps"}]))
    first = convsim("simulate", "tests.agents:crashes_on_turn_2", str(cases), "--model", "offline", "--json",
                    "--db", db, home=convsim_home)
    run_id = json.loads(first.stdout)["run_id"]
    went_on = convsim("simulate", "tests.agents:echo", "--from-run", run_id, "--replay", "--continue-after-replay",
                      "--model", "offline", "--json", "--db", db, home=convsim_home)
    assert went_on.returncode == 0, went_on.stderr
    [s] = json.loads(went_on.stdout)["sessions"]
    assert s["replayed_turns"] == [1, 2] and s["turns"] > 2 and s["stop_reason"] != "replay_end"
    again = convsim("test-agent", "tests.agents:echo", "--from-run", run_id, "--model", "offline", "--json",
                    str(tmp_path / "r.json"), "--db", db, home=convsim_home)
    assert again.returncode == 0, again.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert [c["id"] for c in report["test_cases"]] == ["steps"]  # the earlier run's case; nothing generated
    assert all(x["replayed_turns"] == [] for x in report["sessions"])


@pytest.mark.parametrize(("args", "expected"), [
    pytest.param(("--from-run", "run-missing"), "from_run: no run with id 'run-missing'", id="unknown-run"),
    pytest.param(("--replay",), "mode 'replay' needs from_run", id="replay-without-run"),
    pytest.param(("--from-run", "run-missing", "--continue-after-replay"), "continue_after_replay applies only",
                 id="continue-without-replay"),
    pytest.param((), "test_cases is required", id="no-cases-no-run"),
])
def test_bad_from_run_options_exit_2_with_one_line(db, convsim_home, args, expected):
    proc = convsim("simulate", "tests.agents:echo", *args, "--model", "offline", "--db", db, home=convsim_home)
    assert expected in assert_one_line_error(proc, "InvalidOption")
