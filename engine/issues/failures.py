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
from ..transcript import turn_numbers

CRASH_SIGNALS = frozenset({"agent_error", "agent_empty"})
HARNESS_SIGNALS = frozenset({"simulator_error", "simulator_persona_break"})
QUOTE_LIMIT = 200

# A simulated "user" message that reads like the assistant talking: the simulator lost its role.
SIMULATOR_PERSONA_BREAK = re.compile(
    r"^\W*(?:how (?:can|may) i (?:help|assist) you|what can i (?:do for you|help you with)"
    r"|i(?:'|’)?m an ai\b|i am an ai\b|as an? (?:ai|assistant|language model)\b|as your assistant\b"
    r"|i(?:'|’)?m here to (?:help|assist) you\b|is there anything else i can (?:help|assist) you with)",
    re.IGNORECASE,
)

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
    signal: str  # scorer name, or "agent_error" / "agent_empty" / "simulator_error" / "simulator_persona_break"
    turn: int | None
    quote: str
    rationale: str
    value: Any = None




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
    broke = next(((m, t) for m, t in numbered if m.role == "user" and not m.scripted
                  and SIMULATOR_PERSONA_BREAK.search(m.content or "")), None)
    if broke:
        m, turn = broke
        out.append(Failure(s.id, "simulator_persona_break", turn, clip(m.content),
                           f"Turn {turn}: the simulated user wrote as if it were the assistant."))
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
