"""The fix loop tells the truth: reproduces, fixed or inconclusive, with a reason; new failures are new issues;
reproducing cases are shrunk to the turns the failure needs."""

from __future__ import annotations

import pytest

from engine import Workspace
from engine.issues import collect_failures
from engine.models import Issue, IssueEvidence, Message, Session, StopReason
from engine.pipeline.agent_test import test_agent
from engine.pipeline.rerun import CLEAN_RUNS_FOR_INTERMITTENT, _check, rerun_issues
from tests.conftest import ROOT

pytestmark = pytest.mark.anyio

AGENT = "examples/support_agent.py:support_agent"
SEEDS = str(ROOT / "examples" / "support_cases.yaml")

CRASHES_AT_TURN_2 = '''
def respond(messages, session_id=None, **context):
    users = [m for m in messages if m["role"] == "user"]
    if len(users) >= 2:
        raise RuntimeError(f"session {session_id} ran out of slots at message {len(users)}")
    return "Hello! I can help with orders, returns, shipping, cancellations and accounts."
'''


async def seeded_run(store):
    return await test_agent(store, AGENT, test_cases=SEEDS, num_test_cases=0, model="offline", workspace=ROOT,
                            max_turns=6)


async def test_every_issue_of_an_unchanged_agent_reproduces(store):
    report = await seeded_run(store)
    assert report.issues
    for issue in report.issues:
        outcome = await rerun_issues(store, report.run_id, issue_id=issue.id, workspace=ROOT)
        assert [c.status for c in outcome.issues] == ["reproduces"], (issue.title, outcome.issues[0].reason)
        assert outcome.new_issues == []


async def test_a_different_earlier_crash_is_inconclusive_and_a_new_issue(store, tmp_path):
    report = await seeded_run(store)
    (tmp_path / "early_crash.py").write_text(CRASHES_AT_TURN_2)
    outcome = await rerun_issues(store, report.run_id, target=str(tmp_path / "early_crash.py") + ":respond",
                                 workspace=Workspace.default([tmp_path], base=ROOT))
    statuses = {c.id: c for c in outcome.issues}
    assert all(c.status == "inconclusive" for c in statuses.values()), [(c.title, c.status) for c in outcome.issues]
    crash = next(i for i in report.issues if i.signals[0] == "agent_error")
    assert "another failure came first" in statuses[crash.id].reason and "RuntimeError" in statuses[crash.id].reason
    memory = next(i for i in report.issues if i.category == "memory")
    assert "RuntimeError" in statuses[memory.id].reason  # the name question was never reached
    [new] = [i for i in outcome.new_issues if i.signals[0] == "agent_error"]
    assert new.signature.startswith("agent_error|RuntimeError|") and new.reproduction is not None
    assert new.evidence and new.evidence[0].turn == 2
    assert "2nd user message" in new.title  # every session crashed at the 2nd message, whatever it said


def _session(sid: str, turns: int, *, stop=StopReason.MAX_TURNS) -> Session:
    messages = []
    for t in range(1, turns + 1):
        messages += [Message(role="user", content=f"question {t}", turn=t),
                     Message(role="assistant", content=f"answer {t}", turn=t)]
    return Session(id=sid, run_id="r", case_index=0, messages=messages, stop_reason=stop)


def _intermittent_issue() -> Issue:
    return Issue(id="ISS-1", title="Forgets", description="", severity="medium", severity_reason="", category="memory",
                 affected_sessions=1, total_sessions=4, signature="knowledge_retention:forgot",
                 evidence=[IssueEvidence(session_id="old", turn=3, quote="")])


def test_an_intermittent_issue_needs_three_clean_reruns_to_be_fixed():
    issue = _intermittent_issue()
    turn = {("ISS-1", 0): 3}
    one = _check(issue, [_session("a", 4)], [], turn)
    assert one.status == "inconclusive" and f"{CLEAN_RUNS_FOR_INTERMITTENT} clean re-runs are needed" in one.reason
    three = _check(issue, [_session(s, 4) for s in "abc"], [], turn)
    assert three.status == "fixed"


def test_a_session_that_ended_before_the_failing_turn_is_not_fixed():
    issue = _intermittent_issue().model_copy(update={"affected_sessions": 4})
    short = _check(issue, [_session("a", 2, stop=StopReason.USER_ENDED)], [], {("ISS-1", 0): 3})
    assert short.status == "inconclusive" and "before turn 3" in short.reason
    spoiled = _check(issue, [_session("b", 1, stop=StopReason.SIMULATOR_ERROR)], [], {("ISS-1", 0): 3})
    assert spoiled.status == "inconclusive" and "simulated user failed" in spoiled.reason
    # a session whose simulated user broke role reached the turn, but proves nothing
    broke_role = _check(issue, [_session("c", 4)], [], {("ISS-1", 0): 3}, spoiled={"c"})
    assert broke_role.status == "inconclusive" and "simulated user failed" in broke_role.reason


def test_the_same_signature_at_any_turn_reproduces():
    issue = _intermittent_issue()
    session = _session("a", 4)
    failures = collect_failures([session], [])
    assert _check(issue, [session], failures, {("ISS-1", 0): 3}).status in {"fixed", "inconclusive"}
    crashed = session.model_copy(deep=True)
    crashed.messages[-1] = Message(role="assistant", content=None, turn=4, error="KeyError: 'x'")
    crashed.stop_reason = StopReason.AGENT_ERROR
    crash_issue = issue.model_copy(update={"signature": collect_failures([crashed], [])[0].signature,
                                           "affected_sessions": 4})
    result = _check(crash_issue, [crashed], collect_failures([crashed], []), {("ISS-1", 0): 4})
    assert result.status == "reproduces" and "at turn 4" in result.reason


async def test_offline_reproductions_are_shrunk_to_the_turns_the_failure_needs(store):
    report = await seeded_run(store)
    crash = next(i for i in report.issues if i.signals[0] == "agent_error")
    assert crash.reproduction_shrunk_from and len(crash.reproduction.scripted_turns) < crash.reproduction_shrunk_from
    assert "gift card" in " ".join(crash.reproduction.scripted_turns).lower()
    _, markdown = await store.get_report(report.run_id)
    assert f"shrunk from {crash.reproduction_shrunk_from} to {len(crash.reproduction.scripted_turns)}" in markdown
    outcome = await rerun_issues(store, report.run_id, issue_id=crash.id, workspace=ROOT)
    assert outcome.issues[0].status == "reproduces"  # the shrunk case still fails the same way


async def test_a_turn_count_crash_is_not_shrunk_below_its_turn(store, tmp_path):
    (tmp_path / "third.py").write_text(
        "def respond(messages, **context):\n"
        "    if sum(m['role'] == 'user' for m in messages) == 3:\n"
        "        raise IndexError('list assignment index out of range')\n"
        "    return 'Sure, tell me more about it.'\n")
    cases = [{"goal": f"Ask about topic {c}.", "scripted_turns": [f"Question {t} about {topic}?" for t in range(1, 5)]}
             for c, topic in enumerate(["refunds", "shipping", "accounts"])]
    report = await test_agent(store, str(tmp_path / "third.py") + ":respond", test_cases=cases, num_test_cases=0,
                              model="offline", workspace=Workspace.default([tmp_path], base=ROOT), max_turns=5)
    crash = next(i for i in report.issues if i.signals[0] == "agent_error")
    assert crash.affected_sessions >= 2, crash.frequency
    assert "3rd user message" in crash.title
    assert len(crash.reproduction.scripted_turns) == 3 and crash.reproduction_shrunk_from is None


async def test_a_python_crash_points_at_the_agents_own_line(store):
    report = await seeded_run(store)
    crash = next(i for i in report.issues if i.signals[0] == "agent_error")
    assert "raised at examples/support_agent.py:" in crash.suspected_cause
    assert "engine/" not in crash.suspected_cause and "site-packages" not in crash.suspected_cause


async def test_shrink_can_be_turned_off(store):
    report = await test_agent(store, AGENT, test_cases=SEEDS, num_test_cases=0, model="offline", workspace=ROOT,
                              max_turns=6, shrink=False)
    assert all(i.reproduction_shrunk_from is None for i in report.issues)


async def test_rerun_repeats_out_of_range_is_a_clear_error(store):
    report = await seeded_run(store)
    with pytest.raises(Exception, match="repeats"):
        await rerun_issues(store, report.run_id, repeats=0, workspace=ROOT)
    with pytest.raises(Exception, match="repeats"):
        await rerun_issues(store, report.run_id, repeats=10**6, workspace=ROOT)
