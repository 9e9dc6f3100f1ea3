"""JUnit XML: a run's results where CI systems already look (Jenkins, GitLab, GitHub test reporters).

The document follows the Apache Ant JUnit schema that those readers accept (tests/data/JUnit.xsd, the
strictest common form: `<testsuites>` with no attributes, each `<testsuite>` with its id, package,
timestamp, hostname, properties, system-out and system-err). What becomes a testcase:

- each session x scorer: passed, `<failure>` (the rationale and the evidence: turn, role, quote), or
  `<error>` when the session could not be tested (the simulated user failed or broke its role, a
  judge's model gave no verdict: whatever the other verdicts say) or the scorer raised; `<skipped>` for
  a scorer with no pass rule;
- a session that got no verdict at all: one `session` testcase (an error when the simulated user
  failed, a failure when the agent never answered, skipped when it never finished);
- each issue: a `<failure>` (an agent issue) or an `<error>` (a simulator issue: could not test);
- a re-run's issue checks (reproduces: failure; fixed: passed; inconclusive: skipped with the reason);
- a comparison's scorers (failure when significantly worse), flipped cases and issue changes.

Every string goes through `secrets.redact` and loses the characters XML 1.0 cannot hold (control
characters, lone surrogates, U+FFFE/U+FFFF become U+FFFD): transcripts are hostile text. Each testsuite's
tests / failures / errors / skipped / time are counted from its testcases, so they always agree.
"""

from __future__ import annotations

import re
import socket
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Iterable, Literal, Protocol, Sequence

from .. import secrets
from ..models import Assessment, Issue, Session, StopReason
from ..store import Store
from ..text import clip, one_line
from .comparison import Comparison

Outcome = Literal["passed", "failure", "error", "skipped"]

MAX_MESSAGE_CHARS = 1000  # the message attribute: one line a CI page shows beside the test name
MAX_DETAIL_CHARS = 20_000  # the element text: rationale, evidence, case; a hostile transcript stays bounded
MAX_NAME_CHARS = 200
PACKAGE = "convsim"

# Everything outside XML 1.0's Char production: #x9 | #xA | #xD | [#x20-#xD7FF] | [#xE000-#xFFFD] | [#x10000-#x10FFFF]
_NOT_XML = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_UNTESTED_KINDS = {"model": "judge_error", "simulator": "simulator_broke_role", "scorer": "scorer_error"}


def xml_text(text: object) -> str:
    """`text` safe for an XML 1.0 document: secrets masked, characters XML cannot hold replaced by U+FFFD."""
    return _NOT_XML.sub("\ufffd", secrets.redact(str(text)))


@dataclass
class JUnitCase:
    classname: str
    name: str
    outcome: Outcome = "passed"
    type: str = ""  # the failure's or error's kind, e.g. the scorer or 'simulator_error'
    message: str = ""
    detail: str = ""
    time_s: float = 0.0


@dataclass
class JUnitSuite:
    name: str
    timestamp: float
    cases: list[JUnitCase] = field(default_factory=list)
    properties: dict[str, str] = field(default_factory=dict)
    system_out: str = ""

    def count(self, outcome: Outcome) -> int:
        return sum(1 for c in self.cases if c.outcome == outcome)

    @property
    def time_s(self) -> float:
        return sum(c.time_s for c in self.cases)


def render_junit(suites: Sequence[JUnitSuite]) -> str:
    """The suites as one `<testsuites>` document (UTF-8 text with its XML declaration)."""
    root = ET.Element("testsuites")
    host = xml_text(socket.gethostname() or "localhost") or "localhost"
    for i, suite in enumerate(suites):
        el = ET.SubElement(root, "testsuite", {
            "name": _name(suite.name), "package": PACKAGE, "id": str(i),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(suite.timestamp)), "hostname": host,
            "tests": str(len(suite.cases)), "failures": str(suite.count("failure")),
            "errors": str(suite.count("error")), "skipped": str(suite.count("skipped")),
            "time": _seconds(sum(round(c.time_s, 3) for c in suite.cases)),
        })
        props = ET.SubElement(el, "properties")
        for key, value in suite.properties.items():
            ET.SubElement(props, "property", {"name": _name(key), "value": clip(xml_text(value), MAX_MESSAGE_CHARS)})
        for case in suite.cases:
            tc = ET.SubElement(el, "testcase", {"classname": _name(case.classname), "name": _name(case.name),
                                                "time": _seconds(round(case.time_s, 3))})
            if case.outcome == "skipped":
                ET.SubElement(tc, "skipped", {"message": _message(case.message)})
            elif case.outcome in ("failure", "error"):
                outcome = ET.SubElement(tc, case.outcome, {"type": _name(case.type or case.outcome),
                                                           "message": _message(case.message)})
                outcome.text = _detail(case.detail)
        ET.SubElement(el, "system-out").text = _detail(suite.system_out)
        ET.SubElement(el, "system-err").text = ""
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def _name(text: str) -> str:
    return one_line(xml_text(text), MAX_NAME_CHARS) or "-"


def _message(text: str) -> str:
    return one_line(xml_text(text), MAX_MESSAGE_CHARS)


def _detail(text: str) -> str:
    return clip(xml_text(text), MAX_DETAIL_CHARS)


def _seconds(value: float) -> str:
    return f"{max(value, 0.0):.3f}"


# --- session x scorer ---------------------------------------------------------------------------


def case_label(session: Session) -> str:
    """How a session's test case is named in CI: its id (or '#N', 1-based), its repeat when there are several."""
    case = session.test_case
    if case is not None and case.id:
        label = case.id
    elif session.case_index is not None:
        label = f"#{session.case_index + 1}"
    else:
        label = session.id
    return f"{label} repeat {session.repeat + 1}" if session.repeat else label


def verdict_cases(sessions: Iterable[Session], assessments: Iterable[Assessment], *, suite: str,
                  scorers: Sequence[str] | None = None) -> list[JUnitCase]:
    """One testcase per session x scorer (`scorers`' verdicts only, when given), in session order."""
    by_session: dict[str, dict[str, list[Assessment]]] = {}
    for a in assessments:
        if scorers is None or a.scorer in scorers:
            by_session.setdefault(a.session_id, {}).setdefault(a.scorer, []).append(a)
    out = []
    for s in sessions:
        classname = f"{suite}.{case_label(s)}"
        duration = max((s.finished_at or 0.0) - (s.started_at or 0.0), 0.0) if s.finished_at else 0.0
        verdicts = by_session.get(s.id, {})
        if not verdicts:
            out.append(_unjudged(s, classname, duration))
            continue
        order = [n for n in scorers if n in verdicts] if scorers is not None else sorted(verdicts)
        for scorer in order:
            out.append(_verdict_case(s, scorer, verdicts[scorer], classname, duration))
    return out


def _verdict_case(s: Session, scorer: str, verdicts: list[Assessment], classname: str, duration: float) -> JUnitCase:
    case = JUnitCase(classname=classname, name=scorer, time_s=duration)
    if s.stop_reason == StopReason.SIMULATOR_ERROR:  # its verdicts judge a conversation the simulated user broke off
        case.outcome, case.type = "error", "simulator_error"
        case.message = f"could not test: the simulated user failed: {one_line(s.stop_detail, 500) or 'no detail'}"
        case.detail = f"{s.stop_detail or ''}{_session_detail(s)}"
        return case
    failed = [v for v in verdicts if v.passed is False]
    if failed:
        first = failed[0]
        case.outcome, case.type = "failure", scorer
        ev = next((e for e in first.evidence if e.role == "assistant"), first.evidence[0] if first.evidence else None)
        where = f" (turn {ev.turn}: \"{one_line(ev.quote, 160)}\")" if ev else ""
        case.message = f"{one_line(first.rationale, 600) or 'failed'}{where}"
        case.detail = "\n\n".join(_verdict_detail(v) for v in failed) + _session_detail(s)
        return case
    if any(v.passed is True for v in verdicts):
        return case
    errored = next((v for v in verdicts if v.error), None)
    if errored is not None:  # could not test (simulator, judge model) or the scorer raised: never a pass
        case.outcome = "error"
        case.type = _UNTESTED_KINDS.get(errored.error_kind or "", "unscored")
        case.message = one_line(errored.error, 600)
        case.detail = f"{errored.error}{_session_detail(s)}"
        return case
    case.outcome = "skipped"
    case.message = f"{scorer} has no pass rule; value: {one_line(str(verdicts[0].value), 200)}"
    return case


def _verdict_detail(v: Assessment) -> str:
    lines = [f"{v.scorer}{f' at turn {v.turn}' if v.turn else ''}: value {v.value!r}", v.rationale or "(no rationale)"]
    if v.evidence:
        lines.append("evidence:")
        lines += [f"  turn {e.turn}{f' ({e.role})' if e.role else ''}: {e.quote}" for e in v.evidence]
    return "\n".join(lines)


def _session_detail(s: Session) -> str:
    lines = ["", "", f"session {s.id} (run {s.run_id}), ended {s.stop_reason.value if s.stop_reason else 'running'} "
                     f"after {s.turns} turn(s)"]
    if s.test_case is not None:
        lines.append(f"goal: {s.test_case.goal}")
        if s.test_case.persona:
            lines.append(f"persona: {s.test_case.persona}")
    if s.run_id:
        lines.append(f"transcript: convsim://runs/{s.run_id}/sessions/{s.id}")
    return "\n".join(lines)


def _unjudged(s: Session, classname: str, duration: float) -> JUnitCase:
    """A session with no verdict: why it was not judged decides its outcome."""
    case = JUnitCase(classname=classname, name="session", time_s=duration, message=one_line(s.stop_detail, 600))
    if s.stop_reason == StopReason.SIMULATOR_ERROR:
        case.outcome, case.type = "error", "simulator_error"
        case.message = f"could not test: the simulated user failed: {case.message or 'no detail'}"
    elif s.stop_reason in (StopReason.AGENT_ERROR, StopReason.AGENT_EMPTY):
        case.outcome, case.type = "failure", s.stop_reason.value
        case.message = case.message or f"the session ended {s.stop_reason.value}"
    elif s.stop_reason is None or s.stop_reason == StopReason.CANCELLED:
        case.outcome = "skipped"
        case.message = "the session did not finish" if s.stop_reason is None else "the session was cancelled"
        return case
    else:
        return case  # ended normally, no scorer asked for: nothing failed
    case.detail = f"{s.stop_detail or ''}{_session_detail(s)}"
    return case


async def verdict_suite(store: Store, *, name: str, run_id: str | None = None, session_ids: Sequence[str] | None = None,
                        scorers: Sequence[str] | None = None) -> JUnitSuite:
    """The session x scorer testcases of a run (or of these sessions), read from the store without transcripts."""
    ids = list(session_ids) if session_ids is not None else await store.session_ids(run_id or "")
    sessions = await store.get_sessions_by_ids(ids, with_messages=False)
    assessments = await store.get_assessments(ids)
    started = min((s.started_at for s in sessions if s.started_at), default=time.time())
    suite = JUnitSuite(name=name, timestamp=started,
                       cases=verdict_cases(sessions, assessments, suite=name, scorers=scorers))
    if run_id:
        run = await store.get_run(run_id)
        suite.properties = {"run_id": run_id, "target": str(run.get("target") or ""),
                            "model": str(run.get("model") or ""), "offline": str(bool(run.get("offline"))).lower()}
        suite.system_out = f"transcripts: convsim://runs/{run_id}\nexport: convsim-mcp runs export {run_id}"
    return suite


# --- issues -------------------------------------------------------------------------------------


def issue_cases(issues: Iterable[Issue], *, suite: str) -> list[JUnitCase]:
    """One testcase per issue: an agent issue fails; a simulator issue is an error (the agent was not tested)."""
    out = []
    for issue in issues:
        agent = issue.source == "agent"
        out.append(JUnitCase(
            classname=f"{suite}.issues", name=f"{issue.id} {issue.title}",
            outcome="failure" if agent else "error", type=f"{issue.severity} {issue.category}",
            message=f"[{issue.severity}] {issue.title}: {issue.affected_sessions} of {issue.total_sessions} "
                    f"session(s); {one_line(issue.severity_reason, 300)}",
            detail=_issue_detail(issue),
        ))
    return out


def _issue_detail(issue: Issue) -> str:
    lines = [issue.description, f"severity {issue.severity}: {issue.severity_reason}"]
    if issue.evidence:
        lines.append("evidence:")
        lines += [f"  session {e.session_id}{f' turn {e.turn}' if e.turn else ''}"
                  f"{f' [{e.scorer}]' if e.scorer else ''}: {e.quote}" for e in issue.evidence]
    if issue.suspected_cause:
        lines.append(f"suspected cause: {issue.suspected_cause}")
    if issue.suggested_fix:
        lines.append(f"suggested fix: {issue.suggested_fix}")
    if issue.reproduction is not None:
        lines.append("reproducing case: " + issue.reproduction.model_dump_json(exclude_defaults=True))
    if issue.session_ids:
        lines.append("sessions: " + ", ".join(issue.session_ids[:20]))
    return "\n".join(lines)


# --- re-runs and comparisons ----------------------------------------------------------------------


class IssueCheckLike(Protocol):
    """What a re-run says of one issue (engine.pipeline.rerun.IssueCheck)."""

    id: str
    title: str
    severity: str
    status: str
    reason: str
    sessions: list[str]


def rerun_cases(checks: Iterable[IssueCheckLike], new_issues: Iterable[Issue], *, suite: str) -> list[JUnitCase]:
    """Per old issue: reproduces fails, fixed passes, inconclusive is skipped with the reason; new issues fail."""
    out = []
    for c in checks:
        outcome: Outcome = {"reproduces": "failure", "fixed": "passed"}.get(c.status, "skipped")  # type: ignore[assignment]
        out.append(JUnitCase(classname=f"{suite}.issues", name=f"{c.id} {c.title}", outcome=outcome,
                             type=f"{c.severity} {c.status}", message=f"{c.status}: {one_line(c.reason, 600)}",
                             detail=f"{c.reason}\nre-run sessions: {', '.join(c.sessions[:20]) or 'none'}"))
    new = issue_cases(new_issues, suite=suite)
    for case in new:
        case.classname, case.message = f"{suite}.new_issues", f"new: {case.message}"
    return out + new


def comparison_cases(c: Comparison, *, suite: str) -> list[JUnitCase]:
    """A comparison as testcases: scorers (failure when worse with p < 0.05), flipped cases, issue changes."""
    out = []
    for s in c.scorers:
        case = JUnitCase(classname=f"{suite}.scorers", name=s.scorer,
                         message=f"{s.verdict}: {_pct(s.base_pass_rate)} -> {_pct(s.candidate_pass_rate)} over "
                                 f"{s.pairs} pair(s){'' if s.p_value is None else f', p={s.p_value:.3g}'}")
        if s.verdict == "worse":
            case.outcome, case.type = "failure", "regression"
            case.detail = (f"{case.message}; only base passed {s.passed_only_in_base}, only candidate passed "
                           f"{s.passed_only_in_candidate}; 95% interval of the change: {s.interval}")
        elif s.verdict == "not enough pairs":
            case.outcome = "skipped"
        out.append(case)
    for f in c.flipped.pass_to_fail:
        out.append(JUnitCase(classname=f"{suite}.flipped", name=_flip_name(f.case_id, f.repeat), outcome="failure",
                             type="pass_to_fail", message=f"passed in {c.base}, failed in {c.candidate}: "
                                                          f"{', '.join(f.failed) or 'failed'}",
                             detail=f"base session {f.base_session}\ncandidate session {f.candidate_session}"))
    for f in c.flipped.fail_to_pass:
        out.append(JUnitCase(classname=f"{suite}.flipped", name=_flip_name(f.case_id, f.repeat)))
    for label, changes, outcome in (("new", c.issues.new, "failure"), ("persisting", c.issues.persisting, "failure"),
                                    ("fixed", c.issues.fixed, "passed")):
        for i in changes:
            out.append(JUnitCase(classname=f"{suite}.issues", name=f"{i.id} {i.title}", outcome=outcome,
                                 type=f"{i.severity} {label}",
                                 message=f"{label} [{i.severity}] {i.title}: {i.base_sessions} session(s) in base, "
                                         f"{i.candidate_sessions} in candidate"))
    untested = c.left_out.get("untested", 0)
    if untested:
        out.append(JUnitCase(classname=f"{suite}.pairs", name="untested pairs", outcome="error", type="could_not_test",
                             message=f"{untested} pair(s) left out: a side could not test the agent"))
    return out


def comparison_suite(c: Comparison, *, timestamp: float | None = None) -> JUnitSuite:
    name = f"compare {c.base} {c.candidate}"
    suite = JUnitSuite(name=name, timestamp=time.time() if timestamp is None else timestamp,
                       cases=comparison_cases(c, suite=f"compare.{c.candidate}"),
                       properties={"base": c.base, "candidate": c.candidate, "regression": str(c.regression).lower(),
                                   "pairs": str(c.pairs)})
    suite.system_out = "\n".join([*(f"regression: {r}" for r in c.regression_reasons),
                                  *(f"improvement: {r}" for r in c.improvements), c.method])
    return suite


def _flip_name(case_id: str, repeat: int) -> str:
    return f"{case_id} repeat {repeat + 1}" if repeat else case_id


def _pct(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 100:.0f}%"


class RerunLike(Protocol):
    """A re-run's outcome (engine.pipeline.rerun.RerunOutcome)."""

    run_id: str
    rerun_of: str
    issues: Sequence[IssueCheckLike]
    new_issues: Sequence[Issue]


async def junit_xml(store: Store, *, run_id: str | None = None, session_ids: Sequence[str] | None = None,
                    scorers: Sequence[str] | None = None, issues: Sequence[Issue] = (),
                    rerun: RerunLike | None = None, comparison: Comparison | None = None) -> str:
    """The JUnit document of a command's results: the verdicts of `run_id` (or of `session_ids`, only
    `scorers`' when given), then `issues`, a re-run's checks or a comparison, each as its own testsuite."""
    suites = []
    if run_id or session_ids is not None:
        name = f"convsim.{run_id}" if run_id else "convsim.sessions"
        suites.append(await verdict_suite(store, name=name, run_id=run_id, session_ids=session_ids, scorers=scorers))
    if issues:
        name = f"convsim.{run_id}.issues"
        suites.append(JUnitSuite(name=name, timestamp=suites[0].timestamp if suites else time.time(),
                                 cases=issue_cases(issues, suite=f"convsim.{run_id}")))
    if rerun is not None:
        name = f"convsim.{rerun.run_id}.rerun"
        suites.append(JUnitSuite(name=name, timestamp=suites[0].timestamp if suites else time.time(),
                                 cases=rerun_cases(rerun.issues, rerun.new_issues, suite=f"convsim.{rerun.rerun_of}"),
                                 properties={"run_id": rerun.run_id, "rerun_of": rerun.rerun_of}))
    if comparison is not None:
        suites.append(comparison_suite(comparison))
    return render_junit(suites)
