"""Did the simulated user keep its role? Checks of a played session's own (non-scripted) user messages.

A session whose simulated user stopped playing the user cannot test the agent: it is "could not test",
never a pass and never an agent issue. Precision comes first: the offline user and a model user that keeps
to its case must never trip these checks, so each asks for plain evidence.

- persona break (`simulator_persona_break`): a message that reads like the assistant talking ("How can I
  help you?", "As an AI ..."), or that says the conversation is a test or a simulation, or that the writer
  is a simulated user or an AI playing one. A "this is a test" is not counted when the case itself speaks of
  tests (an adversarial case may tell the user to claim one).
- off goal (`simulator_off_goal`): OFF_GOAL_RUN consecutive user messages after the first, each with at least
  MIN_CONTENT_WORDS content words, none of which (lower-cased, stop words dropped, lightly stemmed) appears in
  the case (goal, persona, guidelines, context, expectations, scripted turns), in the conversation before the
  run began, or in the agent's reply the message answers. Short messages ("ok, thanks") never count, and end
  a run. Red-team cases (expectations kind "adversarial", or a case that speaks of jailbreaks, tricks or
  attacks) are not checked: their user switches tactics, and words, on purpose.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

from ..models import Session
from ..transcript import turn_numbers
from .turns import DEFAULT_PERSONA

PERSONA_BREAK = "simulator_persona_break"
OFF_GOAL = "simulator_off_goal"

# A simulated "user" message that reads like the assistant talking: the simulator lost its role.
SIMULATOR_PERSONA_BREAK = re.compile(
    r"^\W*(?:how (?:can|may) i (?:help|assist) you|what can i (?:do for you|help you with)"
    r"|i(?:'|’)?m an ai\b|i am an ai\b|as an? (?:ai|assistant|language model)\b|as your assistant\b"
    r"|i(?:'|’)?m here to (?:help|assist) you\b|is there anything else i can (?:help|assist) you with)",
    re.IGNORECASE,
)

# The simulated user saying what it is: a simulated user, an AI playing a user, a test or a simulation.
SELF_DISCLOSURE = re.compile(
    r"\bi(?:'|’)?m (?:just |only )?(?:an? )?(?:simulated|fake|test|virtual) (?:user|customer|person)\b"
    r"|\bi am (?:just |only )?(?:an? )?(?:simulated|fake|test|virtual) (?:user|customer|person)\b"
    r"|\bas (?:the|a|an) simulated (?:user|customer)\b"
    r"|\b(?:i(?:'|’)?m|i am) (?:an ai|a language model|a bot|an assistant) (?:that is |who is )?"
    r"(?:playing|pretending|simulating|role-?playing|acting)\b"
    r"|\b(?:playing|simulating|role-?playing) (?:the )?(?:role|part) of (?:a|an|the) (?:user|customer)\b"
    r"|\bthis (?:conversation |chat |whole thing )?(?:is|was) (?:just |only |all )?(?:an? )?"
    r"(?:test|simulation|simulated conversation|role-?play)\b"
    r"|\b(?:end(?:ing)? (?:of )?(?:the |this )?simulation|the simulation (?:is|has) (?:over|ended|complete))\b",
    re.IGNORECASE,
)
# A case that speaks of these may have the user say them on purpose (adversarial cases, a simulation app).
_DISCLOSURE_TOPIC = re.compile(r"\b(?:test\w*|simulat\w*|role-?play\w*|pretend\w*|fake|bot|ai)\b", re.IGNORECASE)

# A red-team case: its user switches tactics on purpose, so new words prove nothing.
_RED_TEAM = re.compile(r"\b(?:jailbreak\w*|red[- ]?team\w*|adversar\w*|attack\w*|trick\w*|manipulat\w*|inject\w*"
                       r"|social[- ]engineer\w*)", re.IGNORECASE)

OFF_GOAL_RUN = 2
MIN_CONTENT_WORDS = 4

_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)?")
_STOP = frozenset("""
a about above after again against all almost also am an and another any anyone anything anyway are around as
ask asked asking at away back be because been before being below between both but by can cannot could did do
does doing done down during each either else even ever every everyone everything few first for from further
get gets getting give go going gone good got great had has have having he hello her here hers hey hi him his
how however i if in into is it its itself just keep know last let like likely look lot made make many may maybe
me mean might mine more most much must my myself need needs never new next no nope nor not nothing now of off
oh ok okay on once one only or other others our ours out over own perfect please pretty quite rather really
right said same say says see seem seems she should since so some someone something soon sorry still such sure
tell than thank thanks that the their theirs them then there these they thing things think this those though
through to today too try two under until up us very want wants was way we well were what whatever when where
whether which while who whom whose why will wish with without wonder would yeah yes yet you your yours yourself
anybody actually already always often sometimes day days time times week bit lots kind sort
appreciate appreciated awesome cheers quick quickly helpful wonderful amazing fantastic excellent nice cool lovely
brilliant bye goodbye care glad happy fine alright understand understood question questions answer answers info
information detail details else assist assistance wondering curious instead wait hmm hold moment exactly
definitely probably example mind hear sounds sound noted clear clarify explain mention mentioned
""".split())
_SUFFIXES = ("ations", "ation", "ments", "ment", "ness", "ings", "ing", "ies", "ied", "edly", "ed", "es", "ers",
             "er", "ly", "s")


@dataclass(frozen=True)
class RoleBreak:
    """Where and how the simulated user left its role."""

    signal: str  # PERSONA_BREAK or OFF_GOAL
    turn: int
    quote: str
    rationale: str


def role_breaks(session: Session) -> list[RoleBreak]:
    """The session's role breaks, at most one per signal (its first), in turn order."""
    case_text = _case_text(session)
    out = [b for b in (_persona_break(session, case_text), _off_goal(session, case_text)) if b is not None]
    return sorted(out, key=lambda b: b.turn)


def _own_user_messages(session: Session) -> list[tuple[int, str]]:
    """(turn, text) of each user message the simulator wrote (not a scripted one)."""
    return [(t, m.content or "") for m, t in zip(session.messages, turn_numbers(session))
            if m.role == "user" and not m.scripted]


def _case_text(session: Session) -> str:
    case = session.test_case
    if case is None:
        return ""
    parts = [case.goal, case.persona or DEFAULT_PERSONA, *case.simulation_guidelines, *case.scripted_turns]
    for extra in (case.context, case.expectations):
        if extra:
            parts.append(json.dumps(extra, ensure_ascii=False, default=str))
    return "\n".join(parts)


def _played(session: Session) -> bool:
    """A session played from a test case; an imported conversation's users may be people, who may well say
    "this is a test"."""
    return session.test_case is not None and not session.test_case.goal.startswith("(imported")


def _persona_break(session: Session, case_text: str) -> RoleBreak | None:
    case_speaks_of_tests = not _played(session) or bool(_DISCLOSURE_TOPIC.search(case_text))
    for turn, text in _own_user_messages(session):
        if SIMULATOR_PERSONA_BREAK.search(text):
            return RoleBreak(PERSONA_BREAK, turn, text, f"Turn {turn}: the simulated user wrote as if it were the "
                                                        "assistant.")
        if not case_speaks_of_tests and SELF_DISCLOSURE.search(text):
            return RoleBreak(PERSONA_BREAK, turn, text, f"Turn {turn}: the simulated user said it is a simulated "
                                                        "user, or that the conversation is a test or a simulation.")
    return None


def _off_goal(session: Session, case_text: str) -> RoleBreak | None:
    case = session.test_case
    if case is None or not _played(session):  # an imported conversation has no goal to keep to
        return None
    if str(case.expectations.get("kind", "")).lower() == "adversarial" or _RED_TEAM.search(case_text):
        return None  # a red-team user changes tactics (and words) on purpose
    case_words = content_words(case_text)
    before: set[str] = set()  # every word of the conversation so far
    anchor: set[str] = set()  # the words before the current run of off-goal messages began
    run: list[tuple[int, str]] = []
    last_reply = ""
    users = 0
    for m, turn in zip(session.messages, turn_numbers(session)):
        text = m.content or ""
        if m.role == "user":
            users += 1
            words = content_words(text)
            if users == 1 or m.scripted or len(words) < MIN_CONTENT_WORDS or words & content_words(last_reply):
                run = []
            else:
                if not run:
                    anchor = set(before)
                if words & (case_words | anchor):
                    run = []
                else:
                    run.append((turn, text))
                    if len(run) >= OFF_GOAL_RUN:
                        start, quote = run[0]
                        return RoleBreak(OFF_GOAL, start, quote,
                                         f"From turn {start} the simulated user wandered off its goal: "
                                         f"{len(run)} messages in a row share no word with the test case, the "
                                         "conversation before, or the agent's replies.")
        elif m.role == "assistant":
            last_reply = text
        before |= content_words(text)
    return None


@lru_cache(maxsize=4096)  # the same case text and messages are read for every check, session and repeat
def content_words(text: str) -> frozenset[str]:
    """Lower-cased words without stop words, lightly stemmed and cut to 5 letters (so near forms match)."""
    out = set()
    for w in _TOKEN.findall(text.lower().replace("’", "'")):
        w = w.split("'")[0]
        if len(w) < 3 or w in _STOP:
            continue
        out.add(_stem(w)[:5])
    return frozenset(out)


@lru_cache(maxsize=16384)
def _stem(word: str) -> str:
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)] + ("y" if suffix in ("ies", "ied") else "")
    return word
