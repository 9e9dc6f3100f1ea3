"""The fix loop: after a change, re-run a run's issues and say truthfully what happened to each.

    rerun_issues(store, run_id) -> RerunOutcome(run_id, issues=[IssueCheck(status, reason)], new_issues)

Per issue, over the re-run sessions of its test case(s):
- `reproduces`: a failure with the issue's signature recurred;
- `fixed`: the re-run reached the turn where the issue had failed, and its signature did not recur,
  in enough sessions (an intermittent issue, seen in k of n sessions with k < n, needs
  `CLEAN_RUNS_FOR_INTERMITTENT` clean re-runs);
- `inconclusive`: the failing turn was not reached (another failure came first, the user ended
  earlier, or the simulated user failed), or too few clean re-runs.
Failures whose signature no old issue has come back as `new_issues`, grouped like any run's issues.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from ..errors import CouldNotTest, InvalidOption, InvalidTarget
from ..issues import Failure, collect_failures, discover_issues, issue_signatures, primary_causes, untestable_sessions
from ..judging import DEFAULT_SCORERS, parse_scorers
from ..llm import LLM, close_models, resolve_llm
from ..llm.resolve import rate_limits
from ..models import Issue, IssueCheck, IssueStatus, RunStatus, Session, TargetSpec
from ..simulation import load_user_class, redacted_spec, resolve_target
from ..store import Store, new_run_id
from ..transcript import turn_numbers
from ..workspace import WorkspaceArg, as_workspace
from ._shared import MAX_REPEATS, ProgressFn, cache_enabled, check_range, sampling_options, with_cache
from .simulation import SimulationJob

CLEAN_RUNS_FOR_INTERMITTENT = 3  # clean re-runs before an issue seen in only some sessions counts as fixed

Status = IssueStatus


class RerunOutcome(BaseModel):
    """The re-run's id, a status per old issue, and the issues the re-run found that none of the old ones has."""

    run_id: str
    rerun_of: str
    issues: list[IssueCheck]
    new_issues: list[Issue] = Field(default_factory=list)


async def rerun_issues(
    store: Store,
    run_id: str,
    *,
    issue_id: str | None = None,
    target: str | dict | TargetSpec | None = None,
    max_turns: int | None = None,
    model: str | None = None,
    repeats: int | None = None,
    workspace: WorkspaceArg = None,
    llm: LLM | None = None,
    progress: ProgressFn | None = None,
    cache: bool | None = None,
    rpm: float | None = None,
    tpm: float | None = None,
) -> RerunOutcome:
    """Re-run one issue's reproducing case, or every case of the run, against the (changed) agent.

    `repeats` defaults to the run's; when an issue was intermittent it is raised to
    CLEAN_RUNS_FOR_INTERMITTENT so that "fixed" rests on enough clean sessions. The run's temperature and
    seed are used again; `cache` defaults to the run's, or CONVSIM_CACHE (where the changed agent replies
    as before, the cached users and judges answer as before). `rpm` and `tpm` default to the run's, then to
    CONVSIM_LLM_RPM and CONVSIM_LLM_TPM.
    """
    if repeats is not None:
        check_range("repeats", repeats, 1, MAX_REPEATS)
    report, _ = await store.get_report(run_id)
    run = await store.get_run(run_id)
    issues = report.issues
    if issue_id:
        issues = [i for i in issues if i.id == issue_id]
        if not issues:
            known = ", ".join(i.id for i in report.issues) or "none"
            raise InvalidOption(f"run '{run_id}' has no issue '{issue_id}' (its issues: {known})")
    spec = target if target is not None else TargetSpec.model_validate(run["target"])
    if target is None and "***" in str(run["target"].get("headers", {})) + str(run["target"].get("url", "")):
        raise InvalidTarget("the original target's secrets (header values, URL password or query) were redacted "
                            "when stored; pass target again")
    options = run["options"]
    original = await store.get_sessions(run_id, with_messages=False)
    index_of = {s.id: s.case_index for s in original}
    if issue_id:
        cases = [i.reproduction for i in issues if i.reproduction]
        case_of = {issues[0].id: list(range(len(cases)))}
        failing_turn = {(issues[0].id, 0): _failing_turn(issues[0], None, index_of)}
    else:
        cases = await store.get_test_cases(run_id)
        case_of = {i.id: sorted({index_of[s] for s in i.session_ids if s in index_of}) for i in issues}
        failing_turn = {(i.id, c): _failing_turn(i, c, index_of) for i in issues for c in case_of[i.id]}
    if not cases:
        raise InvalidOption("nothing to re-run: the issue has no reproducing case" if issue_id
                            else f"run '{run_id}' has no test cases to re-run")
    if repeats is None:
        repeats = int(options.get("repeats") or 1)
        if any(i.affected_sessions < i.total_sessions for i in issues):
            repeats = max(repeats, CLEAN_RUNS_FOR_INTERMITTENT)
    workspace = as_workspace(workspace)
    resolved = resolve_target(spec, workspace=workspace)
    resolved.check_cases(cases)
    scorers = parse_scorers(options.get("scorers") or list(DEFAULT_SCORERS), workspace=workspace)
    # the original run's models unless told otherwise, so a re-run plays the same users and judges
    use_cache = cache_enabled(cache) if cache is not None else bool(options.get("cache")) or cache_enabled(None)
    sampling = {"temperature": options.get("temperature"), "seed": options.get("seed")}
    rates = dict(zip(("rpm", "tpm"), rate_limits(rpm if rpm is not None else options.get("rpm"),
                                                 tpm if tpm is not None else options.get("tpm"))))
    user_llm = with_cache(llm or resolve_llm(model or ("offline" if run["offline"] else run["model"]), **sampling,
                                             **rates), store, use_cache)
    judge_llm = with_cache(llm or resolve_llm(model or options.get("judge_model") or user_llm.model, **sampling,
                                              **rates), store, use_cache)
    new_run = new_run_id()
    turns = max_turns or options.get("max_turns") or 8
    await store.create_run(run_id=new_run, kind="rerun", target=redacted_spec(resolved.spec),
                           options={**options, "rerun_of": run_id, "issue_id": issue_id, "max_turns": turns,
                                    "repeats": repeats, **sampling_options(user_llm, use_cache), **rates},
                           model=user_llm.model, offline=user_llm.offline, test_cases=cases,
                           sessions_total=len(cases) * repeats)
    user_class = load_user_class(options.get("user_agent"), workspace=workspace)
    job = SimulationJob(store, new_run, resolved, cases, user_llm, user_class, turns,
                        options.get("concurrency") or 8, repeats, scorers, judge_llm)
    summary = await job.run(progress)
    if summary.status == RunStatus.FAILED:  # e.g. a refused key: nothing was tested, so nothing counts as fixed
        raise CouldNotTest(f"re-run {new_run} of run {run_id} failed: {summary.error}")
    sessions = await store.get_sessions(new_run)
    assessments = await store.get_assessments([s.id for s in sessions])
    everything = collect_failures(sessions, assessments)
    spoiled = untestable_sessions(sessions, everything)
    failures = primary_causes([f for f in everything if f.session_id not in spoiled])
    checks = [_check(issue, [s for s in sessions if s.case_index in case_of.get(issue.id, [])], failures,
                     failing_turn, spoiled) for issue in issues]
    known = set().union(*(issue_signatures(i) for i in report.issues + report.simulator_issues))
    try:
        found, _ = await discover_issues(sessions, assessments, judge_llm)
    finally:  # the simulation closed its models; the judge's calls here opened a pool again
        await close_models(judge_llm)
    new_issues = [i for i in found if i.source == "agent" and not issue_signatures(i) & known]
    return RerunOutcome(run_id=new_run, rerun_of=run_id, issues=checks, new_issues=new_issues)


def _failing_turn(issue: Issue, case_index: int | None, index_of: dict[str, int]) -> int:
    """The turn at which `issue` failed in the original sessions of that case (the earliest one)."""
    turns = [e.turn for e in issue.evidence if e.turn
             and (case_index is None or index_of.get(e.session_id) == case_index)]
    if not turns:
        turns = [e.turn for e in issue.evidence if e.turn]
    return min(turns, default=1)


def _check(issue: Issue, sessions: list[Session], failures: list[Failure],
           failing_turn: dict[tuple[str, int], int], spoiled: set[str] | None = None) -> IssueCheck:
    """`spoiled`: the sessions that cannot test the agent (`untestable_sessions`); by default worked out here."""
    if spoiled is None:
        spoiled = untestable_sessions(sessions, failures)
    ids = sorted(s.id for s in sessions)
    check = dict(id=issue.id, title=issue.title, severity=issue.severity, sessions=ids)
    by_session: dict[str, list[Failure]] = {}
    for f in failures:
        by_session.setdefault(f.session_id, []).append(f)
    signatures = issue_signatures(issue)
    recurred = [(s, f) for s in sessions for f in by_session.get(s.id, []) if f.signature in signatures]
    if recurred:
        s, f = recurred[0]
        n = len({s.id for s, _ in recurred})
        where = f"turn {f.turn}" if f.turn else "the session"
        return IssueCheck(**check, status="reproduces",
                          reason=f"the same failure recurred in {n} of {len(sessions)} re-run session(s): "
                                 f"{f.signature} at {where}")
    clean, blocked = 0, []
    for s in sessions:
        turn = failing_turn.get((issue.id, s.case_index), 1)
        why = _not_reached(s, turn, by_session.get(s.id, []), spoiled=s.id in spoiled)
        if why:
            blocked.append(why)
        else:
            clean += 1
    intermittent = issue.affected_sessions < issue.total_sessions
    needed = CLEAN_RUNS_FOR_INTERMITTENT if intermittent else 1
    if clean >= needed:
        return IssueCheck(**check, status="fixed",
                          reason=f"{clean} re-run session(s) reached the failing turn and it did not recur")
    if not sessions:
        return IssueCheck(**check, status="inconclusive", reason="no re-run session played the issue's case")
    if blocked:
        return IssueCheck(**check, status="inconclusive",
                          reason=f"the failing turn was not reached in {len(blocked)} of {len(sessions)} re-run "
                                 f"session(s): {blocked[0]}")
    return IssueCheck(**check, status="inconclusive",
                      reason=f"seen in {issue.frequency} before, so {needed} clean re-runs are needed; "
                             f"{clean} ran clean (pass repeats={needed})")


def _not_reached(session: Session, turn: int, failures: list[Failure], *, spoiled: bool) -> str | None:
    """Why `session` never got to `turn` with an answer from the agent, or None when it did."""
    if spoiled:  # the simulated user failed or broke its role: nothing this session did counts
        return f"the simulated user failed ({session.stop_detail or 'it broke its role'})"
    answered = {t for m, t in zip(session.messages, turn_numbers(session)) if m.role == "assistant" and not m.error}
    if any(t >= turn for t in answered):
        return None
    earlier = sorted((f for f in failures if f.turn is not None and f.turn <= turn), key=lambda f: f.turn)
    if earlier:
        f = earlier[0]
        return f"another failure came first: {f.signature} at turn {f.turn}"
    last = max(answered, default=0)
    return f"the conversation ended at turn {last} ({session.stop_reason.value if session.stop_reason else 'no stop'}), before turn {turn}"


def rerun_json(outcome: RerunOutcome) -> dict:
    """The `--json` form: {"run_id", "rerun_of", "issues": [{"id", "status", "reason", "sessions"}], "new_issues"}."""
    return {"run_id": outcome.run_id, "rerun_of": outcome.rerun_of,
            "issues": [c.model_dump(include={"id", "title", "severity", "status", "reason", "sessions"})
                       for c in outcome.issues],
            "new_issues": [i.model_dump(mode="json") for i in outcome.new_issues]}
