"""Compare two runs of the same test cases: did the candidate version of the agent get better or worse?

    compare_runs(store, base, candidate) -> Comparison

Sessions are paired by test case id (its index when it has none) and repeat index. A pair is left out
when either session could not test the agent (`issues.untestable_sessions`: the simulated user failed or
broke its role) or never finished; such sessions are counted, never passed. Per scorer, and for
"overall" (no agent failure of any kind in the session), the pairs both runs scored give the pass rates,
the exact McNemar p-value and a bootstrap interval (`reports.comparison_stats`). Issues are matched by
signature: a test_agent run's stored issues, or for a run without a report, the issues its failures
give offline. The comparison is a regression when a pass rate fell with p < 0.05 or a new high-severity
agent issue appeared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidOption, NotFound
from ..ids import check_run_id
from ..issues import Failure, collect_failures, discover_issues, issue_signatures, untestable_sessions
from ..issues.failures import HARNESS_SIGNALS
from ..llm import resolve_llm
from ..models import Assessment, Issue, RunStatus, Session, Usage
from ..reports.comparison import (
    OVERALL,
    Changes,
    Comparison,
    FlippedCase,
    Flipped,
    IssueChange,
    IssueChanges,
    RunFacts,
    ScorerChange,
    method_note,
    render_comparison,
)
from ..reports.comparison_stats import ALPHA, DEFAULT_SEED, compare_pairs, percentile
from ..store import Store
from .simulation import describe_target


PairKey = tuple[str, int]


def compare_uri(base: str, candidate: str) -> str:
    return f"convsim://compare/{base}/{candidate}"



@dataclass
class _Side:
    """One run, read once: its sessions' verdicts per scorer, its issues and its numbers."""

    run: dict[str, Any]
    sessions: list[Session]
    untested: set[str]
    verdicts: dict[str, dict[str, bool | None]]  # session id -> scorer -> passed (None: unscored)
    failed: dict[str, list[str]]  # session id -> the agent failures' signals
    issues: list[Issue]
    issues_from: str
    usage: dict[str, Usage]
    scorers: list[str] = field(default_factory=list)

    def by_pair(self) -> dict[PairKey, Session]:
        out: dict[PairKey, Session] = {}
        for s in self.sessions:
            key = _pair_key(s)
            if key is not None:
                out.setdefault(key, s)
        return out


async def compare_runs(store: Store, base: str, candidate: str, *, seed: int = DEFAULT_SEED) -> Comparison:
    """Compare run `candidate` with run `base` (see the module docstring).

    Raises InvalidOption for a malformed id, the same run twice or a run still running, and NotFound for an
    unknown run. The result is deterministic: the same two runs and seed give the same comparison.
    """
    check_run_id(base, "base")
    check_run_id(candidate, "candidate")
    if base == candidate:
        raise InvalidOption(f"base and candidate are the same run ('{base}'); compare two different runs")
    b = await _load(store, base, "base")
    c = await _load(store, candidate, "candidate")

    b_pairs, c_pairs = b.by_pair(), c.by_pair()
    shared = [k for k in b_pairs if k in c_pairs]
    tested = [k for k in shared if b_pairs[k].id not in b.untested and c_pairs[k].id not in c.untested]
    left_out = {"untested": len(shared) - len(tested), "only_in_base": len(b_pairs) - len(shared),
                "only_in_candidate": len(c_pairs) - len(shared)}

    scorers = []
    for name in [OVERALL] + list(dict.fromkeys(b.scorers + c.scorers)):
        pairs = [(vb, vc) for k in tested
                 if (vb := b.verdicts[b_pairs[k].id].get(name)) is not None
                 and (vc := c.verdicts[c_pairs[k].id].get(name)) is not None]
        r = compare_pairs(pairs, seed=seed)
        scorers.append(ScorerChange(scorer=name, base_pass_rate=r.base_pass_rate,
                                    candidate_pass_rate=r.candidate_pass_rate, delta=r.delta, p_value=r.p_value,
                                    interval=list(r.interval) if r.interval else None, pairs=r.pairs,
                                    passed_only_in_base=r.base_only, passed_only_in_candidate=r.candidate_only,
                                    verdict=r.verdict))

    flipped = Flipped()
    for k in tested:
        sb, sc = b_pairs[k], c_pairs[k]
        vb, vc = b.verdicts[sb.id].get(OVERALL), c.verdicts[sc.id].get(OVERALL)
        if vb is True and vc is False:
            flipped.pass_to_fail.append(FlippedCase(case_id=k[0], repeat=k[1], base_session=sb.id,
                                                    candidate_session=sc.id, failed=c.failed.get(sc.id, [])))
        elif vb is False and vc is True:
            flipped.fail_to_pass.append(FlippedCase(case_id=k[0], repeat=k[1], base_session=sb.id,
                                                    candidate_session=sc.id, failed=b.failed.get(sb.id, [])))

    issues = _issue_changes(b.issues, c.issues)
    reasons = [f"{s.scorer}: pass rate fell {_pct(s.base_pass_rate)} -> {_pct(s.candidate_pass_rate)} "
               f"(p = {s.p_value:.3g} < {ALPHA}, {s.pairs} pairs)" for s in scorers if s.verdict == "worse"]
    reasons += [f"new high issue {i.id}: {i.title} ({i.candidate_sessions} session(s))"
                for i in issues.new if i.severity == "high"]
    improvements = [f"{s.scorer}: pass rate rose {_pct(s.base_pass_rate)} -> {_pct(s.candidate_pass_rate)} "
                    f"(p = {s.p_value:.3g}, {s.pairs} pairs)" for s in scorers if s.verdict == "better"]
    improvements += [f"fixed {i.severity} issue {i.id}: {i.title} (was in {i.base_sessions} session(s))"
                     for i in issues.fixed]

    fb, fc = _facts(b, base), _facts(c, candidate)
    changes = Changes(
        cost_usd=round(fc.cost_usd - fb.cost_usd, 8), tokens=fc.tokens - fb.tokens, calls=fc.calls - fb.calls,
        latency_p50_ms=_diff(fc.latency_p50_ms, fb.latency_p50_ms),
        latency_p95_ms=_diff(fc.latency_p95_ms, fb.latency_p95_ms),
        stop_reasons={r: d for r in sorted(set(fb.stop_reasons) | set(fc.stop_reasons))
                      if (d := fc.stop_reasons.get(r, 0) - fb.stop_reasons.get(r, 0))})
    return Comparison(base=base, candidate=candidate, scorers=scorers, flipped=flipped, issues=issues,
                      regression=bool(reasons), regression_reasons=reasons, improvements=improvements,
                      pairs=len(tested), left_out=left_out, runs={"base": fb, "candidate": fc}, changes=changes,
                      method=method_note(seed), seed=seed)


def comparison_markdown(comparison: Comparison) -> str:
    """The comparison as a Markdown page (what got better, what got worse, how sure we are)."""
    return render_comparison(comparison)


async def _load(store: Store, run_id: str, name: str) -> _Side:
    try:
        run = await store.get_run(run_id)
    except NotFound:
        raise NotFound(f"{name}: no run with id '{run_id}'; call list_runs (or `convsim-mcp runs list`) to see the "
                       "runs there are") from None
    if run["status"] == RunStatus.RUNNING.value:
        raise InvalidOption(f"{name} run '{run_id}' is still running; wait until it finishes (get_run) and compare "
                            "then")
    sessions = await store.get_sessions(run_id)
    assessments = await store.get_assessments([s.id for s in sessions])
    failures = collect_failures(sessions, assessments)
    untested = untestable_sessions(sessions, failures) | {s.id for s in sessions if s.stop_reason is None}
    verdicts, scorers = _verdicts(sessions, assessments, failures)
    failed: dict[str, list[str]] = {}
    for f in failures:
        if f.signal not in HARNESS_SIGNALS and f.signal not in failed.setdefault(f.session_id, []):
            failed[f.session_id].append(f.signal)
    try:
        report, _ = await store.get_report(run_id)
        issues, issues_from, usage = report.issues, "report", report.usage
    except NotFound:
        found, _ = await discover_issues(sessions, assessments, resolve_llm("offline"))
        issues, issues_from = found, "computed"
        usage = _usage(sessions, assessments)
    issues = [i for i in issues if i.source == "agent"]
    return _Side(run=run, sessions=sessions, untested=untested, verdicts=verdicts, failed=failed, issues=issues,
                 issues_from=issues_from, usage=usage, scorers=scorers)


def _pair_key(s: Session) -> PairKey | None:
    if s.test_case is not None and s.test_case.id:
        return (s.test_case.id, s.repeat)
    if s.case_index is not None:
        return (f"#{s.case_index}", s.repeat)
    return None


def _verdicts(sessions: list[Session], assessments: list[Assessment],
              failures: list[Failure]) -> tuple[dict[str, dict[str, bool | None]], list[str]]:
    """Per session and scorer: False if any verdict failed (per-turn scorers give several), True if one
    passed, else None (unscored). OVERALL: False on any agent failure, None when a verdict is missing for a
    judge or scorer error, else True."""
    out: dict[str, dict[str, bool | None]] = {s.id: {} for s in sessions}
    unscored: set[str] = set()
    scorers: list[str] = []
    for a in assessments:
        if a.session_id not in out:
            continue
        if a.scorer not in scorers:
            scorers.append(a.scorer)
        seen = out[a.session_id]
        if a.passed is False:
            seen[a.scorer] = False
        elif a.passed is True and seen.get(a.scorer) is not False:
            seen[a.scorer] = True
        else:
            seen.setdefault(a.scorer, None)
        if a.error:
            unscored.add(a.session_id)
    agent_failed = {f.session_id for f in failures if f.signal not in HARNESS_SIGNALS}
    for sid, seen in out.items():
        seen[OVERALL] = False if sid in agent_failed else (None if sid in unscored else True)
    return out, scorers


def _issue_changes(base: list[Issue], candidate: list[Issue]) -> IssueChanges:
    """Two issues are the same when they share a failure signature (`issue_signatures`: a model may have
    grouped several root causes into one issue in either run)."""
    out = IssueChanges()
    matched: set[int] = set()
    for i in candidate:
        sigs = issue_signatures(i)
        old = next((b for b in base if issue_signatures(b) & sigs), None)
        if old is not None:
            matched.add(id(old))
        change = IssueChange(id=i.id, signature=i.signature, title=i.title, severity=i.severity,
                             base_sessions=old.affected_sessions if old else 0, candidate_sessions=i.affected_sessions)
        (out.persisting if old else out.new).append(change)
    out.fixed = [IssueChange(id=i.id, signature=i.signature, title=i.title, severity=i.severity,
                             base_sessions=i.affected_sessions) for i in base if id(i) not in matched]
    return out


def _usage(sessions: list[Session], assessments: list[Assessment]) -> dict[str, Usage]:
    total: dict[str, Usage] = {}
    for s in sessions:
        for role, u in s.usage.items():
            total[role] = total.get(role, Usage()).add(u)
    for a in assessments:
        if a.usage is not None:
            total["judge"] = total.get("judge", Usage()).add(a.usage)
    return total


def _facts(side: _Side, run_id: str) -> RunFacts:
    usage = Usage()
    for u in side.usage.values():
        usage = usage.add(u)
    latencies = [m.latency_ms for s in side.sessions if s.id not in side.untested
                 for m in s.messages if m.role == "assistant" and m.latency_ms is not None]
    stops: dict[str, int] = {}
    for s in side.sessions:
        reason = s.stop_reason.value if s.stop_reason else "unfinished"
        stops[reason] = stops.get(reason, 0) + 1
    p50, p95 = percentile(latencies, 50), percentile(latencies, 95)
    return RunFacts(run_id=run_id, kind=side.run["kind"], target=describe_target(side.run["target"]), sessions=len(side.sessions),
                    untested=len(side.untested), issues_from=side.issues_from, calls=usage.calls,
                    tokens=usage.prompt_tokens + usage.completion_tokens, cost_usd=usage.cost_usd,
                    cost_unknown_calls=usage.cost_unknown_calls,
                    latency_p50_ms=round(p50, 1) if p50 is not None else None,
                    latency_p95_ms=round(p95, 1) if p95 is not None else None, stop_reasons=stops)


def _diff(new: float | None, old: float | None) -> float | None:
    return None if new is None or old is None else round(new - old, 1)


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.0f}%"
