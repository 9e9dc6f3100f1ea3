"""The offline simulated user: plays the goal's steps as user speech, deterministically."""

from __future__ import annotations

import re

from ..transcript import RETRY_PREFIX
from .turns import SimulatorContext, UserTurn

_SENTENCE = re.compile(r"(?<=[.!?;])\s+")


_UNHELPFUL = re.compile(
    r"\b(sorry|can(?:'|no)t|cannot|unable|not able|don'?t know|do not know|no idea|unfortunately)\b", re.I
)


_OUTCOME = re.compile(r"(?i)^(?:you(?:'re| are) (?:satisfied|done|happy)|you expect|the assistant should|success\b)")


_CONDITION = re.compile(r"(?i)^(?:if|when|once|after) (?:it|the assistant|they)\b[^,]*,\s*")


_PRONOUNS = [
    (r"\byourself\b", "myself"), (r"\byour\b", "my"), (r"\byours\b", "mine"), (r"\byou\b", "I"),
    (r"\bthe assistant\b", "you"), (r"\bthe agent\b", "you"),
]


def goal_steps(goal: str) -> list[str]:
    """The goal split into sentences: things to say, conditional follow-ups, and outcome criteria."""
    return [s.strip().rstrip(".;") for s in _SENTENCE.split(goal.strip()) if s.strip().rstrip(".;")]


def as_user_speech(step: str) -> str:
    """Turn one goal sentence ('Ask whether the assistant remembers your name') into a user message."""
    text = _CONDITION.sub("", step.strip())
    m = re.match(r"(?i)^(?:first,?\s*|then,?\s*|later,?\s*|finally,?\s*)?introduce yourself as (\w[\w-]*)", text)
    if m:
        return f"Hi, my name is {m.group(1)}."
    m = re.search(r"(?i)\bsay(?:ing)?(?: that)?:?\s+(.+)", text)
    if m:
        said = m.group(1).strip().strip("'\"")
        return said[0].upper() + said[1:] + ("" if said.endswith(("?", "!", ".")) else ".")
    text = re.sub(r"(?i)^(?:first|then|later|finally|also)\b,?\s*", "", text)
    text = re.sub(r"(?i)^(?:remind|tell) (?:it|the assistant) (?:that )?|^point out (?:that )?", "", text)
    for pattern, repl in _PRONOUNS:
        text = re.sub(pattern, repl, text, flags=re.I)
    text = re.sub(r"\bit can\b", "you can", text)
    m = re.match(r"(?i)^ask (?:whether|if) you (can|could|will|would|do|does|are|is|have|has) (.+)", text)
    if m:
        aux = {"does": "do", "is": "are", "has": "have"}.get(m.group(1).lower(), m.group(1).lower())
        return f"{aux.capitalize()} you {m.group(2)}?"
    m = re.match(r"(?i)^ask (?:whether|if) you ((?:still|really|also|actually) )?(\w+) (.+)", text)
    if m:
        verb = m.group(2)
        verb = verb[:-1] if verb.endswith("s") and not verb.endswith("ss") else verb
        return f"Do you {m.group(1) or ''}{verb} {m.group(3)}?"
    m = re.match(r"(?i)^ask (?:me |you )?(?:whether|if) (.+)", text)
    if m:
        return f"Can you tell me whether {m.group(1)}?"
    m = re.match(r"(?i)^ask (?:you|me) to (.+)", text)
    if m:
        return f"Could you {m.group(1)}?"
    m = re.match(r"(?i)^ask (?:you |about |for )?(.+)", text)
    if m:
        return f"Could you help me with {m.group(1)}?"
    if re.match(r"(?i)^(i|my|i'm|we|order|it)\b", text) or step.strip() != _CONDITION.sub("", step.strip()):
        return text[0].upper() + text[1:] + "."
    return f"I'd like to {text[0].lower() + text[1:]}."


def offline_user_turn(context: SimulatorContext) -> UserTurn:
    """A deterministic user: says the goal one sentence per turn, then judges the final answer.

    Sentences of the goal that state the expected outcome ("You are satisfied once ...")
    are not said. An unhelpful reply mid-goal is passed over, as a user moves on to
    their next question; an unhelpful final answer gets one retry (an "If it refuses,
    ..." sentence when the goal has one), then the user gives up. A helpful final
    answer counts as the goal achieved. No model and no
    randomness: the same conversation gives the same move. Persona and guidelines are
    ignored (they need a model to interpret).
    """
    steps = goal_steps(context.goal) or [context.goal]
    conditional = [s for s in steps if _CONDITION.match(s)]
    to_say = [s for s in steps if not _OUTCOME.match(s) and not _CONDITION.match(s)] or steps[:1]
    sent = [m.content or "" for m in context.messages if m.role == "user" and not m.scripted]
    said = sum(1 for s in sent if not s.startswith(RETRY_PREFIX))
    last = context.last_assistant_response or ""
    if context.messages and _UNHELPFUL.search(last) and said >= len(to_say):
        if sent and sent[-1].startswith(RETRY_PREFIX):
            return UserTurn(end_conversation=True, reason="the assistant still could not help after a retry (heuristic)")
        again = conditional[0] if conditional else to_say[max(said - 1, 0)]
        return UserTurn(message=f"{RETRY_PREFIX} {as_user_speech(again)}", reason="the reply did not help; asking again")
    if said < len(to_say):
        speech = as_user_speech(to_say[said])
        opener = "Hello! " if not context.messages and not speech.startswith("Hi") else ""
        return UserTurn(message=opener + speech, reason="next part of the goal")
    return UserTurn(goal_achieved=True, reason="every part of the goal was raised and answered (heuristic)")
