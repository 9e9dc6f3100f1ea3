"""Pieces every job shares: progress reports, resource URIs, option checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable

from ..errors import InvalidOption

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
