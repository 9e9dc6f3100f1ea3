"""The report: assembly, the one-minute Markdown page, and the digest a tool returns."""

from __future__ import annotations

import pytest

from engine import ScorerSummary, SessionSummary, StopReason, TestCase, Usage
from engine.models import AgentProfile, Issue, IssueEvidence
from engine.reports.markdown import OFFLINE_NOTE, ReportDigest, build_report, compact_result, render_markdown, verdict

CASES = [TestCase(id="remember-name", goal="Tell it your name, then ask whether it remembers it."),
         TestCase(id="gift-card-refund", goal="Get a refund of order A1234 to a gift card.")]


def issue(iid: str, severity: str, title: str, *, affected: int = 1, source: str = "agent",
          quote: str = "What's your name?", turns: tuple[str, ...] = ("I'm Dana.", "Do you remember me?")) -> Issue:
    return Issue(
        id=iid, title=title, description=f"{title}, in detail.", severity=severity,
        severity_reason=f"why it is {severity}", category="memory", affected_sessions=affected, total_sessions=4,
        evidence=[IssueEvidence(session_id=f"sim-{iid}-{n}", turn=n + 2, quote=f"{quote} #{n}",
                                scorer="knowledge_retention") for n in range(4)],
        suspected_cause=f"cause of {title}", suggested_fix=f"fix for {title}",
        reproduction=TestCase(id=f"{iid}-repro", goal="Tell it your name.", scripted_turns=list(turns)),
        source=source, signals=["knowledge_retention"], session_ids=[f"sim-{iid}-0"],
    )


def sessions() -> list[SessionSummary]:
    reasons = [StopReason.GOAL_ACHIEVED, StopReason.AGENT_ERROR, StopReason.USER_ENDED, StopReason.GOAL_ACHIEVED]
    return [SessionSummary(session_id=f"sim-{i}", case_index=i % 2, goal="g", stop_reason=r, turns=3,
                           resource=f"convsim://runs/run-1/sessions/sim-{i}") for i, r in enumerate(reasons)]


def scores() -> list[ScorerSummary]:
    return [ScorerSummary(scorer="goal_achievement", sessions=4, passed=2, failed=2, unscored=0, pass_rate=0.5,
                          heuristic=True),
            ScorerSummary(scorer="knowledge_retention", sessions=4, passed=0, failed=0, unscored=4, pass_rate=None)]


def report(issues: list[Issue], *, offline: bool = True, agent: AgentProfile | None = None):
    return build_report(
        run_id="run-1", target="examples.support_agent:support_agent", started_at=1_700_000_000.0,
        finished_at=1_700_000_042.5, offline=offline, models={"simulated_user": "offline", "judge": "offline"},
        agent=agent, test_set_id="set-1", test_cases=CASES, sessions=sessions(), scores=scores(), issues=issues,
        usage={"simulated_user": Usage(calls=12), "judge": Usage(calls=3, prompt_tokens=1000, completion_tokens=200,
                                                                 cost_usd=0.0123)},
    )


THREE = [issue("ISS-00000003", "medium", "Forgets facts the user gave earlier", affected=2),
         issue("ISS-00000001", "high", "Crashes on gift cards: KeyError 'gift_card'", affected=2),
         issue("ISS-00000002", "high", "Refuses or ignores requests it should handle", affected=3)]


def test_build_report_sorts_agent_issues_and_keeps_simulator_issues_apart():
    sim = issue("ISS-0000000s", "low", "The simulated user failed", source="simulator")
    r = report([*THREE, sim])
    assert [i.id for i in r.issues] == ["ISS-00000002", "ISS-00000001", "ISS-00000003"]
    assert [i.id for i in r.simulator_issues] == ["ISS-0000000s"]
    assert (r.duration_s, r.created_at, r.test_set_id) == (42.5, 1_700_000_042.5, "set-1")


@pytest.mark.parametrize("offline, note", [pytest.param(True, OFFLINE_NOTE, id="offline"),
                                           pytest.param(False, None, id="model")])
def test_an_offline_report_says_heuristics_not_a_model_produced_it(offline, note):
    r = report(THREE, offline=offline)
    assert r.note == note
    assert ("offline heuristics, not a model" in render_markdown(r)) is offline


def test_markdown_opens_with_the_target_and_the_verdict():
    md = render_markdown(report(THREE))
    assert md.splitlines()[0] == "# examples.support_agent:support_agent: 3 issues: 2 high, 1 medium"


def test_markdown_numbers_block_has_sessions_stop_reasons_pass_rates_and_usage():
    md = render_markdown(report(THREE))
    assert "- Sessions: 4 from 2 test case(s), 12 turns, 42.5 s" in md
    assert "- Stopped: goal_achieved 2, agent_error 1, user_ended 1" in md
    assert "| goal_achievement (heuristic) | 50% | 2 | 2 | 0 |" in md
    assert "| knowledge_retention | n/a | 0 | 0 | 4 |" in md
    assert "- Usage, judge: 3 calls, 1,200 tokens (1,000 in, 200 out), $0.0123" in md
    assert "- Usage, simulated_user: 12 calls" in md


def test_each_issue_shows_severity_title_reason_frequency_cause_fix_evidence_and_reproduction():
    md = render_markdown(report(THREE))
    heads = [line for line in md.splitlines() if line.startswith("### ")]
    assert heads == ["### [HIGH] ISS-00000002: Refuses or ignores requests it should handle",
                     "### [HIGH] ISS-00000001: Crashes on gift cards: KeyError 'gift_card'",
                     "### [MEDIUM] ISS-00000003: Forgets facts the user gave earlier"]
    block = md.split("### [MEDIUM]")[1]
    assert "Why medium: why it is medium" in block
    assert "frequency: 2 of 4 sessions" in block and "Category: memory" in block
    assert "Suspected cause: cause of Forgets" in block and "Suggested fix: fix for Forgets" in block
    assert '- `sim-ISS-00000003-0`, turn 2 (knowledge_retention): "What\'s your name? #0"' in block
    assert "#2" in block and "#3" not in block  # at most three evidence bullets
    assert "```yaml\ngoal: Tell it your name.\nscripted_turns:\n- I'm Dana.\n- Do you remember me?\n```" in block


def test_a_report_without_issues_says_so_plainly():
    md = render_markdown(report([]))
    assert md.splitlines()[0].endswith(": no issues found")
    assert "No issues found" in md and "### [" not in md


@pytest.mark.parametrize("simulator_issues, shown", [pytest.param([], False, id="none"),
                                                     pytest.param(["sim"], True, id="some")])
def test_the_simulator_section_appears_only_with_simulator_issues(simulator_issues, shown):
    extra = [issue("ISS-0000000s", "low", "The simulated user wrote as the assistant", source="simulator")
             for _ in simulator_issues]
    md = render_markdown(report([THREE[0], *extra]))
    assert ("## Simulator issues (test harness, not the agent)" in md) is shown
    assert ("(+1 simulator issue)" in md.splitlines()[0]) is shown
    if shown:
        agent_part, simulator_part = md.split("## Simulator issues")
        assert "wrote as the assistant" in simulator_part and "wrote as the assistant" not in agent_part
        assert "not of the agent" in simulator_part


def test_the_agent_profile_and_the_test_cases_close_the_report():
    agent = AgentProfile(name="Acme support", description="Answers Acme Outfitters customers.",
                         capabilities=["order status", "returns"])
    md = render_markdown(report(THREE, agent=agent))
    assert "Answers Acme Outfitters customers." in md and "- order status\n- returns" in md
    assert "- remember-name: Tell it your name, then ask whether it remembers it." in md
    assert md.index("## The agent") > md.index("## Issues") and md.index("## Test cases") > md.index("## The agent")


@pytest.mark.parametrize(
    "quote, turns, check",
    [
        pytest.param("line one\n\nline two", ("hi",), lambda md: '"line one line two #0"' in md, id="multiline-quote"),
        pytest.param("q", ("Here: ```rm -rf``` done",), lambda md: "````yaml\n" in md and md.count("````") == 2,
                     id="backticks-in-a-scripted-turn"),
        pytest.param("x" * 500, ("hi",), lambda md: "x" * 157 + "..." in md and "x" * 200 not in md, id="long-quote"),
    ],
)
def test_user_text_cannot_break_the_page(quote, turns, check):
    md = render_markdown(report([issue("ISS-00000001", "high", "Odd text", quote=quote, turns=turns)]))
    assert check(md)
    assert "<" not in md  # no HTML


def test_compact_result_is_a_small_digest_with_links():
    sim = issue("ISS-0000000s", "low", "The simulated user failed", source="simulator")
    digest = compact_result(report([*THREE, sim]), resources={"report": "convsim://runs/run-1/report"})
    assert isinstance(digest, ReportDigest)
    assert digest.verdict == "3 issues: 2 high, 1 medium (+1 simulator issue)"
    assert (digest.sessions, digest.turns, digest.stop_reasons["agent_error"]) == (4, 12, 1)
    first = digest.issues[0]
    assert (first.id, first.severity, first.frequency) == ("ISS-00000002", "high", "3 of 4 sessions")
    assert first.evidence.quote == "What's your name? #0" and first.suggested_fix.startswith("fix for")
    assert [i.id for i in digest.simulator_issues] == ["ISS-0000000s"]
    assert digest.pass_rates == {"goal_achievement": 0.5, "knowledge_retention": None}
    assert (digest.usage.calls, digest.usage.cost_usd) == (15, 0.0123)
    assert digest.resources == {"report": "convsim://runs/run-1/report"}


def test_verdict_counts_one_issue_in_the_singular():
    assert verdict(report(THREE[:1])) == "1 issue: 1 medium"


def test_the_header_names_each_roles_backend_when_only_some_are_offline():
    r = build_report(
        run_id="run-1", target="t", started_at=0.0, finished_at=1.0, offline=True,
        models={"simulated_user": "openai/gpt-4o-mini", "judge": "offline", "generator": "offline"},
        agent=None, test_set_id=None, test_cases=CASES, sessions=sessions(), scores=scores(), issues=[], usage={})
    page = render_markdown(r)
    assert "offline heuristics, not a model: the simulated user" not in page  # not every role was offline
    assert "simulated user: openai/gpt-4o-mini; judge: offline heuristics; generator: offline heuristics" in page
    assert "- Backends: simulated user openai/gpt-4o-mini, judge offline heuristics" in page


def test_simulator_sessions_are_counted_apart_and_shown():
    sim = issue("ISS-0000000s", "low", "The simulated user failed", source="simulator")
    r = report([*THREE, sim])
    assert r.simulator_sessions == 1 and len(r.issues) == 3
    assert "1 session(s) could not test the agent" in render_markdown(r)
    assert report(THREE).simulator_sessions == 0


def test_the_digest_carries_each_issues_repro_and_three_evidence_items():
    digest = compact_result(report(THREE), resources={})
    first = digest.issues[0]
    assert first.reproduction.model_dump() == {"id": "ISS-00000002-repro", "goal": "Tell it your name.",
                                               "scripted_turns": ["I'm Dana.", "Do you remember me?"],
                                               "shrunk_from": None}
    assert [(e.session_id, e.turn) for e in first.evidence_items] == [
        ("sim-ISS-00000002-0", 2), ("sim-ISS-00000002-1", 3), ("sim-ISS-00000002-2", 4)]
