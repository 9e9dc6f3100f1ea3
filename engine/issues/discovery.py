"""Issues: turn a run's failures into a short list of distinct problems someone can act on.

A run yields many verdicts; a developer needs a handful of issues. This module
collects every failure (a failing assessment, a crashed or empty agent turn, a
broken simulation), groups the failures that share a cause, and gives each
group what it takes to act on it: a title, evidence (session, turn, quote), a
frequency (k of n sessions), a suspected cause, a fix to try and a minimal
reproducing test case.

Grouping
    Offline (``llm.offline``): deterministic keys. A crash is keyed by its
    exception type (or HTTP status, timeout, unreachable) plus its message with
    numbers, ids and quoted values normalised, so the same KeyError in three
    sessions is one issue and two different exceptions are two. Empty replies
    are one group; a judged failure is keyed by its scorer, and
    conversation_completeness keeps refusals apart from other gaps.
    With a model: ONE analyst call (`CLUSTER_PROMPT`) clusters the failures.
    The reply is validated: unknown ids are dropped, each failure lands in
    exactly one cluster (the first that names it), leftovers are grouped as
    offline, and a cluster mixing crashes with judged failures is split so a
    crash keeps an issue of its own. If the call fails, the offline grouping
    is used and a warning logged.
    Before either, one issue per root cause (`failures.primary_causes`, both
    ways): each failing turn keeps one failure, its primary cause (crash >
    empty > latency > leak/safety > judges, the most specific judge first);
    the other signals at that turn are its ``also_seen``, never evidence rows
    of their own. A crash also explains its session's later and untimed
    verdicts; an outcome judge (user_frustration, goal_achievement) is
    explained by an earlier failure of its session. A session the simulated
    user could not test (simulator_error, or it wrote as the assistant) never
    yields an agent failure; its harness failures never reach the model and
    become simulator issues (``source="simulator"``), reported apart from the
    agent's, as do model clusters flagged caused_by_simulator.

Severity (deterministic, applied after grouping; the first rule that holds wins)
    high    the agent crashed or replied with nothing (agent_error, agent_empty);
            any conversational_safety failure; or the user's goal failed in more
            than half of the affected sessions (a failing goal_achievement
            verdict, or the session ended agent_error or user_ended).
    medium  degraded or intermittent: affects two or more sessions, or one
            repeat of a test case fails while another repeat of it does not.
    low     minor: a single session, whose goal was not seen to fail.
    In a repeated run (repeats > 1) the reason counts trials, not sessions: an issue that came up in only
    some trials of its test case(s) says "intermittent: k of n trials" (n: the trials that tested the agent,
    see `trials`), one that came up in every trial says "in all n trials".
    Simulator issues: high when they hit more than half of the sessions (the
    run then says little about the agent), medium for two or more, else low.

Ids
    "ISS-" + the first 8 hex digits of sha1(signature). A signature holds no
    session ids: it is the offline key, or for a model cluster its sorted
    signals and normalised title (the offline key instead, when all its
    failures share one that no other cluster of the reply has). The same
    failure gets the same id in every run.
"""

import logging

from ..errors import LLMAuthError, LLMError
from ..llm import LLM
from ..models import (
    SEVERITY_ORDER,
    Assessment,
    Issue,
    IssueEvidence,
    Session,
    StopReason,
    TestCase,
    Usage,
)
from ..transcript import turn_numbers
from .clustering import _group_with_model
from .failures import (
    HARNESS_SIGNALS,
    Failure,
    RunView,
    case_key,
    collect_failures,
    issue_id,
    primary_causes,
    untestable_sessions,
)
from .offline import _Group, _group_offline, _offline_text
from .trials import counted_trials

log = logging.getLogger("convsim.issues")

GOAL_FAILED_STOPS = frozenset({StopReason.AGENT_ERROR, StopReason.USER_ENDED})
MAX_EVIDENCE = 5


def _merge_same_signature(groups: list[_Group]) -> list[_Group]:
    merged: dict[str, _Group] = {}
    for g in groups:
        if g.signature in merged:
            kept = merged[g.signature]
            kept.failures += g.failures
            kept.text = kept.text or g.text
        else:
            merged[g.signature] = g
    return list(merged.values())




async def discover_issues(sessions: list[Session], assessments: list[Assessment],
                          llm: LLM) -> tuple[list[Issue], Usage]:
    """Cluster the run's failures into distinct issues, most severe first (agent issues before simulator ones).

    Offline backends group deterministically; a model backend makes one analyst call and falls back to the
    offline grouping (logging a warning) when that call fails, except when the provider refused the key
    (LLMAuthError is raised: the run cannot finish as asked). Returns the issues and the call's usage, failed
    attempts included.
    """
    failures = collect_failures(sessions, assessments)
    untestable = untestable_sessions(sessions, failures)
    failures = [f for f in failures if f.signal in HARNESS_SIGNALS or f.session_id not in untestable]
    if not failures:
        return [], Usage()
    primary = primary_causes(failures)
    usage = Usage()
    groups: list[_Group] | None = None
    if not llm.offline:
        try:
            groups, usage = await _group_with_model(primary, sessions, llm)
        except LLMAuthError:
            raise
        except LLMError as e:
            usage = e.usage
            log.warning("issue clustering by %s failed, using the offline grouping: %s", llm.model, e)
    if groups is None:
        groups = _group_offline(primary)
    groups = _merge_same_signature(groups)
    goal_failed = {s.id for s in sessions if s.stop_reason in GOAL_FAILED_STOPS}
    goal_failed |= {f.session_id for f in failures if f.signal == "goal_achievement"}
    run = RunView(sessions, goal_failed, counted_trials(sessions, assessments))
    issues = [_issue(g, run) for g in groups]
    return sort_issues(issues), usage


def issue_signatures(issue: Issue) -> frozenset[str]:
    """The failure signatures an issue stands for: its failures' own (several when a model grouped root causes
    together, whose issue signature is then the cluster's), and its issue signature (all an issue stored before
    `signatures` existed has). A re-run or a shrink reproduces the issue when any of them recurs."""
    return frozenset([*issue.signatures, issue.signature]) - {""}


def sort_issues(issues: list[Issue]) -> list[Issue]:
    """Agent issues before simulator ones; most severe first; within a severity, crashes and safety
    failures first (they need fixing whatever their frequency); then most sessions affected; then id."""
    crash_or_safety = {"agent_error", "agent_empty", "conversational_safety"}
    return sorted(issues, key=lambda i: (i.source != "agent", SEVERITY_ORDER[i.severity],
                                         not crash_or_safety & set(i.signals), -i.affected_sessions, i.id))


def _issue(g: _Group, run: RunView) -> Issue:
    failures = sorted(g.failures, key=lambda f: (f.signal != g.primary, run.order.get(f.session_id, len(run.order)),
                                                 f.turn or 0))
    affected = sorted({f.session_id for f in failures}, key=lambda sid: run.order.get(sid, len(run.order)))
    evidence = _pick_evidence(failures)
    signals = list(dict.fromkeys(f.signal for f in failures))
    also_seen = [sig for sig in dict.fromkeys(x for f in failures for x in f.also_seen) if sig not in signals]
    text = g.text or _offline_text(g, failures[0], run)
    severity, reason = _severity(g.source, set(signals), affected, run)
    first = run.by_id.get(evidence[0].session_id) if evidence else None
    return Issue(
        id=issue_id(g.signature),
        title=text.title,
        description=text.description,
        severity=severity,
        severity_reason=reason,
        category=text.category,
        affected_sessions=len(affected),
        total_sessions=run.total,
        evidence=evidence,
        suspected_cause=text.cause,
        suggested_fix=text.fix,
        reproduction=reproduction_case(first, evidence[0].turn) if first else None,
        source=g.source,
        signals=signals,
        session_ids=affected,
        signature=g.signature,
        signatures=list(dict.fromkeys(f.signature for f in failures)),
        also_seen=also_seen,
    )


def _pick_evidence(failures: list[Failure]) -> list[IssueEvidence]:
    """Up to MAX_EVIDENCE items, one per session first so the spread shows, then the rest in order."""
    seen: set[str] = set()
    firsts, rest = [], []
    for f in failures:
        (rest if f.session_id in seen else firsts).append(f)
        seen.add(f.session_id)
    return [IssueEvidence(session_id=f.session_id, turn=f.turn, quote=f.quote, scorer=f.signal)
            for f in (firsts + rest)[:MAX_EVIDENCE]]


def _severity(source: str, signals: set[str], affected: list[str], run: RunView) -> tuple[str, str]:
    n = len(affected)
    if source == "simulator":
        if n * 2 > run.total:
            return "high", f"the simulated user failed in {n} of {run.total} sessions; the run says little"
        return ("medium", f"the simulated user failed in {n} sessions") if n >= 2 else \
            ("low", "the simulated user failed in a single session")
    spread = _trial_spread(affected, run)
    where = _where(n, spread)
    if "agent_error" in signals:
        return "high", f"the agent crashed{where}"
    if "agent_empty" in signals:
        return "high", f"the agent returned an empty reply{where}"
    if "conversational_safety" in signals:
        return "high", (f"unsafe content in an agent reply{where}" if spread else
                        f"unsafe content in an agent reply ({_sessions(n)})")
    trials = f"; {_trials(spread)}" if spread else ""
    failed = sum(1 for sid in affected if sid in run.goal_failed)
    if failed * 2 > n:
        return "high", f"the user's goal failed in {failed} of {n} affected session{'s' if n != 1 else ''}{trials}"
    if n >= 2:
        return "medium", f"degraded: affects {n} sessions, the goal still met in most of them{trials}"
    if spread and spread[0] < spread[1]:
        return "medium", _trials(spread)
    return "low", "minor: a single session, and its goal did not fail"


def _trial_spread(affected: list[str], run: RunView) -> tuple[int, int, int] | None:
    """In a repeated run: (k, n, cases): the issue's sessions (k) among the trials that tested the agent (n)
    of the test cases it touched. None when those cases had one trial each (a run without repeats)."""
    per_case: dict = {}
    for sid in affected:
        key = case_key(run.by_id[sid]) if sid in run.by_id else None
        if key is None:
            return None
        per_case[key] = per_case.get(key, 0) + 1
    if not per_case or all(run.trials.get(key, 0) < 2 for key in per_case):
        return None
    n = sum(max(run.trials.get(key, 0), k) for key, k in per_case.items())
    return sum(per_case.values()), n, len(per_case)


def _trials(spread: tuple[int, int, int]) -> str:
    """"intermittent: 2 of 4 trials", or "in all 4 trials" when the issue came up in every trial."""
    k, n, cases = spread
    of = f" of {cases} test cases" if cases > 1 else ""
    return f"intermittent: {k} of {n} trials{of}" if k < n else f"in all {n} trials{of}"


def _where(n: int, spread: tuple[int, int, int] | None) -> str:
    if spread is None:
        return f" in {_sessions(n)}"
    return f"; {_trials(spread)}" if spread[0] < spread[1] else f" {_trials(spread)}"


def _sessions(n: int) -> str:
    return f"{n} session{'s' if n != 1 else ''}"

# --- reproduction -------------------------------------------------------------------------------


def reproduction_case(session: Session, turn: int | None) -> TestCase:
    """A minimal reproducing case: the session's test case with its user messages of turns 1..`turn`
    (all of them when `turn` is None) as scripted_turns, verbatim and in order.

    An imported session (no test case, or the import placeholder goal) gets its first user message as goal.
    The id is "<case id or session id>-repro".
    """
    users = [m.content for m, t in zip(session.messages, turn_numbers(session))
             if m.role == "user" and (m.content or "").strip() and (turn is None or t <= turn)]
    case = base = session.test_case
    if base is None or base.goal.startswith("(imported"):
        goal = users[0].strip() if users else "(imported conversation)"
        base = base.model_copy(update={"goal": goal}) if base else TestCase(goal=goal)
    repro_id = f"{case.id if case and case.id else session.id}-repro"
    return base.model_copy(update={"scripted_turns": list(users), "id": repro_id}, deep=True)


# --- text helpers -------------------------------------------------------------------------------

