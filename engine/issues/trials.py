"""Repeated trials: each session of a test case is one trial; pass^k says how reliably the agent passes.

A trial is one of three outcomes (`trial_outcome`), decided in this order:
    untested  the session could not test the agent: the simulated user failed or broke its role (the same
              sessions issue discovery leaves out), or it was cancelled or never finished; then also when no
              failure was seen but a judge's model could not give a verdict;
    fail      the agent crashed or returned an empty reply, or a verdict on it failed;
    pass      otherwise: no agent failure, and every verdict given on it passed (unscored ones say nothing).
Untested trials are left out of a case's n and counted apart: "could not test" is never a pass. A session
still running is not tallied at all (`TrialTally`) until it ends.

Per case, `pass_hat(n, c, k)` is tau-bench's unbiased estimator C(c, k) / C(n, k) of the chance that k
fresh trials all pass; over the run, pass^j is its mean over the cases with at least j counted trials.
A case is flaky when its counted trials disagree (0 < c < n).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import comb
from typing import Any, Iterable, Literal

from ..models import Assessment, CaseTrials, PassHat, Session, StopReason, TrialsSummary
from .failures import CRASH_SIGNALS, HARNESS_SIGNALS, case_key, collect_failures

Outcome = Literal["pass", "fail", "untested"]
# What a session's transcript alone says of it as a trial: its simulated user broke its role, an agent call
# failed, or neither. Stored when a repeated run's session ends, so that polling a run's trials reads no transcript.
Mark = Literal["harness", "crash", "clean"]
FAILED_SESSIONS_LISTED = 5
FLAKY_LISTED = 20
AGENT_FAILURE_STOPS = frozenset({StopReason.AGENT_ERROR, StopReason.AGENT_EMPTY})


def pass_hat(n: int, c: int, k: int) -> float | None:
    """C(c, k) / C(n, k): the chance that k trials drawn from these n all pass. None when n < k (or k < 1)."""
    if k < 1 or n < k or not 0 <= c <= n:
        return None
    return comb(c, k) / comb(n, k)


def transcript_mark(session: Session) -> Mark:
    """The part of a trial's outcome its transcript decides (see Mark); needs the session's messages."""
    failures = collect_failures([session], [])
    if any(f.signal in HARNESS_SIGNALS for f in failures):
        return "harness"
    if any(f.signal in CRASH_SIGNALS for f in failures):
        return "crash"
    return "clean"


def trial_outcome(session: Session, verdicts: list[Assessment], mark: Mark | None = None) -> Outcome:
    """The session as a trial (see the module docstring). `verdicts` are the session's stored verdicts; `mark`,
    its stored `transcript_mark` (computed from its messages when not given)."""
    if session.stop_reason is None or session.stop_reason in (StopReason.SIMULATOR_ERROR, StopReason.CANCELLED):
        return "untested"
    mark = mark or transcript_mark(session)
    failing = {v.scorer for v in verdicts if v.passed is False}  # a custom judge may bear a signal's name
    if mark == "harness" or failing & HARNESS_SIGNALS:
        return "untested"
    if session.stop_reason in AGENT_FAILURE_STOPS or mark == "crash" or failing & CRASH_SIGNALS:
        return "fail"
    if any(v.passed is False for v in verdicts):
        return "fail"
    if any(v.error_kind == "model" for v in verdicts):
        return "untested"
    return "pass"


@dataclass
class _Case:
    index: int | None
    case_id: str | None
    passed: int = 0
    failed: int = 0
    untested: int = 0
    failed_sessions: list[str] = field(default_factory=list)

    @property
    def trials(self) -> int:
        return self.passed + self.failed

    @property
    def flaky(self) -> bool:
        return self.passed > 0 and self.failed > 0

    @property
    def label(self) -> str:
        return self.case_id or (f"#{self.index + 1}" if self.index is not None else "?")


class TrialTally:
    """Trial outcomes per test case, fed one session at a time (a big run is read a page at a time).

    Sessions without a test case to group them by (imported conversations) are not trials, and sessions still
    running are not trials yet: both are skipped.
    """

    def __init__(self) -> None:
        self._cases: dict[Any, _Case] = {}

    def add(self, session: Session, verdicts: list[Assessment], mark: Mark | None = None) -> Outcome | None:
        key = case_key(session)
        if key is None or session.stop_reason is None:
            return None
        case = self._cases.get(key)
        if case is None:
            case = self._cases[key] = _Case(session.case_index, session.test_case.id if session.test_case else None)
        outcome = trial_outcome(session, verdicts, mark)
        if outcome == "pass":
            case.passed += 1
        elif outcome == "fail":
            case.failed += 1
            if len(case.failed_sessions) < FAILED_SESSIONS_LISTED:
                case.failed_sessions.append(session.id)
        else:
            case.untested += 1
        return outcome

    def summary(self, repeats: int, *, max_cases: int | None = None) -> TrialsSummary:
        """pass^1..pass^`repeats` and the per-case results (the first `max_cases`, in case order)."""
        cases = sorted(self._cases.values(), key=lambda c: (c.index is None, c.index or 0, c.case_id or ""))
        pass_hats = []
        for k in range(1, repeats + 1):
            values = [v for c in cases if (v := pass_hat(c.trials, c.passed, k)) is not None]
            pass_hats.append(PassHat(k=k, value=round(sum(values) / len(values), 4) if values else None,
                                     cases=len(values)))
        flaky = [c for c in cases if c.flaky]
        listed = cases if max_cases is None else cases[:max_cases]
        return TrialsSummary(
            repeats=repeats, cases=len(cases), trials=sum(c.trials for c in cases),
            passed=sum(c.passed for c in cases), untested=sum(c.untested for c in cases), pass_hat=pass_hats,
            flaky=len(flaky), flaky_cases=[c.label for c in flaky[:FLAKY_LISTED]],
            case_results=[_case_result(c, repeats) for c in listed],
        )


def _case_result(c: _Case, k: int) -> CaseTrials:
    value = pass_hat(c.trials, c.passed, k)
    return CaseTrials(case_index=c.index, case_id=c.case_id, trials=c.trials, passed=c.passed, untested=c.untested,
                      pass_hat_k=round(value, 4) if value is not None else None, flaky=c.flaky,
                      failed_sessions=list(c.failed_sessions))


def summarize_trials(sessions: Iterable[Session], assessments: Iterable[Assessment], repeats: int, *,
                     max_cases: int | None = None) -> TrialsSummary:
    """The trials of these sessions in memory (a report's); a run summary pages them into a `TrialTally`."""
    by_session: dict[str, list[Assessment]] = {}
    for a in assessments:
        by_session.setdefault(a.session_id, []).append(a)
    tally = TrialTally()
    for s in sessions:
        tally.add(s, by_session.get(s.id, []))
    return tally.summary(repeats, max_cases=max_cases)


def counted_trials(sessions: list[Session], assessments: list[Assessment]) -> dict[Any, int]:
    """Per test case (`case_key`), how many of its sessions count as trials (tested the agent)."""
    by_session: dict[str, list[Assessment]] = {}
    for a in assessments:
        by_session.setdefault(a.session_id, []).append(a)
    out: dict[Any, int] = {}
    for s in sessions:
        key = case_key(s)
        if key is not None and trial_outcome(s, by_session.get(s.id, [])) != "untested":
            out[key] = out.get(key, 0) + 1
    return out
