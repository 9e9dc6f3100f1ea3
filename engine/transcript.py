"""Reading a transcript the same way in every stage: turn numbers, the rendered conversation.

The ground, not a stage: generation renders sessions it distils, the judges render the session
they score, issues quote turns. All of them must agree on what "turn 3" is.
"""

from __future__ import annotations

import re

from .models import Message, Session, TestCase

TOOL_RESULT_LIMIT = 500  # characters of a tool result or tool-call arguments shown in a rendering

# The offline simulated user's opening words when it asks again because a reply did not help. The
# offline judges read it: a retry is the user's doing, not a change of subject.
RETRY_PREFIX = "That doesn't really help."


def is_red_team(case: TestCase | None) -> bool:
    """A red-team case (expectations kind "adversarial"): it is won by the agent holding its line, so a
    decline is what it expects. The offline user and the offline judges read it the same way."""
    kind = (case.expectations or {}).get("kind") if case is not None else None
    return isinstance(kind, str) and kind.strip().lower() == "adversarial"


_TAGS = re.compile(r"<(/?)(conversation|criterion|goal|expectations|agent_description)\b", re.I)


def turn_of(messages: list[Message]) -> list[int]:
    """The 1-based turn of each message: its recorded turn, else counted from user messages.

    Messages before the first user message belong to turn 1 (imported transcripts carry no turns).
    """
    turns, current = [], 0
    for m in messages:
        if m.role == "user":
            current += 1
        turns.append(m.turn if m.turn is not None else max(current, 1))
    return turns


def turn_numbers(session: Session) -> list[int]:
    """The turn of each message of `session` (see `turn_of`)."""
    return turn_of(session.messages)


def n_turns(session: Session) -> int:
    return max(turn_numbers(session), default=0)


def neutralise(text: str) -> str:
    """Defuse our delimiter tags inside transcript text so a message cannot close the data block."""
    return _TAGS.sub(lambda m: f"‹{m.group(1)}{m.group(2)}", text)


def render_conversation(session: Session) -> str:
    """Each message once, one line each, tagged with its turn; tool traffic shown compactly."""
    lines = []
    for m, turn in zip(session.messages, turn_numbers(session)):
        if m.role == "system":
            continue
        if m.error:
            lines.append(f"[turn {turn}] ASSISTANT FAILED: {neutralise(m.error)}")
            continue
        if m.role == "tool":
            text = (m.content or "")[:TOOL_RESULT_LIMIT]
            lines.append(f"[turn {turn}] TOOL RESULT{f' ({m.name})' if m.name else ''}: {neutralise(text)}")
            continue
        for call in m.tool_calls or []:
            args = str(call.function.get("arguments", ""))[:TOOL_RESULT_LIMIT]
            lines.append(f"[turn {turn}] ASSISTANT CALLED {call.function.get('name')}({neutralise(args)})")
        if m.content:
            lines.append(f"[turn {turn}] {m.role.upper()}: {neutralise(m.content)}")
    return "\n".join(lines)
