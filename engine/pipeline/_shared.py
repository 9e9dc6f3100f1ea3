"""Pieces every job shares: progress reports, resource URIs, option checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable

from ..errors import InvalidOption
from ..models import Assessment, Session, StopReason, UntestedSession
from ..text import one_line

MAX_TURNS_LIMIT = 100
MAX_CONCURRENCY = 256
MAX_REPEATS = 50


@dataclass
class Progress:
    done: int
    total: int
    message: str


ProgressFn = Callable[[Progress], Awaitable[None]]


def run_uri(run_id: str) -> str:
    return f"convsim://runs/{run_id}"


def session_uri(run_id: str, session_id: str) -> str:
    return f"convsim://runs/{run_id}/sessions/{session_id}"


def scores_uri(run_id: str) -> str:
    return f"convsim://runs/{run_id}/scores"


def check_range(name: str, value: int, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidOption(f"{name} must be an integer from {low} to {high}, got {value!r}")


def untested_sessions(sessions: list[Session], assessments: list[Assessment],
                      limit: int = 20) -> tuple[int, list[UntestedSession]]:
    """How many sessions could not test the agent, and the first `limit` of them with the reason.

    A session could not be tested when the simulated user failed (`simulator_error`) or a judge's
    model could not give a verdict (`error_kind == "model"`). Neither is a pass or an agent issue.
    """
    reasons: dict[str, str] = {}
    for s in sessions:
        if s.stop_reason == StopReason.SIMULATOR_ERROR:
            reasons[s.id] = f"the simulated user failed: {one_line(s.stop_detail or 'no detail', 200)}"
    for a in assessments:
        if a.error_kind == "model" and a.session_id not in reasons:
            reasons[a.session_id] = f"judge {a.scorer} could not give a verdict: {one_line(a.error, 200)}"
    listed = [UntestedSession(session_id=sid, reason=why) for sid, why in list(reasons.items())[:limit]]
    return len(reasons), listed
