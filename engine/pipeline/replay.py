"""Re-testing a new version on an earlier run's scenarios: `from_run` with mode `resimulate` or `replay`.

    source = await load_from_run(store, "run-...", mode="replay")
    source.cases          # the earlier run's test cases: same ids and indexes, so sessions pair up later
    source.recorded       # (case index, repeat) -> that session's user messages, in order (replay only)

`resimulate` plays new simulated users on the same cases. `replay` sends each recorded session's
user messages verbatim, in order, as the case's scripted turns (the mechanism reproducing cases
use); the new session keeps the recorded one's case index and repeat. When they run out first,
the session ends `replay_end`, or, with `continue_after_replay`, the simulated user goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidOption, NotFound
from ..ids import check_run_id
from ..models import AgentProfile, RunStatus, TestCase
from ..store import Store
from ._shared import MAX_REPEATS

MODES = ("resimulate", "replay")


@dataclass
class FromRun:
    """What a new run takes from an earlier one."""

    run_id: str
    mode: str
    cases: list[TestCase]
    continue_after_replay: bool = False
    recorded: dict[tuple[int, int], list[str]] = field(default_factory=dict)
    profile: AgentProfile | None = None  # a test_agent run's reading of the agent (its system prompt, for the judges)

    @property
    def replay(self) -> dict[tuple[int, int], list[str]] | None:
        return self.recorded if self.mode == "replay" else None

    @property
    def recorded_repeats(self) -> int:
        """Repeats per case of the earlier run, as recorded (a replay plays each recorded session once)."""
        return len({r for _, r in self.recorded}) or 1

    def options(self) -> dict[str, Any]:
        """What the new run records about its source, for a later comparison or resume."""
        return {"from_run": self.run_id, "mode": self.mode, "continue_after_replay": self.continue_after_replay}


def check_replay_options(from_run: Any, mode: Any, continue_after_replay: Any) -> None:
    """The checks that need no store: mode and continue_after_replay only make sense with from_run."""
    if mode is not None and mode not in MODES:
        raise InvalidOption(f"mode must be 'resimulate' or 'replay', got {mode!r}")
    if not isinstance(continue_after_replay, bool):
        raise InvalidOption(f"continue_after_replay must be true or false, got {continue_after_replay!r}")
    if from_run is None:
        if mode is not None or continue_after_replay:
            what = f"mode '{mode}'" if mode is not None else "continue_after_replay"
            raise InvalidOption(f"{what} needs from_run: the id of the earlier run whose cases to play")
        return
    check_run_id(from_run, "from_run")
    if continue_after_replay and (mode or "resimulate") != "replay":
        raise InvalidOption("continue_after_replay applies only with mode 'replay' (--replay): in 'resimulate' "
                            "the simulated user plays every turn anyway")


async def load_from_run(store: Store, from_run: str, *, mode: str | None = None, continue_after_replay: bool = False,
                        repeats: int = 1) -> FromRun:
    """The earlier run's cases (and, for replay, its sessions' user messages). Raises UserInputError.

    A replay plays every recorded session once, so `repeats` must be 1 (the default) or the earlier run's.
    """
    check_replay_options(from_run, mode, continue_after_replay)
    mode = mode or "resimulate"
    try:
        run = await store.get_run(from_run)
    except NotFound as e:
        raise InvalidOption(f"from_run: {e}") from None
    if run["status"] == RunStatus.RUNNING.value:
        raise InvalidOption(f"from_run: run '{from_run}' is still running; wait for it (get_run) or cancel it first")
    cases = await store.get_test_cases(from_run)
    if not cases:
        raise InvalidOption(f"from_run: run '{from_run}' has no test cases to play (it ended before any were made)")
    source = FromRun(from_run, mode, cases, continue_after_replay)
    set_id = (run.get("options") or {}).get("test_set_id")
    if set_id:
        try:
            source.profile = (await store.get_test_set(set_id)).profile
        except NotFound:  # deleted since: the judges then get the description only
            pass
    if mode != "replay":
        return source
    for s in await store.get_sessions(from_run):
        if s.case_index is None or not 0 <= s.case_index < len(cases):
            continue
        source.recorded[(s.case_index, s.repeat)] = [m.content for m in s.messages
                                                     if m.role == "user" and m.content and m.content.strip()]
    if not source.recorded:
        raise InvalidOption(f"from_run: run '{from_run}' has no recorded sessions to replay")
    earlier = source.recorded_repeats
    if repeats != 1 and repeats != earlier:
        raise InvalidOption(f"repeats: a replay plays each recorded session of run '{from_run}' once, and it had "
                            f"{earlier} repeat(s) per case; leave repeats at 1{f' (or {earlier})' if earlier > 1 else ''}"
                            f", or use mode 'resimulate' for new trials (repeats 1-{MAX_REPEATS})")
    return source
