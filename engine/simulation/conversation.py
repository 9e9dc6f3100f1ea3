"""The conversation loop: user turn, agent turn, each persisted as it completes, until a stop reason."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Awaitable, Callable

import anyio

from ..errors import AgentError, LLMError
from ..models import Message, Role, Session, StopReason, TestCase, add_usage
from .resume import resume_point
from .targets import Target
from .turns import SimulatorContext, UserTurn
from .user import SimulatedUser


@dataclass
class TurnEvent:
    """Emitted after each completed turn and when a session ends."""

    session_id: str
    turn: int
    finished: bool
    stop_reason: StopReason | None = None


class SessionRecorder:
    """Where a running session writes each message as it happens (the store, in practice)."""

    async def message(self, session: Session, message: Message) -> None: ...

    async def finished(self, session: Session) -> None: ...


@dataclass
class ConversationRunner:
    """Plays one simulated user against one target for one session, recording every turn."""

    target: Target
    user: SimulatedUser
    max_turns: int
    recorder: SessionRecorder
    on_event: Callable[[TurnEvent], Awaitable[None]] | None = None
    # Why the run was stopped, if it was stopped for a reason other than a cancel (a refused model key):
    # a session cut short then ends simulator_error with that reason instead of cancelled.
    stopped_by: Callable[[], BaseException | None] | None = None
    # Replaying a recorded session: its user messages are the case's scripted_turns, and the turns they are
    # sent at go into session.replayed_turns. When they run out the session ends replay_end, unless
    # continue_after_replay lets the simulated user take over (it sees the conversation so far).
    replay: bool = False
    continue_after_replay: bool = False

    async def run(self, session: Session) -> Session:
        case = session.test_case or TestCase(goal="(no goal)")
        try:
            await self._loop(session, case)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                stop = self.stopped_by() if self.stopped_by else None
                if session.stop_reason is not None:  # it had ended, but the cancel may have cut off its write
                    await self._finish(session, session.stop_reason, session.stop_detail)
                elif stop is not None:
                    await self._finish(session, StopReason.SIMULATOR_ERROR, f"stopped: {stop}")
                else:
                    await self._finish(session, StopReason.CANCELLED, "the run was cancelled")
            raise
        except Exception as e:  # a bug in a custom user class must not lose the session
            await self._finish(session, StopReason.SIMULATOR_ERROR, f"{type(e).__name__}: {e}")
        return session

    async def _loop(self, session: Session, case: TestCase) -> None:
        resume = resume_point(session.messages)  # turn 1 for a new session; a resumed one goes on where it stopped
        for turn in range(resume.turn, self.max_turns + 1):
            resend = resume.pending and turn == resume.turn  # its user message is stored, its reply is not
            ctx = SimulatorContext(case, session.id, list(session.messages), turn, self.max_turns)
            started = time.perf_counter()
            used_before = self.user.usage
            scripted = turn <= len(case.scripted_turns)
            if resend:
                move = UserTurn(message=session.messages[-1].content or "")
            elif scripted:
                move = UserTurn(message=case.scripted_turns[turn - 1])
                if self.replay and turn not in session.replayed_turns:  # a resumed turn is re-sent, not new
                    session.replayed_turns.append(turn)
            elif self.replay and not self.continue_after_replay:
                return await self._finish(session, StopReason.REPLAY_END,
                                          f"the {turn - 1} recorded user message(s) ran out")
            else:
                self.user.history_omitted = 0
                try:
                    move = await self.user.next_turn(ctx)
                except LLMError as e:
                    return await self._finish(session, StopReason.SIMULATOR_ERROR, str(e))
                if turn > 1 and move.goal_achieved:
                    return await self._finish(session, StopReason.GOAL_ACHIEVED, move.reason or None)
                if turn > 1 and move.end_conversation:
                    return await self._finish(session, StopReason.USER_ENDED, move.reason or None)
                if not move.message.strip():
                    return await self._finish(
                        session, StopReason.SIMULATOR_ERROR, "the simulated user produced an empty message",
                    )
            spent = self.user.usage.minus(used_before)
            user_msg = Message(
                role="user", content=move.message.strip(), turn=turn, scripted=scripted,
                latency_ms=round((time.perf_counter() - started) * 1000, 2),
                usage=spent if spent.calls or spent.cache_hits else None,
                history_omitted=None if scripted else (self.user.history_omitted or None),
            )
            if not resend:
                await self._record(session, user_msg, turn)
            try:
                reply = await self.target.respond(session.messages, session_id=session.id, context=case.context)
            except AgentError as e:
                await self._record(session, Message(role="assistant", content=None, turn=turn, error=str(e),
                                                    error_frames=e.frames or None), turn)
                return await self._finish(session, StopReason.AGENT_ERROR, str(e))
            for i, m in enumerate(reply.messages):
                m.turn = turn
                if i == len(reply.messages) - 1:
                    m.latency_ms = reply.latency_ms
                await self._record(session, m, turn)
            if self.on_event:
                await self.on_event(TurnEvent(session.id, turn, finished=False))
            if reply.empty:
                return await self._finish(session, StopReason.AGENT_EMPTY, "the agent returned an empty reply")
        await self._finish(session, StopReason.MAX_TURNS, f"stopped after {self.max_turns} turns")

    async def _record(self, session: Session, message: Message, turn: int) -> None:
        session.messages.append(message)
        session.turns = turn
        await self.recorder.message(session, message)

    async def _finish(self, session: Session, reason: StopReason, detail: str | None) -> None:
        session.stop_reason = reason
        session.stop_detail = detail
        session.finished_at = time.time()
        session.usage = add_usage({}, Role.USER.value, self.user.usage)
        await self.recorder.finished(session)
        if self.on_event:
            await self.on_event(TurnEvent(session.id, session.turns, finished=True, stop_reason=reason))
