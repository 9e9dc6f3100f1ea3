"""Shrink each issue's reproducing case to the user turns the failure needs.

Delta debugging in its simplest, bounded form: drop one scripted user turn at a time, replay the
rest against the agent (no simulated user: only scripted turns are played), and keep the drop when
a failure with the issue's signature still happens. At most MAX_SHRINK_RUNS replays per issue.
Offline this costs nothing but agent calls, so it is on by default; with a model judge each replay
costs judge calls, so it is asked for (`shrink`).
"""

from __future__ import annotations

import logging

from ..issues import collect_failures, issue_signatures, primary_causes
from ..judging import Scorer
from ..llm import LLM
from ..models import Issue, Message, Session, TestCase
from ..ids import new_session_id
from ..simulation import ConversationRunner, SessionRecorder, SimulatedUser, Target
from .scoring import judge_session

log = logging.getLogger("convsim.pipeline")

MAX_SHRINK_RUNS = 8  # replays per issue, the first one included (it checks the whole repro reproduces)


class _Discard(SessionRecorder):
    """A replay keeps its transcript in memory only: shrinking must not add runs or sessions to the store."""

    async def message(self, session: Session, message: Message) -> None:
        return None

    async def finished(self, session: Session) -> None:
        return None


async def shrink_reproductions(issues: list[Issue], target: Target, user: SimulatedUser, scorers: list[Scorer],
                               judge_llm: LLM) -> list[Issue]:
    """The issues, each agent issue's reproduction shrunk where a shorter one still reproduces."""
    out = []
    for issue in issues:
        try:
            out.append(await _shrink(issue, target, user, scorers, judge_llm))
        except Exception:  # shrinking is a refinement: a failure here keeps the unshrunk repro
            log.exception("shrinking the reproduction of %s failed", issue.id)
            out.append(issue)
    return out


async def _shrink(issue: Issue, target: Target, user: SimulatedUser, scorers: list[Scorer], llm: LLM) -> Issue:
    case = issue.reproduction
    if issue.source != "agent" or case is None or len(case.scripted_turns) < 2 or not issue.signature:
        return issue
    turns = list(case.scripted_turns)
    runs = 1
    signatures = issue_signatures(issue)
    if not await _reproduces(case, signatures, target, user, scorers, llm):
        return issue  # the whole repro does not fail every time: nothing to shrink against
    i = 0
    while i < len(turns) and len(turns) > 1 and runs < MAX_SHRINK_RUNS:
        candidate = turns[:i] + turns[i + 1:]
        runs += 1
        if await _reproduces(case.model_copy(update={"scripted_turns": candidate}), signatures,
                             target, user, scorers, llm):
            turns = candidate
        else:
            i += 1
    if len(turns) == len(case.scripted_turns):
        return issue
    shrunk = case.model_copy(update={"scripted_turns": turns})
    return issue.model_copy(update={"reproduction": shrunk, "reproduction_shrunk_from": len(case.scripted_turns)})


async def _reproduces(case: TestCase, signatures: frozenset[str], target: Target, user: SimulatedUser,
                      scorers: list[Scorer], llm: LLM) -> bool:
    session = Session(id=new_session_id(), run_id="shrink", case_index=0, test_case=case, started_at=None)
    runner = ConversationRunner(target, user, len(case.scripted_turns), _Discard())
    await runner.run(session)
    assessments = []
    for scorer in scorers:
        assessments += await judge_session(session, scorer, llm)
    return any(f.signature in signatures for f in primary_causes(collect_failures([session], assessments)))
