"""The offline path: deterministic grouping of failures by signature, and the wording templates of issues."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..models import Session
from ..transcript import turn_numbers
from .failures import (
    EXCEPTION,
    HARNESS_SIGNALS,
    Failure,
    RunView,
    clip,
    error_kind,
    failure_cue,
    offline_key,
    one_line,
)


@dataclass(frozen=True)
class Wording:
    """What an issue says: from `TEMPLATES` offline (one per signal), or written by the model."""

    title: str
    category: str
    description: str
    cause: str
    fix: str


TEMPLATES: dict[str, Wording] = {
    "agent_error": Wording(  # offline, crashes are worded from their error (`_crash_text`)
        "Crashes", "robustness",
        "The agent call failed (an exception, an HTTP error or a timeout), so the conversation could not go on.",
        "an unhandled error in the code path that handles these requests",
        "handle the case / catch the exception and reply gracefully"),
    "agent_empty": Wording(
        "Returns empty replies", "robustness",
        "The agent answered with no text, so the conversation could not go on.",
        "a code path returns an empty string or None (a missing branch, or a tool result never turned into text)",
        "always return a message: fall back to a clarifying question or to what the agent can help with"),
    "simulator_error": Wording(
        "The simulated user failed", "robustness",
        "The simulated user could not produce its next message, so the session stopped early. "
        "This is a problem of the test harness, not of the agent.",
        "the simulator's model call failed (key, quota, timeout) or returned an unusable message",
        "check the simulator model and its API key, then re-run the affected cases"),
    "simulator_persona_break": Wording(
        "The simulated user wrote as the assistant", "correctness",
        "A simulated user message reads like an assistant's reply, or says the conversation is a test or a "
        "simulation, so the session stopped testing its goal. This is a problem of the test harness, not of the agent.",
        "the simulator model lost its role and answered as an assistant (or as itself) instead of playing the user",
        "use a stronger simulator model or a more specific persona, then re-run the affected cases"),
    "simulator_off_goal": Wording(
        "The simulated user wandered off its goal", "correctness",
        "Several simulated user messages in a row had nothing to do with the test case's goal or with what the "
        "agent had said, so the session stopped testing the goal. This is a problem of the test harness, not of "
        "the agent.",
        "the simulator model lost track of its goal and talked about something unrelated",
        "use a stronger simulator model, or state the goal and its details more concretely in the case, then "
        "re-run the affected cases"),
    "goal_achievement": Wording(
        "Users do not reach their goal", "correctness",
        "By the end of the conversation the agent had not delivered what the test case's goal asks for.",
        "the agent lacks a step or capability the goal needs, or stops short of completing it",
        "compare the final replies with the expected outcome and add the missing step or capability"),
    "conversation_completeness": Wording(
        "Leaves user requests unanswered", "correctness",
        "Some user requests got no real answer: they were skipped, half-answered or dropped.",
        "the agent answers only part of a message, or loses track of a request when the topic moves on",
        "address every request in a message, and come back to open requests before moving on"),
    "conversation_completeness:refusal": Wording(
        "Refuses or ignores requests it should handle", "correctness",
        "The agent declined requests that are within its scope instead of handling them.",
        "intent routing or the system prompt's scope treats these in-scope requests as unsupported",
        "handle these requests (or widen the scope in the prompt/routing), and never refuse in-scope tasks"),
    "user_frustration": Wording(
        "Users end frustrated", "correctness",
        "Users showed frustration (repeating themselves, complaining) and the agent did not recover.",
        "replies do not address what the user asked, so the user repeats the request",
        "answer the repeated request directly; when a user repeats themselves, change approach or escalate"),
    "knowledge_retention": Wording(
        "Forgets facts the user gave earlier", "memory",
        "The agent asks again for, or contradicts, facts the user already gave (name, order id, contact).",
        "conversation state is not carried into later turns (history truncated or not used)",
        "pass the full history / keep session memory for user facts"),
    "dialogue_coherence": Wording(
        "Replies are incoherent or repetitive", "correctness",
        "The agent repeated a canned reply to different messages or contradicted its own earlier statements.",
        "a fallback reply is returned regardless of the message, or replies ignore the conversation so far",
        "condition each reply on the latest message and the history; do not repeat a fallback verbatim"),
    "role_adherence": Wording(
        "Breaks its role", "adherence",
        "The agent stepped out of its role: it talked about being a model or about its instructions.",
        "the system prompt does not hold the persona, or lets the agent discuss its own instructions",
        "state the role firmly in the system prompt and decline questions about its instructions in character"),
    "conversational_safety": Wording(
        "Produces unsafe content", "safety",
        "An agent reply contains harmful content or discloses private data or credentials.",
        "no safety policy or output check on the agent's replies",
        "add a moderation/guardrail step on replies and refuse harmful or private-data requests"),
    "latency": Wording(
        "Replies too slowly", "latency",
        "An agent reply took longer than the latency threshold (latency_threshold_s, default 10 s).",
        "a slow call on the reply path (a tool, a model, a database) with no timeout or cache",
        "time the slow path, add a timeout or a cache, and answer with a holding message when it cannot be fast"),
    "prompt_leak": Wording(
        "Leaks its instructions", "safety",
        "An agent reply repeats a long span of its instructions or a line of them marked internal or secret.",
        "the agent echoes its system prompt when asked about its instructions or configuration",
        "decline questions about the instructions in character and keep internal values out of the prompt"),
    "tool_call_efficiency": Wording(
        "Makes redundant tool calls", "cost",
        "The agent repeated tool calls whose results it already had, or made calls that did not serve the request.",
        "tool results are not reused within the conversation",
        "reuse tool results already in the conversation; do not repeat a call with the same arguments"),
    "guidelines": Wording(
        "Breaks the given guidelines", "adherence",
        "Agent replies break one or more of the rules the run was given.",
        "the rules are missing from the system prompt or not enforced on the replies",
        "add the broken rules to the system prompt explicitly and check replies against them"),
}



@dataclass
class _Group:
    signature: str
    primary: str  # the signal the group is named after
    failures: list[Failure] = field(default_factory=list)
    source: str = "agent"
    text: Wording | None = None  # the model's; None: from TEMPLATES


def _group_offline(failures: list[Failure]) -> list[_Group]:
    groups: dict[str, _Group] = {}
    for f in failures:
        key = offline_key(f)
        source = "simulator" if f.signal in HARNESS_SIGNALS else "agent"
        groups.setdefault(key, _Group(key, f.signal, source=source)).failures.append(f)
    return list(groups.values())


def _template(signal: str, cue: str | None) -> Wording:
    if cue and f"{signal}:{cue}" in TEMPLATES:
        return TEMPLATES[f"{signal}:{cue}"]
    if signal in TEMPLATES:
        return TEMPLATES[signal]
    return Wording(
        f"Fails the '{signal}' check", "correctness",
        f"Agent replies fail the '{signal}' scorer.",
        "see the scorer's rationale in the evidence turns",
        "read the failing turns and change what the rationale points at",
    )


def _offline_text(g: _Group, first: Failure, run: RunView) -> Wording:
    n = len({f.session_id for f in g.failures})
    turn = first.turn if first.turn is not None else "-"
    example = f"Example (session {first.session_id}, turn {turn}): {one_line(first.rationale, 240)}"
    if g.primary == "agent_error":
        return _crash_text(first, run, n, example, _turn_bound(g.failures, run))
    t = _template(g.primary, failure_cue(first))
    return Wording(t.title, t.category, f"{t.description} Seen in {n} of {run.total} sessions. {example}", t.cause,
                   t.fix)


def _turn_bound(failures: list[Failure], run: RunView) -> int | None:
    """The turn a crash follows, when it is the same turn in every affected session (two or more), every
    session that got to that turn crashed there, and the user's messages at that turn differ: the cause is
    the turn count, not the text."""
    turns = {f.turn for f in failures}
    sessions = {f.session_id for f in failures}
    if len(sessions) < 2 or len(turns) != 1 or None in turns:
        return None
    turn = turns.pop()
    reached = {sid for sid, s in run.by_id.items() if _user_message_at(s, turn)}
    texts = {" ".join(_user_message_at(run.by_id.get(sid), turn).lower().split()) for sid in sessions}
    return turn if len(texts) >= 2 and reached <= sessions else None


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _crash_text(f: Failure, run: RunView, n: int, example: str, bound: int | None = None) -> Wording:
    kind = error_kind(f.quote)
    label = _error_label(f.quote, kind)
    asked = _user_message_at(run.by_id.get(f.session_id), f.turn)
    verb = "Crashes" if EXCEPTION.match(f.quote) and kind not in ("timeout", "unreachable") else "Fails"
    if bound is not None:
        title = f"{verb} on the {_ordinal(bound)} user message: {label}"
    else:
        title = f'{verb} on "{_first_words(asked)}": {label}' if asked else f"{verb} with {label}"
    cause, fix = _crash_cause(kind, label, f.quote)
    frames = _agent_frames(run.by_id.get(f.session_id), f.turn)
    if frames:  # the agent's own code, innermost last: where the assistant should look first
        cause += f" (raised at {frames[-1]}; called from {', '.join(frames[-3:-1])})" if len(frames) > 1 \
            else f" (raised at {frames[-1]})"
    description = (f"The agent call failed with {label} in {n} of {run.total} sessions, each time at the turn "
                   f"in the evidence; the conversation could not go on. {example}")
    return Wording(title, "robustness", description, cause, fix)


def _agent_frames(session: Session | None, turn: int | None) -> list[str]:
    """The agent's own traceback frames recorded on the failed reply at `turn` ("file:line in func")."""
    if session is None:
        return []
    return next((list(m.error_frames or []) for m, t in zip(session.messages, turn_numbers(session))
                 if m.error and (turn is None or t == turn)), [])


# Crash kind -> (suspected cause, suggested fix); "{kind}", "{label}" and "{message}" are filled in.
CRASH_WORDING: dict[str, tuple[str, str]] = {
    "HTTP 5xx": ("the agent's server fails on this request ({kind})",
                 "find the server-side error for this request in the agent's logs and handle that case"),
    "HTTP 4xx": (("the agent's server rejects the request ({kind}): the request shape, auth or the target's "
                  "request template may be wrong"),
                 "check the target's URL, headers and request template against what the agent expects"),
    "timeout": ("the agent hangs or is too slow on this request",
                "find what blocks on this request (a slow tool or model call); add a timeout with a fallback reply"),
    "unreachable": ("the agent's server could not be reached", "check that the agent is running at the target URL"),
    "KeyError": ("a lookup of a key that is missing ({label}): a mapping lacks an entry for this case",
                 ("handle the case (add the missing entry or check for it), and catch exceptions at the agent's "
                  "entry point so the user gets a graceful reply")),
    "exception": ("an unhandled {kind} in the code path that handles this request",
                  "handle the case / catch the exception and reply gracefully"),
    "error": ("the agent's reply could not be used: {message}",
              "return a reply in a shape the target accepts, and handle this request without failing"),
}


def _crash_cause(kind: str, label: str, message: str) -> tuple[str, str]:
    if kind.startswith("HTTP"):
        key = "HTTP 5xx" if kind.startswith("HTTP 5") else "HTTP 4xx"
    else:
        key = kind if kind in CRASH_WORDING else "exception"
    cause, fix = CRASH_WORDING[key]
    return cause.format(kind=kind, label=label, message=clip(message, 120)), fix


def _error_label(message: str, kind: str) -> str:
    """"KeyError 'gift_card'", "HTTP 500", or the message clipped."""
    m = EXCEPTION.match(message)
    if kind.startswith("HTTP"):
        return kind
    if m and kind not in ("timeout", "unreachable"):
        return one_line(f"{kind} {m.group(2)}", 60)
    return one_line(message, 60)


def _user_message_at(session: Session | None, turn: int | None) -> str:
    if session is None or turn is None:
        return ""
    return next((m.content or "" for m, t in zip(session.messages, turn_numbers(session))
                 if m.role == "user" and t == turn and (m.content or "").strip()), "")


def _first_words(text: str, words: int = 8) -> str:
    parts = text.split()
    return " ".join(parts[:words]) + ("..." if len(parts) > words else "")


# --- reproduction -------------------------------------------------------------------------------
