"""The report of a test_agent run: one object, one page of Markdown, one small digest.

`build_report` assembles the `Report` (agent issues sorted, simulator issues
apart, a note when the offline heuristics did the work). `render_markdown`
writes it for a person who has a minute: the verdict first, then the numbers
(and, for a repeated run, pass^k and the flaky test cases), then each issue
with what it takes to act on it (cause, fix, evidence, a reproducing case),
then the harness's own problems, clearly separated, and finally what was
tested. `compact_result` is the digest a tool returns inline;
the full report stays a resource.

Everything rendered comes from the report, whose target and transcripts are
already redacted; nothing here adds data.
"""

from __future__ import annotations

import re
import time
from collections import Counter

from pydantic import BaseModel, Field

from ..models import (
    SEVERITY_ORDER,
    AgentProfile,
    Issue,
    IssueEvidence,
    Report,
    ScorerSummary,
    SessionSummary,
    StopReason,
    TestCase,
    TrialsSummary,
    UntestedSession,
    Usage,
)

OFFLINE_NOTE = (
    "offline heuristics, not a model: the simulated user, the judges and the issue grouping were deterministic "
    "rules. They catch obvious failures (crashes, refusals, a forgotten name) and miss subtle ones; configure a "
    "model (--model or CONVSIM_MODEL and its API key) for realistic users and judges."
)
MAX_EVIDENCE_SHOWN = 3
MAX_FLAKY_SHOWN = 10
QUOTE_CHARS = 160
GOAL_CHARS = 140


def build_report(*, run_id: str, target: str, started_at: float, finished_at: float, offline: bool,
                 models: dict[str, str], agent: AgentProfile | None, test_set_id: str | None,
                 test_cases: list[TestCase], sessions: list[SessionSummary], scores: list[ScorerSummary],
                 issues: list[Issue], usage: dict[str, Usage], untested: int = 0,
                 untested_sessions: list[UntestedSession] | None = None,
                 trials: TrialsSummary | None = None) -> Report:
    """A `Report` with agent issues most severe first and simulator issues kept apart."""
    from ..issues import sort_issues  # here, not at import: the MCP server imports this module at start

    return Report(
        run_id=run_id,
        created_at=finished_at,
        duration_s=round(max(finished_at - started_at, 0.0), 3),
        target=target,
        offline=offline,
        models=dict(models),
        agent=agent,
        test_set_id=test_set_id,
        test_cases=list(test_cases),
        sessions=list(sessions),
        scores=list(scores),
        issues=sort_issues([i for i in issues if i.source == "agent"]),
        simulator_issues=sort_issues([i for i in issues if i.source == "simulator"]),
        usage=dict(usage),
        untested=untested,
        untested_sessions=list(untested_sessions or []),
        note=_backend_note(models) if offline else None,
        simulator_sessions=len({sid for i in issues if i.source == "simulator" for sid in i.session_ids}
                               | {s.session_id for s in sessions if s.stop_reason == StopReason.SIMULATOR_ERROR}),
        trials=trials,
    )


ROLE_NAMES = {"simulated_user": "simulated user", "judge": "judge", "generator": "generator",
              "analyst": "issue grouping"}


def backends(models: dict[str, str]) -> dict[str, str]:
    """Per role, the model's name or "offline heuristics"."""
    return {role: "offline heuristics" if model == "offline" else model for role, model in models.items()}


def _backend_note(models: dict[str, str]) -> str:
    """All roles offline: the offline note. Some: which role ran on what, so no role is said to be offline wrongly."""
    if not models or all(m == "offline" for m in models.values()):
        return OFFLINE_NOTE
    said = "; ".join(f"{ROLE_NAMES.get(r, r)}: {b}" for r, b in backends(models).items())
    return f"Backends per role: {said}. The roles on offline heuristics follow deterministic rules, not a model."


def verdict(report: Report) -> str:
    """"3 issues: 2 high, 1 medium", or "no issues found"; first, how many sessions could not be tested; last,
    in a repeated run, how many test cases were flaky."""
    untested = ""
    if report.untested:
        untested = f"{report.untested} of {len(report.sessions)} sessions could not be tested; "
    if not report.issues:
        head = untested + ("no issues found in the rest" if untested else "no issues found")
    else:
        counts = Counter(i.severity for i in report.issues)
        parts = [f"{counts[s]} {s}" for s in sorted(counts, key=SEVERITY_ORDER.__getitem__)]
        head = untested + f"{len(report.issues)} issue{'s' if len(report.issues) != 1 else ''}: {', '.join(parts)}"
    n = len(report.simulator_issues)
    head += f" (+{n} simulator issue{'s' if n != 1 else ''})" if n else ""
    flaky = report.trials.flaky if report.trials else 0
    return head + (f"; {flaky} flaky test case{'s' if flaky != 1 else ''}" if flaky else "")


# --- Markdown -----------------------------------------------------------------------------------


def render_markdown(report: Report) -> str:
    """The report as plain Markdown (no HTML), readable in a minute."""
    parts = [_header(report), _numbers(report), _trials_section(report.trials), _issues_section(report)]
    if report.simulator_issues:
        parts.append(_simulator_section(report))
    if report.agent:
        parts.append(_agent_section(report.agent))
    if report.test_cases:
        parts.append(_cases_section(report.test_cases))
    return "\n\n".join(p for p in parts if p).rstrip() + "\n"


def _header(report: Report) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(report.created_at))
    lines = [f"# {_inline(report.target)}: {verdict(report)}", "",
             f"Run `{report.run_id}`, {when}."]
    if report.untested:
        lines += ["", f"**{report.untested} session(s) could not be tested** (the simulated user or a judge's model "
                      "failed, or the simulated user broke its role): they are neither passes nor agent issues. "
                      "Fix the model setup and run again."]
        lines += [f"- `{u.session_id}`: {_inline(u.reason, QUOTE_CHARS)}" for u in report.untested_sessions[:5]]
    if report.offline and (report.note or OFFLINE_NOTE) == OFFLINE_NOTE:
        lines.append(f"Produced by {OFFLINE_NOTE}")
    elif report.note:
        lines.append(report.note)
    code = [s.scorer for s in report.scores if s.judged_by == "code"]
    if code:
        lines.append(f"Code scorers (run as code, no model asked): {', '.join(_inline(c) for c in code)}.")
    if report.simulator_sessions:
        lines += ["", f"{report.simulator_sessions} session(s) could not test the agent because the simulated user "
                      "failed or broke its role; they are counted apart, never as agent issues."]
    return "\n".join(lines)


def _numbers(report: Report) -> str:
    sessions = report.sessions
    stops = Counter(s.stop_reason.value if s.stop_reason else "running" for s in sessions)
    lines = ["## Numbers", "",
             (f"- Sessions: {len(sessions)} from {len(report.test_cases)} test case(s), "
              f"{sum(s.turns for s in sessions)} turns, {_duration(report.duration_s)}")]
    if stops:
        lines.append("- Stopped: " + ", ".join(f"{k} {v}" for k, v in stops.most_common()))
    if report.models:
        lines.append("- Backends: " + ", ".join(f"{ROLE_NAMES.get(role, role)} {b}"
                                                for role, b in backends(report.models).items()))
    for role, u in report.usage.items():
        lines.append(f"- Usage, {role}: {_usage(u)}")
    if report.scores:
        lines += ["", "| scorer | pass rate | passed | failed | unscored |", "|---|---|---|---|---|"]
        lines += [f"| {_cell(s.scorer)}{JUDGED_BY_SUFFIX.get(s.judged_by, '')} | {_rate(s.pass_rate)} | {s.passed} "
                  f"| {s.failed} | {s.unscored} |" for s in report.scores]
    return "\n".join(lines)


# How a scorer judged, after its name in the scores table: a model's verdicts carry no mark.
JUDGED_BY_SUFFIX = {"offline": " (heuristic)", "code": " (code)"}


def _trials_section(trials: TrialsSummary | None) -> str:
    """pass^k in a small table and the flaky test cases: how reliably the agent passes, at a glance."""
    if trials is None:
        return ""
    left_out = (f" {trials.untested} trial(s) could not test the agent and are left out." if trials.untested else "")
    lines = ["## Repeated trials", "",
             f"Each of {trials.cases} test case(s) ran {trials.repeats} times; {trials.passed} of {trials.trials} "
             f"trials passed. A trial passes when the agent never crashed or went silent and every verdict on it "
             f"passed.{left_out} pass^k is the chance that k trials of a case all pass (C(c, k) / C(n, k) over its "
             "n trials, c passed), averaged over the cases.", "",
             "| k | pass^k | test cases |", "|---|---|---|"]
    shown = _shown_ks(trials.repeats)
    lines += [f"| {p.k} | {_rate(p.value)} | {p.cases} |" for p in trials.pass_hat if p.k in shown]
    flaky = [c for c in trials.case_results if c.flaky]
    always = sum(1 for c in trials.case_results if c.trials and c.passed == c.trials)
    never = sum(1 for c in trials.case_results if c.trials and c.passed == 0)
    lines += ["", f"Consistent: {always} case(s) passed every trial, {never} failed every trial."]
    if not trials.flaky:
        lines.append("No flaky test case: no case both passed and failed.")
        return "\n".join(lines)
    lines += ["", f"**{trials.flaky} flaky test case(s)** (some trials passed, some failed):"]
    for c in flaky[:MAX_FLAKY_SHOWN]:
        label = c.case_id or (f"#{c.case_index + 1}" if c.case_index is not None else "?")
        where = ", ".join(f"`{sid}`" for sid in c.failed_sessions[:MAX_EVIDENCE_SHOWN])
        lines.append(f"- {_inline(label, GOAL_CHARS)}: passed {c.passed} of {c.trials} trials (pass^{trials.repeats} "
                     f"{_rate(c.pass_hat_k)}); failed in {where}")
    if trials.flaky > len(flaky[:MAX_FLAKY_SHOWN]):
        lines.append(f"- and {trials.flaky - len(flaky[:MAX_FLAKY_SHOWN])} more (see the report's trials)")
    return "\n".join(lines)


def _shown_ks(k: int) -> set[int]:
    """Every k up to 5; beyond, a few milestones and k itself (a 50-row table is not read)."""
    return set(range(1, k + 1)) if k <= 5 else {j for j in (1, 2, 3, 5, 10, 20) if j < k} | {k}


def _issues_section(report: Report) -> str:
    if not report.issues:
        scored = "no scorer failed and " if report.scores else ""
        return f"## Issues\n\nNo issues found: {scored}no session crashed or returned an empty reply."
    return "## Issues\n\n" + "\n\n".join(_issue_block(i) for i in report.issues)


def _simulator_section(report: Report) -> str:
    intro = ("These are problems of the test harness (the simulated user), not of the agent: the affected "
             "sessions did not test what they were meant to. Fix the simulator setup and re-run them.")
    return "## Simulator issues (test harness, not the agent)\n\n" + intro + "\n\n" + \
        "\n\n".join(_issue_block(i) for i in report.simulator_issues)


def _issue_block(issue: Issue) -> str:
    lines = [f"### [{issue.severity.upper()}] {issue.id}: {_inline(issue.title)}", "",
             f"Why {issue.severity}: {_inline(issue.severity_reason)}", "",
             f"- Category: {issue.category}; frequency: {issue.frequency}; signals: {', '.join(issue.signals)}"
             + (f"; also seen: {', '.join(issue.also_seen)}" if issue.also_seen else ""),
             f"- What happens: {_inline(issue.description)}"]
    if issue.suspected_cause:
        lines.append(f"- Suspected cause: {_inline(issue.suspected_cause)}")
    if issue.suggested_fix:
        lines.append(f"- Suggested fix: {_inline(issue.suggested_fix)}")
    if issue.evidence:
        lines.append("- Evidence:")
        lines += [f"  - {_evidence(e)}" for e in issue.evidence[:MAX_EVIDENCE_SHOWN]]
    if issue.reproduction:
        repro = issue.reproduction
        shrunk = (f" It was shrunk from {issue.reproduction_shrunk_from} to {len(repro.scripted_turns)} user turns."
                  if issue.reproduction_shrunk_from else "")
        lines += ["", f"Reproduce with this test case (`{repro.id}`):{shrunk}", "", _reproduction(repro)]
    return "\n".join(lines)


def _evidence(e: IssueEvidence) -> str:
    where = f"`{e.session_id}`" + (f", turn {e.turn}" if e.turn is not None else "")
    by = f" ({e.scorer})" if e.scorer else ""
    quote = _inline(e.quote, QUOTE_CHARS)
    return f"{where}{by}: \"{quote}\"" if quote else f"{where}{by}"


def _reproduction(case: TestCase) -> str:
    data: dict = {"goal": case.goal}
    if case.context:
        data["context"] = case.context
    data["scripted_turns"] = list(case.scripted_turns)
    import yaml  # here, not at import: the MCP server imports this module at start

    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=100, default_flow_style=False).rstrip()
    fence = "`" * max(3, _longest_backtick_run(text) + 1)  # a quoted ``` cannot close the block
    return f"{fence}yaml\n{text}\n{fence}"


def _agent_section(agent: AgentProfile) -> str:
    lines = ["## The agent", ""]
    if agent.name:
        lines.append(f"**{_inline(agent.name)}**")
    if agent.description:
        lines.append(_inline(agent.description, 600))
    if agent.capabilities:
        lines += ["", "Capabilities:"] + [f"- {_inline(c)}" for c in agent.capabilities]
    return "\n".join(lines)


def _cases_section(cases: list[TestCase]) -> str:
    lines = ["## Test cases", ""]
    lines += [f"- {case.id or f'#{i}'}: {_inline(case.goal, GOAL_CHARS)}" for i, case in enumerate(cases, 1)]
    return "\n".join(lines)


# --- the digest a tool returns ------------------------------------------------------------------


DIGEST_EVIDENCE = 3


class ReproDigest(BaseModel):
    """A reproducing case in a few fields: run it with simulate_conversations (the report has the full case)."""

    id: str | None = None
    goal: str
    scripted_turns: list[str] = Field(default_factory=list)
    shrunk_from: int | None = Field(None, description="Scripted user turns before the repro was shrunk, if it was.")


class IssueDigest(BaseModel):
    """One issue in a line or two; the full issue is in the report resource."""

    id: str
    severity: str
    category: str
    title: str
    frequency: str = Field(description="'k of n sessions'.")
    severity_reason: str = ""
    evidence: IssueEvidence | None = Field(None, description="The first piece of evidence.")
    suggested_fix: str = ""
    source: str = "agent"
    signature: str = Field("", description="The root cause the issue stands for; re-runs match on it.")
    also_seen: list[str] = Field(default_factory=list, description="Other signals this issue's cause explains.")
    evidence_items: list[IssueEvidence] = Field(default_factory=list, description="Up to three (session, turn, quote).")
    reproduction: ReproDigest | None = Field(None, description="The reproducing case, compact.")


class ReportDigest(BaseModel):
    """What a tool returns inline about a report: counts, issues, pass rates, usage, and where the rest is."""

    run_id: str
    target: str
    verdict: str = Field(description="e.g. '3 issues: 2 high, 1 medium'.")
    offline: bool
    sessions: int
    untested: int = Field(0, description="Sessions that could not test the agent (a model failed); not passes.")
    untested_sessions: list[UntestedSession] = Field(default_factory=list)
    turns: int
    stop_reasons: dict[str, int] = Field(default_factory=dict)
    issues: list[IssueDigest] = Field(default_factory=list, description="Agent issues, most severe first.")
    simulator_issues: list[IssueDigest] = Field(default_factory=list)
    pass_rates: dict[str, float | None] = Field(default_factory=dict, description="Per scorer; None: nothing scored.")
    usage: Usage = Field(default_factory=Usage, description="Total over all roles.")
    usage_by_role: dict[str, Usage] = Field(default_factory=dict)
    resources: dict[str, str] = Field(default_factory=dict, description="URIs of the full report, transcripts, ...")
    test_set_id: str | None = Field(None, description="The cases run; pass it to simulate_conversations.")
    duration_s: float = 0.0
    note: str | None = None
    trials: TrialsSummary | None = Field(None, description="With repeats > 1: pass^1..pass^k, the flaky test cases "
                                                           "(case_results: the first 10 of them); every case is in "
                                                           "the report.")


def compact_result(report: Report, *, resources: dict[str, str]) -> ReportDigest:
    """The small, schema'd summary of `report` for a tool result."""
    total = Usage()
    for u in report.usage.values():
        total = total.add(u)
    return ReportDigest(
        run_id=report.run_id,
        target=report.target,
        verdict=verdict(report),
        offline=report.offline,
        sessions=len(report.sessions),
        untested=report.untested,
        untested_sessions=report.untested_sessions[:5],
        turns=sum(s.turns for s in report.sessions),
        stop_reasons=dict(Counter(s.stop_reason.value for s in report.sessions if s.stop_reason)),
        issues=[_digest(i) for i in report.issues],
        simulator_issues=[_digest(i) for i in report.simulator_issues],
        pass_rates={s.scorer: s.pass_rate for s in report.scores},
        usage=total,
        usage_by_role=dict(report.usage),
        resources=dict(resources),
        test_set_id=report.test_set_id,
        duration_s=round(report.duration_s, 2),
        note=report.note,
        trials=report.trials.model_copy(update={"case_results": [c for c in report.trials.case_results
                                                                 if c.flaky][:MAX_FLAKY_SHOWN]})
        if report.trials else None,
    )


def _digest(issue: Issue) -> IssueDigest:
    return IssueDigest(id=issue.id, severity=issue.severity, category=issue.category, title=issue.title,
                       frequency=issue.frequency, severity_reason=issue.severity_reason,
                       evidence=issue.evidence[0] if issue.evidence else None,
                       suggested_fix=issue.suggested_fix, source=issue.source, signature=issue.signature,
                       also_seen=list(issue.also_seen), evidence_items=issue.evidence[:DIGEST_EVIDENCE],
                       reproduction=ReproDigest(id=r.id, goal=r.goal, scripted_turns=list(r.scripted_turns),
                                                 shrunk_from=issue.reproduction_shrunk_from)
                       if (r := issue.reproduction) else None)


# --- formatting helpers -------------------------------------------------------------------------


def _inline(text: str | None, limit: int = 400) -> str:
    """One line, clipped: quotes and model-written text never break the page's structure."""
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _cell(text: str) -> str:
    return _inline(text).replace("|", "\\|")


def _rate(rate: float | None) -> str:
    return "n/a" if rate is None else f"{rate:.0%}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s"


def _usage(u: Usage) -> str:
    text = f"{u.calls} call{'s' if u.calls != 1 else ''}"
    if u.cache_hits:
        text += f" (+{u.cache_hits} answered from the cache)"
    tokens = u.prompt_tokens + u.completion_tokens
    if tokens:
        text += f", {tokens:,} tokens ({u.prompt_tokens:,} in, {u.completion_tokens:,} out)"
    if u.cost_usd:
        text += f", ${u.cost_usd:.4f}"
    if u.cost_unknown_calls:
        text += f" ({u.cost_unknown_calls} without a known price)"
    if u.failed_calls:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(u.failures.items()))
        text += f"; {u.failed_calls} failed ({kinds})" if kinds else f"; {u.failed_calls} failed"
    return text


def _longest_backtick_run(text: str) -> int:
    return max((len(m) for m in re.findall(r"`+", text)), default=0)
