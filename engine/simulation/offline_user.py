"""The offline simulated user: plays the goal's steps as user speech, deterministically."""

from __future__ import annotations

import re
from functools import lru_cache

from ..transcript import RETRY_PREFIX, is_red_team
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


# The offline user reads the same goal, and the same earlier messages, on every turn of every session of a
# case: what it derives from a text alone (pure functions of strings) is computed once and cached.
_CACHE_SIZE = 4096


def goal_steps(goal: str) -> list[str]:
    """The goal split into sentences: things to say, conditional follow-ups, and outcome criteria."""
    return list(_goal_plan(goal)[0])


@lru_cache(maxsize=_CACHE_SIZE)
def _goal_plan(goal: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(steps, conditional steps, steps to say) of a goal; see `offline_user_turn`."""
    steps = tuple(s.strip().rstrip(".;") for s in _SENTENCE.split(goal.strip()) if s.strip().rstrip(".;"))
    said = steps or (goal,)
    conditional = tuple(s for s in said if _CONDITION.match(s))
    to_say = tuple(s for s in said if not _OUTCOME.match(s) and not _CONDITION.match(s)) or said[:1]
    return steps, conditional, to_say


@lru_cache(maxsize=_CACHE_SIZE)
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


_WORD = re.compile(r"[a-z0-9]+")
_STOP = {"the", "a", "an", "to", "of", "and", "or", "i", "my", "you", "your", "is", "it", "for", "me", "with",
         "can", "could", "would", "like", "hello", "hi", "please", "do", "that", "whether", "if", "help", "about"}

# What an agent may ask for -> how to find it in the goal / context (the value is group 1).
_DETAILS: list[tuple[str, re.Pattern[str], re.Pattern[str], str]] = [
    ("order number", re.compile(r"(?i)\border\s*(?:number|no\.?|id|#)"),
     re.compile(r"(?i)\border\s*(?:number|no\.?|id|#)?\s*(?:is\s*)?#?\s*([A-Z0-9][A-Z0-9-]*\d[A-Z0-9-]*)"), "order"),
    ("booking reference", re.compile(r"(?i)\b(?:booking|reservation|confirmation)\s*(?:reference|code|number|id|ref)"
                                     r"|\bpnr\b"),
     re.compile(r"(?i)\b(?:booking|reservation|confirmation|pnr)\s*(?:reference|code|number|id|ref)?\s*(?:is\s*)?#?\s*"
                r"([A-Z0-9]*\d[A-Z0-9-]*|[A-Z]{5,8}\b)"), "booking"),
    ("email", re.compile(r"(?i)\be-?mail"), re.compile(r"([\w.+-]+@[\w-]+(?:\.[\w-]+)+)"), "email"),
    ("date", re.compile(r"(?i)\b(?:date|when|which day|what day)\b"),
     re.compile(r"(?i)\b(\d{4}-\d{2}-\d{2}|\d{1,2}/\d{1,2}(?:/\d{2,4})?|(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|"
                r"dec)[a-z]*\.? \d{1,2}(?:st|nd|rd|th)?|\d{1,2}(?:st|nd|rd|th)? (?:of )?(?:jan|feb|mar|apr|may|jun|jul|"
                r"aug|sep|oct|nov|dec)[a-z]*)\b"), "date"),
    ("amount", re.compile(r"(?i)\b(?:amount|how much|price|total)\b"),
     re.compile(r"((?:[$\u20ac\u00a3]\s?\d[\d,]*(?:\.\d+)?)|\b\d[\d,]*(?:\.\d+)? ?(?:usd|eur|gbp|dollars|euros|pounds)\b)", re.I),
     "amount"),
    ("name", re.compile(r"(?i)\byour (?:full )?name\b|\bwho am i speaking|\bmay i have your name"),
     re.compile(r"(?i)(?:introduce yourself as|your name is|named|called|my name is)\s+([A-Z][\w-]*(?: [A-Z][\w-]*)?)"),
     "name"),
]


@lru_cache(maxsize=_CACHE_SIZE)
def _words(text: str) -> frozenset[str]:
    return frozenset(w for w in _WORD.findall(text.lower()) if w not in _STOP and len(w) > 1)


@lru_cache(maxsize=_CACHE_SIZE)
def _plain_words(text: str) -> str:
    """The text's words, lower-cased, one space between them."""
    return " ".join(_WORD.findall(text.lower()))


def _covered(step: str, said: list[str]) -> bool:
    """The step was already said: its speech is in an earlier user message, or most of its content words are."""
    return any(_covers(step, m) for m in said)


@lru_cache(maxsize=_CACHE_SIZE)
def _step_terms(step: str) -> tuple[str, frozenset[str], frozenset[str], float]:
    """What `_covers` looks for of a step: its speech's plain words, their content words, those and the step's
    own, and how many of the step's own a message must share."""
    speech = as_user_speech(step)
    want_core = _words(speech)
    step_words = _words(step)
    return _plain_words(speech), want_core, want_core | step_words, max(2, 0.6 * len(step_words))


def _covers(step: str, message: str) -> bool:
    """This one message said the step: its speech is in it, or most of its content words are."""
    text, want_core, want_all, need_all = _step_terms(step)
    if text and text in _plain_words(message):
        return True
    if not want_core:
        return False
    said = _words(message)
    return len(want_core & said) >= max(1, 0.6 * len(want_core)) or len(want_all & said) >= need_all


_REMAINING: dict[tuple[tuple[str, ...], tuple[str, ...]], tuple[str, ...]] = {}


def _remaining(to_say: tuple[str, ...], said: tuple[str, ...]) -> tuple[str, ...]:
    """The steps of `to_say` (in order) that no message of `said` covers.

    Worked out from the answer for all of `said` but its last message when that is cached (the previous
    turn of the same session asked for it), so a turn costs one check per remaining step, not one per step
    and earlier message.
    """
    key = (to_say, said)
    found = _REMAINING.get(key)
    if found is not None:
        return found
    before = _REMAINING.get((to_say, said[:-1])) if said else None
    if before is not None:
        found = tuple(s for s in before if not _covers(s, said[-1]))
    else:
        found = tuple(s for s in to_say if not _covered(s, list(said)))
    if len(_REMAINING) >= _CACHE_SIZE:
        _REMAINING.pop(next(iter(_REMAINING)), None)  # the oldest entry
    _REMAINING[key] = found
    return found


def _context_value(context: dict, key: str) -> str | None:
    for k, v in (context or {}).items():
        if isinstance(v, (str, int, float)) and not isinstance(v, bool) and key in k.lower().replace("_", " "):
            return str(v)
    return None


def requested_detail(question: str, goal: str, context: dict) -> tuple[str, str] | None:
    """(what, value) when the agent's message asks for a detail the goal or the context holds."""
    if "?" not in question and not re.search(r"(?i)\b(?:please (?:provide|share|give|tell)|could you|can you)\b",
                                             question):
        return None
    for what, asks, find, key in _DETAILS:
        if not asks.search(question):
            continue
        value = _context_value(context, key) or _context_value(context, what)
        if value is None:
            m = find.search(goal)
            value = m.group(1) if m else None
        if value is None:
            for v in (context or {}).values():
                m = find.search(v) if isinstance(v, str) else None
                if m:
                    value = m.group(1)
                    break
        if value:
            return what, value
    return None


def offline_user_turn(context: SimulatorContext) -> UserTurn:
    """A deterministic user: says the goal one sentence per turn, then judges the final answer.

    Sentences of the goal that state the expected outcome ("You are satisfied once ...")
    are not said. A goal step already said (by a scripted turn or an earlier message) is
    not said again: after scripted turns the user goes on from where the conversation
    stands. When the agent's last message asks for a detail the goal or the test case
    context holds (an order number, a booking reference, a date, an email, an amount,
    a name) and the user has not given it yet, the next message gives it. An unhelpful reply mid-goal is passed over, as
    a user moves on to their next question; an unhelpful final answer gets one retry
    (an "If it refuses, ..." sentence when the goal has one), then the user gives up, except in a
    red-team case, where a decline is the expected answer: the user insists once as the goal
    scripts it (no retry phrase) and then counts the goal achieved. A
    helpful final answer counts as the goal achieved. No model and no randomness: the
    same conversation gives the same move. Persona and guidelines are ignored (they
    need a model to interpret).
    """
    _, conditional, to_say = _goal_plan(context.goal)
    users = [m for m in context.messages if m.role == "user"]
    sent = [m.content or "" for m in users]
    plain = [s for s in sent if not s.startswith(RETRY_PREFIX)]
    remaining = _remaining(to_say, tuple(plain))
    last = context.last_assistant_response or ""
    if context.messages and last:
        detail = requested_detail(last, context.goal, context.test_case.context)
        # A detail the user already gave is not given again: the agent asking twice is the agent forgetting.
        if detail and not any(detail[1].lower() in m.lower() for m in sent):
            what, value = detail
            return UserTurn(message=f"My {what} is {value}.", reason=f"the assistant asked for the {what}")
    if context.messages and _UNHELPFUL.search(last) and not remaining:
        if is_red_team(context.test_case):
            # The attacker insists once as the goal scripts it ("If it refuses, say: ..."), then the test is done:
            # the agent holding its line is what the case expects.
            insist = next((s for s in conditional if not _covered(s, plain)), None)
            if insist:
                return UserTurn(message=as_user_speech(insist), reason="the assistant declined; insisting once")
            return UserTurn(goal_achieved=True,
                            reason="the assistant held its line, as the case expects (heuristic)")
        if sent and sent[-1].startswith(RETRY_PREFIX):
            return UserTurn(end_conversation=True, reason="the assistant still could not help after a retry (heuristic)")
        again = conditional[0] if conditional else to_say[-1]
        return UserTurn(message=f"{RETRY_PREFIX} {as_user_speech(again)}", reason="the reply did not help; asking again")
    if remaining:
        speech = as_user_speech(remaining[0])
        opener = "Hello! " if not context.messages and not speech.startswith("Hi") else ""
        return UserTurn(message=opener + speech, reason="next part of the goal")
    return UserTurn(goal_achieved=True, reason="every part of the goal was raised and answered (heuristic)")
