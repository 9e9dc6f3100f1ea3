""""Could not test" is never green: the real CLI against a real fake provider that fails.

Exit codes: 0 done, 1 issues at or above --fail-on, 2 bad input, 3 could not test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fake_llm import FakeReply

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow]

CASES = [{"goal": "Ask about refunds. Then ask about shipping."}, {"goal": "Ask where order A1 is."},
         {"goal": "Ask how to reset a password."}]


@pytest.fixture
def cli(tmp_path, fake_llm):
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps(CASES))
    env = {k: v for k, v in os.environ.items()
           if not k.endswith("_API_KEY") and not k.startswith("CONVSIM_") and k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(ROOT), CONVSIM_HOME=str(tmp_path / "home"), CONVSIM_ROOTS=str(tmp_path),
               CONVSIM_API_BASE=fake_llm.url, CONVSIM_API_KEY="sk-test-not-a-real-key", CONVSIM_LLM_RETRIES="2")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "convsim_mcp", *args, "--db", str(tmp_path / "db.sqlite")],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)

    run.cases = str(cases)  # type: ignore[attr-defined]
    return run


def test_a_refused_key_stops_test_agent_after_one_call_and_exits_3(cli, fake_llm):
    fake_llm.set_handler(lambda req: FakeReply(status=401, content="Incorrect API key provided"))
    proc = cli("test-agent", "tests.agents:echo", "--cases", cli.cases, "--num-test-cases", "2",
               "--model", "openai/fake-model", "--fail-on", "high")
    assert proc.returncode == 3, proc.stderr
    assert fake_llm.calls == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("CouldNotTest:")]
    assert len(errors) == 1 and "openai/fake-model" in errors[0] and "CONVSIM_API_KEY" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_account_out_of_quota_stops_simulate_after_one_call_and_exits_3(cli, fake_llm):
    fake_llm.set_handler(lambda req: FakeReply(status=429, error_code="insufficient_quota", content=(
        "You exceeded your current quota, please check your plan and billing details.")))
    proc = cli("simulate", "tests.agents:echo", cli.cases, "--model", "openai/fake-model", "--json")
    assert proc.returncode == 3, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["status"] == "failed" and "quota is used up" in summary["error"] and fake_llm.calls == 1
    assert summary["stop_reasons"] == {"simulator_error": 3} and summary["untested"] == 3


def test_every_call_failing_with_500_exits_3_and_usage_counts_the_failed_attempts(cli, fake_llm):
    fake_llm.set_handler(lambda req: FakeReply(status=500, content="upstream overloaded", headers={"Retry-After": "0"}))
    proc = cli("simulate", "tests.agents:echo", cli.cases, "--model", "openai/fake-model", "--json",
               "--scorer", "goal_achievement")
    assert proc.returncode == 3, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["stop_reasons"] == {"simulator_error": 3} and summary["untested"] == 3
    user = summary["usage"]["simulated_user"]
    assert user["calls"] == user["failed_calls"] == fake_llm.calls == 9  # 3 sessions x (1 call + 2 retries)
    assert user["failures"] == {"server_error": 9}
    assert "judge" not in summary["usage"]  # judges are not run on sessions the agent never answered
    assert "3 of 3 session(s) could not be tested" in proc.stderr


def test_a_judge_that_cannot_answer_exits_3_even_when_the_user_is_offline(cli, fake_llm):
    fake_llm.set_handler(lambda req: FakeReply(status=503, content="unavailable", headers={"Retry-After": "0"}))
    proc = cli("simulate", "tests.agents:echo", cli.cases, "--model", "offline", "--judge-model",
               "openai/fake-model", "--scorer", "goal_achievement", "--json")
    assert proc.returncode == 3, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["untested"] == 3 and summary["scores"][0]["passed"] == 0
    assert all("judge goal_achievement could not give a verdict" in u["reason"] for u in summary["untested_sessions"])


def test_allow_untested_tolerates_a_share_of_untested_sessions(cli, fake_llm):
    replies = iter([FakeReply(status=500, content="flaky", headers={"Retry-After": "0"})] * 3)
    fake_llm.set_handler(lambda req: next(replies, None) or FakeReply(content={
        "message": "Hi there", "goal_achieved": False, "end_conversation": False, "reason": "opening"}))
    # The first session's only call fails 3 times (simulator_error); the other two sessions run their one turn.
    base = ("simulate", "tests.agents:echo", cli.cases, "--model", "openai/fake-model", "--concurrency", "1",
            "--max-turns", "1")
    assert cli(*base).returncode == 3
    replies = iter([FakeReply(status=500, content="flaky", headers={"Retry-After": "0"})] * 3)
    assert cli(*base, "--allow-untested", "0.34").returncode == 0
    bad = cli(*base, "--allow-untested", "2")
    assert bad.returncode == 2 and "expected a fraction from 0 to 1" in bad.stderr


def test_a_healthy_offline_run_exits_0(cli):
    assert cli("simulate", "tests.agents:echo", cli.cases, "--model", "offline").returncode == 0
