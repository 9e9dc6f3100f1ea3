"""Pieces every job shares: progress reports, resource URIs, option checks."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable, Iterable

from ..errors import InvalidOption
from ..models import Assessment, UntestedSession
from ..settings import env_bool
from ..store import Store
from ..text import one_line

log = logging.getLogger("convsim.pipeline")

if TYPE_CHECKING:  # the MCP server imports this module at start (Progress): the model layer can wait
    from ..llm import LLM

MAX_TURNS_LIMIT = 100
MAX_CONCURRENCY = 2000  # conversations (or judge calls) at once; each may hold an agent and a model connection
MAX_REPEATS = 50
FILES_PER_SESSION = 3  # sockets one running conversation may hold: its HTTP agent's (with pool slack), its model call's
FILES_SPARE = 256  # the database, its WAL, logs, the server's own transport


@dataclass
class Progress:
    """How far a job is: `done` of `total` steps (a simulation's step is a turn), and what just happened.

    While conversations play, the session counts are set too: finished of all, and how many of the finished
    ones failed (the agent failed, or the simulated user could not test it), for a progress bar to show."""

    done: int
    total: int
    message: str
    sessions_done: int | None = None
    sessions_total: int | None = None
    failures: int | None = None


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


def ensure_open_files(concurrency: int) -> int:
    """Raise this process's soft limit on open files (RLIMIT_NOFILE) so `concurrency` conversations can each
    hold their sockets: a common default of 1,024 refuses the sockets of a 1,000-conversation run halfway.
    Never above the hard limit (a warning says what to raise when that is too low). Returns the soft limit."""
    try:
        import resource
    except ImportError:  # not POSIX: nothing to raise
        return -1
    need = concurrency * FILES_PER_SESSION + FILES_SPARE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return soft
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:
        log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, e)
        return soft
    if target < need:
        log.warning("concurrency %d may need %d open files; the hard limit is %d (raise it with ulimit -Hn)",
                    concurrency, need, hard)
    return target


def cache_enabled(cache: bool | None) -> bool:
    """The job's `cache` option, else CONVSIM_CACHE (default off). Raises InvalidOption for a non-boolean."""
    if cache is None:
        return env_bool("CONVSIM_CACHE")
    if not isinstance(cache, bool):
        raise InvalidOption(f"cache must be true or false, got {cache!r}")
    return cache


def with_cache(llm: LLM, store: Store, enabled: bool) -> LLM:
    """`llm` behind the store's response cache when `enabled` (the offline backend never is: see llm/cache.py)."""
    from ..llm import cached

    return cached(llm, store) if enabled else llm


def sampling_options(llm: LLM, enabled: bool) -> dict[str, object]:
    """What a run records of how its model calls were made: temperature, seed, and whether they were cached."""
    return {"temperature": llm.temperature, "seed": llm.seed, "cache": enabled}


class UntestedTally:
    """The sessions that could not test the agent, counted over streams of sessions and verdicts.

    A session could not be tested when the simulated user failed (`simulator_error`), broke its role
    (its verdicts say `error_kind == "simulator"`), or a judge's model could not give a verdict
    (`error_kind == "model"`). None of these is a pass or an agent issue.
    Keeps the ids (to count each session once) and the first `limit` reasons.
    """

    def __init__(self, limit: int = 20):
        self.limit = limit
        self._ids: set[str] = set()
        self.listed: list[UntestedSession] = []

    @property
    def count(self) -> int:
        return len(self._ids)

    def _note(self, session_id: str, reason: str) -> None:
        if session_id not in self._ids:
            self._ids.add(session_id)
            if len(self.listed) < self.limit:
                self.listed.append(UntestedSession(session_id=session_id, reason=reason))

    def add_simulator_errors(self, rows: Iterable[tuple[str, str | None]]) -> None:
        """(session id, stop detail) of sessions that ended simulator_error."""
        for session_id, detail in rows:
            self._note(session_id, f"the simulated user failed: {one_line(detail or 'no detail', 200)}")

    def add_verdicts(self, assessments: Iterable[Assessment]) -> None:
        for a in assessments:
            if a.error_kind == "model":
                self._note(a.session_id, f"judge {a.scorer} could not give a verdict: {one_line(a.error, 200)}")
            elif a.error_kind == "simulator":
                why = (a.error or "").removeprefix("not judged: ")
                self._note(a.session_id, f"the simulated user broke its role: {one_line(why, 200)}")
