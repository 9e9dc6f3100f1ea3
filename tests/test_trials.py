"""Repeated trials: pass^k per test case and over the run, flaky cases, and issues worded in trials."""

from __future__ import annotations

import json
import uuid
from math import isclose

import pytest
from mcp import Client

from convsim_mcp.server import build_server
from engine import (Assessment, Evidence, Message, OfflineBackend, Session, StopReason, Store, TestCase, simulate,
                    test_agent)
from engine.issues import discover_issues, pass_hat, summarize_trials, transcript_mark, trial_outcome
from engine.reports import compact_result, render_markdown
from tests.conftest import ROOT
from tests.test_cli import convsim

pytestmark = pytest.mark.anyio

FLAKY_AGENT = "tests.agents:every_other_session_crashes"


# --- the estimator ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        pytest.param(4, 2, 1, 0.5, id="k1-is-the-pass-rate"),
        pytest.param(4, 2, 2, 1 / 6, id="n4-c2-k2"),
        pytest.param(4, 1, 2, 0.0, id="fewer-passes-than-k"),
        pytest.param(4, 0, 1, 0.0, id="none-passed"),
        pytest.param(4, 4, 3, 1.0, id="all-passed"),
        pytest.param(5, 3, 2, 0.3, id="n5-c3-k2"),
        pytest.param(1, 1, 1, 1.0, id="one-trial"),
    ],
)
def test_pass_hat_is_the_unbiased_estimator(n, c, k, expected):
    assert isclose(pass_hat(n, c, k), expected)


@pytest.mark.parametrize("n, c, k", [(2, 1, 3), (0, 0, 1), (4, 2, 0)], ids=["n-below-k", "no-trials", "k-zero"])
def test_pass_hat_is_none_when_it_cannot_be_estimated(n, c, k):
    assert pass_hat(n, c, k) is None


# --- what a trial's outcome is ------------------------------------------------------------------


def _session(sid: str, stop: StopReason | None = StopReason.GOAL_ACHIEVED, *, case: int = 0,
             user: str = "Where is my order?", reply: str | None = "It ships today.", error: str | None = None,
             repeat: int = 0) -> Session:
    messages = [Message(role="user", content=user, turn=1),
                Message(role="assistant", content=reply, error=error, turn=1)]
    return Session(id=sid, run_id="run-t", case_index=case, repeat=repeat, test_case=TestCase(goal="g", id=f"c{case}"),
                   messages=messages, stop_reason=stop, turns=1)


def _verdict(sid: str, passed: bool | None, *, error_kind: str | None = None) -> Assessment:
    return Assessment(session_id=sid, scorer="goal_achievement", passed=passed, value=passed,
                      error="judge failed" if error_kind else None, error_kind=error_kind)


@pytest.mark.parametrize(
    "session, verdicts, outcome",
    [
        pytest.param(_session("s"), [_verdict("s", True)], "pass", id="verdicts-passed"),
        pytest.param(_session("s"), [], "pass", id="no-scorers-no-crash"),
        pytest.param(_session("s"), [_verdict("s", True), _verdict("s", False)], "fail", id="a-verdict-failed"),
        pytest.param(_session("s", StopReason.AGENT_ERROR, reply=None, error="KeyError: 'x'"), [], "fail",
                     id="agent-crashed"),
        pytest.param(_session("s", StopReason.AGENT_EMPTY, reply=""), [], "fail", id="agent-silent"),
        pytest.param(_session("s", StopReason.SIMULATOR_ERROR), [_verdict("s", False)], "untested",
                     id="simulator-failed"),
        pytest.param(_session("s", user="How can I help you today?"), [_verdict("s", False)], "untested",
                     id="simulated-user-broke-role"),
        pytest.param(_session("s", StopReason.CANCELLED), [], "untested", id="cancelled"),
        pytest.param(_session("s", None), [], "untested", id="not-finished"),
        pytest.param(_session("s"), [_verdict("s", None, error_kind="model")], "untested", id="judge-model-failed"),
        pytest.param(_session("s"), [_verdict("s", None, error_kind="model"), _verdict("s", False)], "fail",
                     id="a-failure-is-seen-even-if-another-judge-failed"),
        pytest.param(_session("s"), [_verdict("s", True), _verdict("s", None, error_kind="scorer")], "pass",
                     id="a-scorer-bug-says-nothing"),
    ],
)
def test_trial_outcome(session, verdicts, outcome):
    assert trial_outcome(session, verdicts) == outcome
    assert trial_outcome(session, verdicts, transcript_mark(session)) == outcome  # the stored mark decides alike


def test_a_failing_custom_judge_named_like_a_signal_counts_as_that_signal():
    broke_role = Assessment(session_id="s", scorer="simulator_error", passed=False, value=False)
    crashed = Assessment(session_id="s", scorer="agent_error", passed=False, value=False)
    assert trial_outcome(_session("s"), [broke_role], "clean") == "untested"
    assert trial_outcome(_session("s"), [crashed], "clean") == "fail"


def test_a_session_still_running_is_not_a_trial_yet():
    trials = summarize_trials([_session("a1"), _session("a2", None)], [], repeats=2)
    (case,) = trials.case_results
    assert (case.trials, case.passed, case.untested, trials.untested) == (1, 1, 0, 0)


def test_untested_trials_are_left_out_of_n_and_counted():
    sessions = [_session("a1"), _session("a2", StopReason.AGENT_ERROR, reply=None, error="KeyError: 'x'"),
                _session("a3", StopReason.SIMULATOR_ERROR), _session("a4"),
                _session("b1", case=1), _session("b2", case=1), _session("b3", case=1), _session("b4", case=1)]
    trials = summarize_trials(sessions, [], repeats=4)
    a, b = trials.case_results
    assert (a.trials, a.passed, a.untested, a.flaky, a.failed_sessions) == (3, 2, 1, True, ["a2"])
    assert a.pass_hat_k is None  # 3 counted trials cannot estimate pass^4
    assert (b.trials, b.passed, b.pass_hat_k, b.flaky) == (4, 4, 1.0, False)
    assert (trials.trials, trials.passed, trials.untested, trials.flaky, trials.flaky_cases) == (7, 6, 1, 1, ["c0"])
    hats = {p.k: (p.value, p.cases) for p in trials.pass_hat}
    assert hats[1] == (round((2 / 3 + 1) / 2, 4), 2)
    assert hats[2] == (round((1 / 3 + 1) / 2, 4), 2)
    assert hats[4] == (1.0, 1)  # only the case with 4 counted trials


# --- issues of a repeated run count trials -----------------------------------------------------


def _crash(sid: str, case: int = 0) -> Session:
    return _session(sid, StopReason.AGENT_ERROR, case=case, reply=None, error="KeyError: 'gift_card'")


async def test_a_crash_in_some_trials_is_intermittent_and_untested_trials_are_not_in_n():
    sessions = [_crash("a1"), _session("a2"), _session("a3", StopReason.SIMULATOR_ERROR), _session("a4")]
    (crash,) = [i for i in (await discover_issues(sessions, [], OfflineBackend()))[0] if i.source == "agent"]
    assert crash.severity_reason == "the agent crashed; intermittent: 1 of 3 trials"


async def test_a_judged_failure_across_cases_sums_its_trials():
    sessions = [_session(f"{c}{r}", case=i) for i, c in enumerate("ab") for r in range(4)]
    verdicts = [Assessment(session_id=sid, scorer="knowledge_retention", passed=False, value=False,
                           rationale="asked again", evidence=[Evidence(turn=1, role="assistant", quote="Name?")])
                for sid in ("a0", "b0", "b1")]
    (issue,) = (await discover_issues(sessions, verdicts, OfflineBackend()))[0]
    assert (issue.severity, issue.severity_reason) == (
        "medium", "degraded: affects 3 sessions, the goal still met in most of them; intermittent: 3 of 8 trials "
                  "of 2 test cases")


async def test_one_failing_trial_of_a_case_is_medium_and_says_so():
    sessions = [_session(f"a{r}") for r in range(3)]
    verdicts = [Assessment(session_id="a1", scorer="dialogue_coherence", passed=False, value=False,
                           rationale="loops", evidence=[Evidence(turn=1, role="assistant", quote="Hi")])]
    (issue,) = (await discover_issues(sessions, verdicts, OfflineBackend()))[0]
    assert (issue.severity, issue.severity_reason) == ("medium", "intermittent: 1 of 3 trials")


# --- a repeated run, end to end -----------------------------------------------------------------


def _flaky_cases() -> list[dict]:
    """One case whose agent crashes in every other trial, one that always passes."""
    return [{"id": "refund", "goal": "Ask for a refund of order A1234 to your card.",
             "context": {"flaky_key": uuid.uuid4().hex}},
            {"id": "hours", "goal": "Ask what the opening hours are."}]


async def test_a_repeated_run_of_an_intermittent_agent_reports_pass_hat_k_and_the_flaky_case(store):
    report = await test_agent(store, FLAKY_AGENT, test_cases=_flaky_cases(), num_test_cases=0, model="offline",
                              repeats=4, max_turns=3, workspace=ROOT)

    trials = report.trials
    refund, hours = trials.case_results
    assert (refund.case_id, refund.trials, refund.passed, refund.flaky, refund.pass_hat_k) == ("refund", 4, 2, True, 0.0)
    assert (hours.case_id, hours.trials, hours.passed, hours.flaky, hours.pass_hat_k) == ("hours", 4, 4, False, 1.0)
    assert trials.flaky == 1 and trials.flaky_cases == ["refund"]
    assert [(p.k, p.value) for p in trials.pass_hat] == [(1, 0.75), (2, round((1 / 6 + 1) / 2, 4)), (3, 0.5),
                                                         (4, 0.5)]
    (crash,) = report.issues
    assert crash.severity == "high" and crash.signals == ["agent_error"]
    assert crash.severity_reason == "the agent crashed; intermittent: 2 of 4 trials"
    assert "crashed in" not in crash.severity_reason

    markdown = render_markdown(report)
    assert "## Repeated trials" in markdown and "| 2 | 58% | 2 |" in markdown
    assert "**1 flaky test case(s)**" in markdown and "- refund: passed 2 of 4 trials" in markdown
    assert "Why high: the agent crashed; intermittent: 2 of 4 trials" in markdown
    assert markdown.splitlines()[0].endswith("1 issue: 1 high; 1 flaky test case")

    digest = compact_result(report, resources={})
    assert digest.trials.flaky_cases == ["refund"] and [c.case_id for c in digest.trials.case_results] == ["refund"]

    stored = json.loads((await store.get_report(report.run_id))[0].model_dump_json())
    assert stored["trials"]["case_results"][0]["pass_hat_k"] == 0.0


@pytest.mark.slow
async def test_runs_show_json_gives_pass_hat_k_per_case_and_the_flaky_flag(tmp_path, convsim_home):
    db = tmp_path / "trials.sqlite"
    store = Store(db)
    report = await test_agent(store, FLAKY_AGENT, test_cases=_flaky_cases(), num_test_cases=0, model="offline",
                              repeats=4, max_turns=3, workspace=ROOT)
    store.close()

    shown = convsim("runs", "show", report.run_id, "--json", "--db", str(db), home=convsim_home)
    assert shown.returncode == 0, shown.stderr
    trials = json.loads(shown.stdout)["trials"]
    assert trials["repeats"] == 4 and trials["flaky"] == 1 and trials["flaky_cases"] == ["refund"]
    assert [(c["case_id"], c["trials"], c["passed"], c["pass_hat_k"], c["flaky"]) for c in trials["case_results"]] \
        == [("refund", 4, 2, 0.0, True), ("hours", 4, 4, 1.0, False)]
    assert trials["pass_hat"][0] == {"k": 1, "value": 0.75, "cases": 2}

    table = convsim("runs", "show", report.run_id, "--db", str(db), home=convsim_home)
    assert "pass^1 75%" in table.stdout and "FLAKY 1 case(s), trials disagree: refund" in table.stdout


@pytest.mark.slow
def test_cli_simulate_with_repeats_returns_the_trials(tmp_path, convsim_home):
    cases = tmp_path / "cases.json"
    cases.write_text(json.dumps(_flaky_cases()), encoding="utf-8")
    proc = convsim("simulate", FLAKY_AGENT, str(cases), "--repeats", "4", "--max-turns", "2", "--json",
                   "--db", str(tmp_path / "sim.sqlite"), home=convsim_home)
    assert proc.returncode == 0, proc.stderr
    trials = json.loads(proc.stdout)["trials"]
    assert trials["flaky_cases"] == ["refund"]
    assert [c["passed"] for c in trials["case_results"]] == [2, 4]


async def test_a_deterministic_agent_is_never_flaky(store):
    cases = [{"id": "hours", "goal": "Ask what the opening hours are."},
             {"id": "refund", "goal": "Ask for a refund of order A1234 to your card."}]
    report = await test_agent(store, "tests.agents:every_other_session_crashes", test_cases=cases, num_test_cases=0,
                              model="offline", repeats=3, max_turns=3, workspace=ROOT)
    assert report.trials.flaky == 0 and report.trials.flaky_cases == []
    assert not any(c.flaky for c in report.trials.case_results)
    assert [(p.k, p.value) for p in report.trials.pass_hat] == [(1, 1.0), (2, 1.0), (3, 1.0)]
    markdown = render_markdown(report)
    assert "No flaky test case" in markdown and "flaky test case(s)**" not in markdown


async def test_an_issue_in_every_trial_says_so_not_intermittent(store):
    report = await test_agent(store, "tests.agents:crashes_on_turn_2",
                              test_cases=[{"id": "two", "goal": "Ask about refunds. Then ask about shipping."}],
                              num_test_cases=0, model="offline", repeats=3, max_turns=3, workspace=ROOT)
    (crash,) = [i for i in report.issues if "agent_error" in i.signals]
    assert crash.severity_reason == "the agent crashed in all 3 trials"
    assert report.trials.flaky == 0 and report.trials.case_results[0].pass_hat_k == 0.0


async def test_a_run_without_repeats_has_no_trials_and_keeps_its_wording(store):
    report = await test_agent(store, "tests.agents:crashes_on_turn_2",
                              test_cases=[{"goal": "Ask about refunds. Then ask about shipping."}],
                              num_test_cases=0, model="offline", max_turns=3, workspace=ROOT)
    assert report.trials is None and "## Repeated trials" not in render_markdown(report)
    assert report.issues[0].severity_reason == "the agent crashed in 1 session"


async def test_mcp_simulate_get_run_and_test_agent_return_the_trials_compactly(store):
    async with Client(build_server(store)) as client:
        sim = (await client.call_tool("simulate_conversations", {
            "target": FLAKY_AGENT, "test_cases": _flaky_cases(), "repeats": 4, "max_turns": 2})).structured_content
        again = (await client.call_tool("get_run", {"run_id": sim["run_id"]})).structured_content
        tested = (await client.call_tool("test_agent", {
            "target": FLAKY_AGENT, "test_cases": _flaky_cases(), "num_test_cases": 0, "repeats": 4,
            "max_turns": 2})).structured_content
    for summary in (sim, again):
        assert summary["trials"]["flaky_cases"] == ["refund"]
        assert [c["pass_hat_k"] for c in summary["trials"]["case_results"]] == [0.0, 1.0]
    digest = tested["report"]
    assert digest["trials"]["flaky"] == 1 and [c["case_id"] for c in digest["trials"]["case_results"]] == ["refund"]
    assert digest["issues"][0]["severity_reason"] == "the agent crashed; intermittent: 2 of 4 trials"


async def test_polling_a_repeated_run_s_trials_reads_no_transcript(store, monkeypatch):
    """Each session's transcript_mark is stored as it ends; a database without marks is read the old way."""
    from engine.pipeline.simulation import run_summary

    summary = await simulate(store, FLAKY_AGENT, _flaky_cases(), model="offline", repeats=4, max_turns=3,
                             workspace=ROOT)
    expected = summary.trials.model_dump()
    assert expected["flaky_cases"] == ["refund"]

    def no_transcripts(*args, **kwargs):
        raise AssertionError("a poll read a transcript")
    with monkeypatch.context() as m:
        m.setattr(store, "_load_page", no_transcripts)
        m.setattr(store, "get_sessions_by_ids", no_transcripts)
        assert (await run_summary(store, summary.run_id)).trials.model_dump() == expected
    store._db.execute("UPDATE sessions SET trial_mark = NULL WHERE run_id = ?", (summary.run_id,))
    assert (await run_summary(store, summary.run_id)).trials.model_dump() == expected  # read from the transcripts
