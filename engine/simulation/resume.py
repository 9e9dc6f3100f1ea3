"""Where a stored conversation stands, so that an interrupted session can go on from its last stored turn.

A turn is stored message by message: the user's message, then the agent's reply messages (tool calls,
tool results, the final reply: the last one carries the reply's latency). A process killed mid-turn
leaves the last turn in one of these states, read by `resume_point`:

- complete: its final reply is stored; the session goes on with the next turn;
- pending: the user's message is stored without a (complete) reply; the stored user message is
  re-sent (never written twice) and any partial reply messages are dropped (`drop_from`);
- ended: the stored turn already ended the session (the agent failed, or replied empty), only its stop
  was not recorded; the session is finished with that reason and nothing is re-run.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models import Message, StopReason
from .targets import AgentReply


@dataclass
class ResumePoint:
    turn: int  # the turn to play next (1 for a session with no stored turn)
    pending: bool = False  # that turn's user message is stored: re-send it instead of writing a new one
    drop_from: int | None = None  # messages from this index on are a partial reply, to be discarded
    stop: StopReason | None = None  # the stored transcript already ended the session this way
    stop_detail: str | None = None


def resume_point(messages: list[Message]) -> ResumePoint:
    """Read the last stored turn of a transcript written by `ConversationRunner` (see the module doc)."""
    if not messages:
        return ResumePoint(turn=1)
    last_turn = max(m.turn or 0 for m in messages)
    user_at = next((i for i in range(len(messages) - 1, -1, -1)
                    if messages[i].role == "user" and (messages[i].turn or 0) == last_turn), None)
    if user_at is None:  # no user message in the last turn: nothing to re-send, go on after it
        return ResumePoint(turn=last_turn + 1)
    reply = messages[user_at + 1:]
    if not reply:
        return ResumePoint(turn=last_turn, pending=True)
    final = reply[-1]
    if final.role == "assistant" and final.error:
        return ResumePoint(turn=last_turn + 1, stop=StopReason.AGENT_ERROR, stop_detail=final.error)
    if final.latency_ms is None:  # the reply's last message was never written: discard the partial reply
        return ResumePoint(turn=last_turn, pending=True, drop_from=user_at + 1)
    if AgentReply(messages=reply, latency_ms=final.latency_ms).empty:
        return ResumePoint(turn=last_turn + 1, stop=StopReason.AGENT_EMPTY, stop_detail="the agent returned an empty reply")
    return ResumePoint(turn=last_turn + 1)
