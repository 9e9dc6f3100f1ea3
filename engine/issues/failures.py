"""Failures: what went wrong in a run, one record per (session, turn, kind), each with its signature.

A failure's signature names its root cause without the details that differ between sessions: for an agent
error, the exception type plus the message with ids and numbers masked; for an empty, slow or looping reply,
the kind; for a judge, the judge and its failure label. Issue ids are derived from signatures, so the same
failure gets the same id in every run.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Any

from ..judging import is_refusal
from ..models import Assessment, Session, StopReason
from ..simulation.role import OFF_GOAL, PERSONA_BREAK, SIMULATOR_PERSONA_BREAK, role_breaks  # noqa: F401 (re-export)
from ..transcript import turn_numbers

CRASH_SIGNALS = frozenset({"agent_error", "agent_empty"})
# The simulator failed, or its user broke role (wrote as the assistant, said it is a test, wandered off its goal).
HARNESS_SIGNALS = frozenset({"simulator_error", PERSONA_BREAK, OFF_GOAL})
QUOTE_LIMIT = 200
# Kinds whose signature is the kind itself (one root cause each, whatever the session).
KIND_SIGNALS = frozenset({"latency", "loop"})
LEAK_SIGNALS = frozenset({"conversational_safety", "prompt_leak"})
# Judges of the conversation's content, most specific first: when several fault the same agent turn, the
# most specific one names the issue and the others are "also seen" on it. The outcome judges come last.
FOLD_RANK = ("knowledge_retention", "role_adherence", "conversation_completeness", "dialogue_coherence")
OUTCOME_JUDGES = ("user_frustration", "goal_achievement")

EXCEPTION = re.compile(r"^\s*([A-Z][\w.]*)\s*:\s*(.*)$", re.DOTALL)
_HTTP = re.compile(r"\bHTTP (\d{3})\b")
_URL = re.compile(r"https?://\S+")
_QUOTED = re.compile(r"(?<!\w)'[^']*'(?!\w)|\"[^\"]*\"|‘[^’]*’|“[^”]*”")
HAS_DIGIT = re.compile(r"\b(?=[\w-]*\d)[\w-]+\b")
_PROMPT_TAGS = re.compile(r"<(/?)(sessions|failures|rules)\b", re.IGNORECASE)


@dataclass
class Failure:
    """One observed failure: a failing assessment, or a session that ended in agent_error / agent_empty /
    simulator_error (or whose simulated user broke persona)."""

    session_id: str
    signal: str  # scorer name, "agent_error" / "agent_empty", or a harness signal (HARNESS_SIGNALS)
    turn: int | None
    quote: str
    rationale: str
    value: Any = None
    also_seen: list[str] = field(default_factory=list)  # other signals this failure explains (same turn, or later)

    @property
    def kind(self) -> str:
        """What failed: "agent_error", "agent_empty", "latency", "loop", a harness signal, or "judge"."""
        if self.signal in CRASH_SIGNALS or self.signal in HARNESS_SIGNALS or self.signal in KIND_SIGNALS:
            return self.signal
        return "judge"

    @property
    def signature(self) -> str:
        """The root cause without what differs between sessions (see the module docstring); issue ids hash it."""
        return offline_key(self)

    def see(self, other: Failure) -> None:
        """`other` is explained by this failure: list its signals as "also seen", not as a failure of its own."""
        for sig in [other.signal, *other.also_seen]:
            if sig != self.signal and sig not in self.also_seen:
                self.also_seen.append(sig)




# --- failures -----------------------------------------------------------------------------------


def collect_failures(sessions: list[Session], assessments: list[Assessment]) -> list[Failure]:
    """Every failure, per session in order: crashes and harness failures first, then failing verdicts.

    A failing assessment is one with ``passed is False`` (each failing turn of a per-turn scorer counts);
    unscored ones are not failures. An agent crash always yields a failure, assessed or not. Assessments of
    sessions not in `sessions` are ignored.
    """
    by_session: dict[str, list[Assessment]] = {}
    for a in assessments:
        if a.passed is False:
            by_session.setdefault(a.session_id, []).append(a)
    out: list[Failure] = []
    for s in sessions:
        out += _session_failures(s)
        out += [_assessment_failure(a) for a in by_session.get(s.id, [])]
    return out


def cause_rank(f: Failure) -> tuple[int, int]:
    """The primary cause of a turn ranks first: crash > empty > latency > leak/safety > judges (specific first)."""
    if f.signal == "agent_error":
        return (0, 0)
    if f.signal == "agent_empty":
        return (1, 0)
    if f.signal == "latency":
        return (2, 0)
    if f.signal in LEAK_SIGNALS:
        return (3, 0)
    if f.signal in FOLD_RANK:
        return (4, FOLD_RANK.index(f.signal))
    if f.signal in OUTCOME_JUDGES:
        return (6, OUTCOME_JUDGES.index(f.signal))
    return (5, 0)


def untestable_sessions(sessions: list[Session], failures: list[Failure]) -> set[str]:
    """Sessions that cannot test the agent: the simulator erred, or the simulated user broke its role."""
    out = {s.id for s in sessions if s.stop_reason == StopReason.SIMULATOR_ERROR}
    return out | {f.session_id for f in failures if f.signal in HARNESS_SIGNALS}


def primary_causes(failures: list[Failure]) -> list[Failure]:
    """One failure per failing turn, its primary cause; the others become its `also_seen`.

    Per session: at each turn the highest-ranked failure (`cause_rank`) stays. A crash (or empty reply)
    explains everything after it and every untimed verdict of its session. An outcome judge
    (user_frustration, goal_achievement) is explained by the session's earliest other failure at or before
    its turn. Harness failures are kept as they are. Order of `failures` is kept.
    """
    by_session: dict[str, list[Failure]] = {}
    for f in failures:
        by_session.setdefault(f.session_id, []).append(f)
    keep: set[int] = set()
    for fs in by_session.values():
        keep |= {id(f) for f in fs if f.signal in HARNESS_SIGNALS}
        agent = [f for f in fs if f.signal not in HARNESS_SIGNALS]
        hosts: dict[int, Failure] = {}
        for f in sorted((f for f in agent if f.turn is not None), key=cause_rank):
            host = hosts.setdefault(f.turn, f)
            if host is not f:
                host.see(f)
        crash = next((h for _, h in sorted(hosts.items()) if h.signal in CRASH_SIGNALS), None)
        kept: list[Failure] = []
        for turn, h in sorted(hosts.items()):
            if crash is not None and h is not crash and turn > crash.turn:
                crash.see(h)
            elif h.signal in OUTCOME_JUDGES and kept:
                kept[0].see(h)
            else:
                kept.append(h)
        for f in (f for f in agent if f.turn is None):
            if crash is not None:
                crash.see(f)
            elif f.signal in OUTCOME_JUDGES and kept:
                kept[0].see(f)
            else:
                kept.append(f)
        keep |= {id(f) for f in kept}
    return [f for f in failures if id(f) in keep]


def _session_failures(s: Session) -> list[Failure]:
    numbered = list(zip(s.messages, turn_numbers(s)))
    out = []
    errored = [(m, t) for m, t in numbered if m.role == "assistant" and m.error]
    for m, turn in errored:
        out.append(Failure(s.id, "agent_error", turn, clip(m.error),
                           f"Turn {turn}: the agent call failed: {clip(m.error, 120)}"))
    if s.stop_reason == StopReason.AGENT_ERROR and not errored:
        detail = s.stop_detail or "the agent call failed"
        turn = s.turns or None
        out.append(Failure(s.id, "agent_error", turn, clip(detail), f"The agent call failed: {clip(detail, 120)}"))
    if s.stop_reason == StopReason.AGENT_EMPTY:
        turn = s.turns or max((t for _, t in numbered), default=0) or None
        asked = next((m.content for m, t in numbered if m.role == "user" and t == turn and m.content), "")
        out.append(Failure(s.id, "agent_empty", turn, clip(asked), f"Turn {turn}: the agent returned an empty reply."))
    if s.stop_reason == StopReason.SIMULATOR_ERROR:
        detail = s.stop_detail or "the simulated user failed"
        out.append(Failure(s.id, "simulator_error", None, clip(detail),
                           f"The simulated user failed after turn {s.turns}: {clip(detail, 120)}"))
    out += [Failure(s.id, b.signal, b.turn, clip(b.quote), b.rationale) for b in role_breaks(s)]
    return out


def _assessment_failure(a: Assessment) -> Failure:
    """The agent's side first: the first assistant evidence (a forgotten fact's source comes before it)."""
    ev = next((e for e in a.evidence if e.role == "assistant"), a.evidence[0] if a.evidence else None)
    turn = a.turn if a.turn is not None else (ev.turn if ev else None)
    return Failure(a.session_id, a.scorer, turn, clip(ev.quote if ev else ""), one_line(a.rationale), a.value)


# --- keys ---------------------------------------------------------------------------------------


def error_kind(message: str) -> str:
    """What failed, without the details: an exception type, "HTTP 500", "timeout", "unreachable" or "error"."""
    text = (message or "").strip()
    if m := _HTTP.search(text):
        return f"HTTP {m.group(1)}"
    if "did not reply within" in text:
        return "timeout"
    if text.startswith("could not reach"):
        return "unreachable"
    if m := EXCEPTION.match(text):
        return m.group(1).rsplit(".", 1)[-1]
    return "error"


def normalise_message(message: str) -> str:
    """The message with URLs, quoted values, numbers and ids replaced, lower-cased: equal for the same bug."""
    text = _URL.sub("<url>", message or "")
    text = _QUOTED.sub("<v>", text)
    text = HAS_DIGIT.sub("<n>", text)
    return " ".join(text.lower().split())[:160]


def offline_key(f: Failure) -> str:
    """The deterministic grouping key (and id signature) of a failure."""
    if f.signal == "agent_error":
        return f"agent_error|{error_kind(f.quote)}|{normalise_message(f.quote)}"
    if f.signal in CRASH_SIGNALS or f.signal in HARNESS_SIGNALS:
        return f.signal
    cue = failure_cue(f)
    return f"{f.signal}:{cue}" if cue else f.signal


def failure_cue(f: Failure) -> str | None:
    """A distinguishing cue within one scorer's failures; only refusals are told apart, and only for completeness."""
    if f.signal == "conversation_completeness":
        said = f.rationale.lower()
        if "declined" in said or "refus" in said or is_refusal(f.quote):
            return "refusal"
    return None


def issue_id(signature: str) -> str:
    return "ISS-" + hashlib.sha1(signature.encode("utf-8")).hexdigest()[:8]



@dataclass
class RunView:
    """What severity and wording need to know about the run as a whole."""

    sessions: list[Session]
    goal_failed: set[str]
    trials: dict[Any, int] = field(default_factory=dict)  # test case -> its sessions that tested the agent
    by_id: dict[str, Session] = field(init=False)
    order: dict[str, int] = field(init=False)
    cases: dict[Any, list[str]] = field(init=False)  # test case -> its sessions (repeats)

    def __post_init__(self) -> None:
        self.by_id = {s.id: s for s in self.sessions}
        self.order = {s.id: i for i, s in enumerate(self.sessions)}
        self.cases = {}
        for s in self.sessions:
            key = case_key(s)
            if key is not None:
                self.cases.setdefault(key, []).append(s.id)

    @property
    def total(self) -> int:
        return len(self.sessions)



def case_key(s: Session) -> Any:
    if s.case_index is not None:
        return (s.run_id, s.case_index)
    if s.test_case and s.test_case.id:
        return (s.run_id, s.test_case.id)
    return None




def one_line(text: str | None, limit: int = QUOTE_LIMIT) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip(text: str | None, limit: int = QUOTE_LIMIT) -> str:
    text = (text or "").strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."
