"""The simulation job: play simulated users against the agent, store every turn, summarise the run.

    job = await prepare_simulation(store, target, cases, max_turns=5)   # validates; raises UserInputError
    summary = await job.run(progress)                                    # runs; every turn is stored

`prepare_*` does every check that can fail because of the request before a
run exists, so a bad target or test case is reported at once. `run` never
raises for a failing agent or model: those end the affected session with a
stop reason, and the run completes. One model failure stops the whole run: a
refused API key (`LLMAuthError`) for the simulated user or the judge. Then every
session not yet finished ends `simulator_error` with the reason, and the run is
`failed` with that one error (naming the model and the variable to fix).
"""

from __future__ import annotations

import logging
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import anyio

from ..errors import InvalidOption, LLMAuthError
from ..llm import CACHE_TRIAL, LLM, close_models, prepare_models, resolve_llm, resolve_model
from ..llm.resolve import rate_limits
from ..models import (Assessment, Message, Role, RunStatus, RunSummary, Session, SessionSummary, StopReason,
                      TargetSpec, TestCase, TrialsSummary)
from ..issues import TrialTally, transcript_mark
from ..judging import Scorer, parse_scorers
from ..simulation import ConversationRunner, SessionRecorder, SimulatedUser, TurnEvent, load_user_class
from ..store import Store, new_run_id, new_session_id
from ..simulation import Target, redacted_spec, resolve_target
from ..cases import load_test_cases
from ..limits import MAX_RUN_SESSIONS
from ..workspace import WorkspaceArg, as_workspace
from ..text import one_line
from ._shared import (MAX_CONCURRENCY, MAX_REPEATS, MAX_TURNS_LIMIT, Progress, ProgressFn, cache_enabled, check_range,
                      ensure_open_files, run_uri, sampling_options, session_uri, with_cache)
from .replay import check_replay_options, load_from_run
from .scoring import score_one, tally_verdicts

log = logging.getLogger("convsim.pipeline")

# Stop reasons a progress bar counts as failures: the agent failed, or the simulated user could not test it
FAILURE_STOPS = frozenset({StopReason.AGENT_ERROR, StopReason.AGENT_EMPTY, StopReason.SIMULATOR_ERROR})

# A session that ended so is an untested trial whatever its transcript says (issues.trials.trial_outcome)
UNTESTED_ANYWAY = frozenset({None, StopReason.SIMULATOR_ERROR, StopReason.CANCELLED})

MAX_CASES_LISTED = 50  # per-case trial results a run summary lists (the report lists every case)


class _StoreRecorder(SessionRecorder):
    def __init__(self, store: Store, *, trials: bool = False):
        self.store = store
        self.trials = trials  # a repeated run: each finished session's transcript_mark is stored with it

    async def message(self, session: Session, message: Message) -> None:
        await self.store.add_message(session.id, len(session.messages) - 1, message, session.turns)

    async def finished(self, session: Session) -> None:
        await self.store.finish_session(session, trial_mark=transcript_mark(session) if self.trials else None)


@dataclass
class SimulationJob:
    """A validated simulation whose run row exists; `run()` plays every session."""

    store: Store
    run_id: str
    target: Target
    cases: list[TestCase]
    llm: LLM
    user_class: type[SimulatedUser]
    max_turns: int
    concurrency: int
    repeats: int
    scorers: list[Scorer] = field(default_factory=list)
    judge_llm: LLM | None = None
    finish_run: bool = True  # False when a later stage (test_agent's report) still belongs to the run
    # A resume: the run's stored sessions; those with a stop reason are kept, the others are played on
    sessions: list[Session] | None = None
    # mode 'replay' (see replay.py): (case index, repeat) -> the recorded user messages each session sends
    replay: dict[tuple[int, int], list[str]] | None = None
    continue_after_replay: bool = False

    @property
    def total_steps(self) -> int:
        return self.sessions_total * self.max_turns

    @property
    def sessions_total(self) -> int:
        if self.sessions is not None:
            return len(self.sessions)
        return len(self.replay) if self.replay is not None else len(self.cases) * self.repeats

    def _plan(self) -> list[tuple[str, int, int]]:
        """(session id, case index, repeat) of every session: every case times every repeat; a replay has
        one per recorded session. Small for any run: a Session is built only when it starts (`_session`)."""
        if self.replay is None:
            return [(new_session_id(), i, r) for i in range(len(self.cases)) for r in range(self.repeats)]
        return [(new_session_id(), i, r) for i, r in sorted(self.replay)]

    def _session(self, session_id: str, index: int, repeat: int) -> Session:
        """A planned session, as it starts; a replay's carries the recorded user messages as scripted turns."""
        case = self.cases[index]
        if self.replay is not None:
            case = case.model_copy(update={"scripted_turns": self.replay[(index, repeat)]})
        return Session(id=session_id, run_id=self.run_id, case_index=index, repeat=repeat, test_case=case)

    def stopped_by(self) -> LLMAuthError | None:
        """The refused-credentials error that stops this run, once the user's or the judge's model latched one."""
        return self.llm.auth_error or (self.judge_llm.auth_error if self.judge_llm is not None else None)

    async def run(self, progress: ProgressFn | None = None) -> RunSummary:
        """Play every session not yet finished, `concurrency` at a time, and summarise the run from the store.

        Sessions are created as rows in one transaction, then built and played as workers take them:
        at most `concurrency` sessions (with their transcripts) are in memory at once, and a finished
        session is dropped once stored. Progress is counted incrementally (O(1) per turn).
        """
        pending: Iterator[Session] = iter(())
        done_steps = 0
        steps: dict[str, int] = {}  # progress steps of the sessions being played
        live: dict[str, Session] = {}
        recorder = _StoreRecorder(self.store, trials=self.repeats > 1)

        ended = {"done": 0, "failures": 0}  # finished sessions, and those of them that failed
        if self.sessions is not None:
            kept = [s for s in self.sessions if s.stop_reason is not None]
            ended.update(done=len(kept), failures=sum(s.stop_reason in FAILURE_STOPS for s in kept))

        async def on_event(event: TurnEvent) -> None:
            nonlocal done_steps
            step = self.max_turns if event.finished else event.turn
            done_steps += step - steps.get(event.session_id, step)
            steps[event.session_id] = step
            if event.finished:
                ended["done"] += 1
                ended["failures"] += event.stop_reason in FAILURE_STOPS
            if progress:
                what = f"ended: {event.stop_reason.value}" if event.finished and event.stop_reason else f"turn {event.turn}"
                await progress(Progress(done_steps, self.total_steps, f"{event.session_id} {what}",
                                        sessions_done=ended["done"], sessions_total=self.sessions_total,
                                        failures=ended["failures"]))

        async def play(session: Session, stop: anyio.CancelScope) -> None:
            CACHE_TRIAL.set(session.repeat)  # this task's own context: each repeat is its own cached trial
            session.started_at = session.started_at or time.time()
            user = self.user_class(self.llm)
            if Role.USER.value in session.usage:  # resumed: the usage of its earlier turns carries on
                user.usage = session.usage[Role.USER.value]
            runner = ConversationRunner(self.target, user, self.max_turns, recorder, on_event,
                                        stopped_by=self.stopped_by, replay=self.replay is not None,
                                        continue_after_replay=self.continue_after_replay)
            await runner.run(session)
            if self.scorers and session.stop_reason != StopReason.CANCELLED and not self.stopped_by():
                await score_one(self.store, session, self.scorers, self.judge_llm or self.llm)
            if self.stopped_by():
                stop.cancel()

        async def worker(stop: anyio.CancelScope) -> None:
            for session in pending:  # shared by the workers: each session is taken once, in run order
                if self.stopped_by():  # left for _close to end as not run
                    stop.cancel()
                    return
                live[session.id] = session  # until it is stored; one cut short stays for _close
                steps[session.id] = min(session.turns, self.max_turns)
                await play(session, stop)
                del live[session.id], steps[session.id]  # stored: its transcript leaves memory

        status, error = RunStatus.COMPLETED, None
        try:  # the warm-up too: a cancel or a failure there still ends the run and closes the target
            pending, done_steps = await self._start()
            async with anyio.create_task_group() as tg:
                for _ in range(min(self.concurrency, self.sessions_total)):
                    tg.start_soon(worker, tg.cancel_scope)
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                await self._close(RunStatus.CANCELLED, "cancelled; completed turns are kept", live.values())
            raise
        except Exception as e:  # a bug, not an agent or model failure: keep what was stored
            log.exception("run %s failed", self.run_id)
            status, error = RunStatus.FAILED, f"{type(e).__name__}: {e}"
        stopped = self.stopped_by()
        if stopped is not None and status == RunStatus.COMPLETED:
            status, error = RunStatus.FAILED, str(stopped)
        await self._close(status, error, live.values())
        return await run_summary(self.store, self.run_id)

    async def _start(self) -> tuple[Iterator[Session], int]:
        """Warm up (open-file limit, model imports and HTTP pools, agent pools) and plan the sessions:
        the sessions still to play, and the progress steps already done (a resume keeps its finished ones)."""
        ensure_open_files(self.concurrency)
        await prepare_models(self.llm, self.judge_llm)  # litellm's import, the HTTP pool: before the first turn
        self.target.size_for(self.concurrency)
        if self.sessions is None:
            planned = self._plan()
            await self.store.create_sessions(self.run_id, planned)
            return (self._session(*p) for p in planned), 0
        done = sum(self.max_turns if s.stop_reason else min(s.turns, self.max_turns) for s in self.sessions)
        return (s for s in self.sessions if s.stop_reason is None), done

    async def _close(self, status: RunStatus, error: str | None, live: Iterable[Session]) -> None:
        """End every session left without a stop reason: those cut short in memory one by one (their turns and
        usage so far are kept), those never started in one statement; then close the target and the run."""
        stopped = self.stopped_by()
        if stopped is not None:  # could not be tested: a model reason, never the agent's
            reason, detail = StopReason.SIMULATOR_ERROR, f"not run: {stopped}"
        else:
            reason, detail = StopReason.CANCELLED, error or "not run"
        for s in list(live):
            if s.stop_reason is None:
                s.stop_reason, s.stop_detail, s.finished_at = reason, detail, time.time()
                await self.store.finish_session(s)
        await self.store.end_open_sessions(self.run_id, reason, detail)
        await self.target.aclose()
        if self.finish_run:  # the job ends here (test_agent closes the models after its report)
            await close_models(self.llm, self.judge_llm)
        if self.finish_run or status != RunStatus.COMPLETED:
            await self.store.finish_run(self.run_id, status, error)


async def prepare_simulation(
    store: Store,
    target: str | dict[str, Any] | TargetSpec,
    test_cases: str | Path | list[Any] | None = None,
    *,
    max_turns: int = 10,
    model: str | None = None,
    concurrency: int = 8,
    repeats: int = 1,
    user_agent: str | None = None,
    scorers: list[Any] | None = None,
    judge_model: str | None = None,
    workspace: WorkspaceArg = None,
    api_base: str | None = None,
    api_key: str | None = None,
    llm: LLM | None = None,
    from_run: str | None = None,
    mode: str | None = None,
    continue_after_replay: bool = False,
    cache: bool | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    rpm: float | None = None,
    tpm: float | None = None,
) -> SimulationJob:
    """Validate every input, then create the run. Raises UserInputError naming what to fix.

    `from_run` plays an earlier run's test cases instead of `test_cases`, by `mode` (see replay.py).
    `cache` (default CONVSIM_CACHE) answers repeated model requests from the store (engine/llm/cache.py);
    `temperature` and `seed` (default CONVSIM_TEMPERATURE, CONVSIM_SEED) go with every model call and are
    recorded with the run. `rpm` and `tpm` (default CONVSIM_LLM_RPM, CONVSIM_LLM_TPM) pace the requests to
    each model (engine/llm/ratelimit.py) and are recorded too.
    """
    check_range("max_turns", max_turns, 1, MAX_TURNS_LIMIT)
    rpm, tpm = rate_limits(rpm, tpm)
    check_range("concurrency", concurrency, 1, MAX_CONCURRENCY)
    check_range("repeats", repeats, 1, MAX_REPEATS)
    check_replay_options(from_run, mode, continue_after_replay)
    use_cache = cache_enabled(cache)
    workspace = as_workspace(workspace)
    source = None
    if from_run is not None:
        if test_cases is not None:
            raise InvalidOption("give test_cases or from_run, not both: from_run plays the earlier run's cases")
        source = await load_from_run(store, from_run, mode=mode, continue_after_replay=continue_after_replay,
                                     repeats=repeats)
        cases = source.cases
        if source.replay is not None:
            repeats = source.recorded_repeats
    elif test_cases is None:
        raise InvalidOption("test_cases is required (inline cases, a file or a test set id), or from_run with the "
                            "id of an earlier run whose cases to play")
    else:
        cases = await resolve_cases(store, test_cases, workspace=workspace)
    sessions = len(source.replay) if source and source.replay is not None else len(cases) * repeats
    if sessions > MAX_RUN_SESSIONS:
        raise InvalidOption(f"{len(cases)} test cases x {repeats} repeats is {sessions} sessions; a run holds at most "
                            f"{MAX_RUN_SESSIONS} (MAX_RUN_SESSIONS): split the cases into several runs")
    resolved = resolve_target(target, workspace=workspace)
    resolved.check_cases(cases)
    user_class = load_user_class(user_agent, workspace=workspace)
    scorer_list = parse_scorers(scorers, workspace=workspace) if scorers else []
    llm = llm or resolve_llm(model, api_base=api_base, api_key=api_key, max_concurrency=concurrency,
                             temperature=temperature, seed=seed, rpm=rpm, tpm=tpm)
    same_model = not judge_model or resolve_model(judge_model) == llm.model  # one backend: one key check, one latch
    judge_llm = llm if same_model else resolve_llm(judge_model, api_base=api_base, api_key=api_key,
                                                   max_concurrency=concurrency, temperature=temperature, seed=seed,
                                                   rpm=rpm, tpm=tpm)
    llm = with_cache(llm, store, use_cache)
    judge_llm = llm if same_model else with_cache(judge_llm, store, use_cache)
    run_id = new_run_id()
    options = {"max_turns": max_turns, "concurrency": concurrency, "repeats": repeats, "user_agent": user_agent,
               "scorers": [sc.name for sc in scorer_list], "judge_model": judge_llm.model,
               **(source.options() if source else {}), **sampling_options(llm, use_cache), "rpm": rpm, "tpm": tpm}
    options["resume"] = {"scorers": scorers}  # the scorers as given (names alone lose custom judges)
    job = SimulationJob(store, run_id, resolved, cases, llm, user_class, max_turns, concurrency, repeats,
                        scorer_list, judge_llm, replay=source.replay if source else None,
                        continue_after_replay=continue_after_replay)
    await store.create_run(
        run_id=run_id, kind="simulate", target=redacted_spec(resolved.spec), options=options, model=llm.model,
        offline=llm.offline, test_cases=cases, sessions_total=job.sessions_total,
    )
    return job


async def resolve_cases(store: Store, test_cases: Any, *, workspace: WorkspaceArg = None) -> list[TestCase]:
    """Cases given inline, as a file path, or as the id of a stored test set ('set-...')."""
    if isinstance(test_cases, str) and test_cases.startswith("set-") and not _is_path(test_cases):
        return (await store.get_test_set(test_cases)).cases
    return load_test_cases(test_cases, workspace=workspace)


def _is_path(text: str) -> bool:
    try:
        return Path(text).exists()
    except (OSError, ValueError):  # longer than a file name can be, ...
        return False


async def simulate(store: Store, target: Any, test_cases: Any, *, progress: ProgressFn | None = None, **options: Any) -> RunSummary:
    """Validate, then run to completion: `prepare_simulation(...).run(progress)`."""
    job = await prepare_simulation(store, target, test_cases, **options)
    return await job.run(progress)


async def run_summary(store: Store, run_id: str, *, max_sessions: int = 50) -> RunSummary:
    """Status, progress and per-session summaries of a run (transcripts stay in resources).

    Built from aggregates counted in SQL (`Store.session_totals`), verdicts read a page at a time, and
    the per-session rows of the listed sessions (`Store.session_rows`: the last messages only); a
    repeated run's trials read the marks its sessions' transcripts left as they finished (`run_trials`;
    a trial whose simulated user broke its role is not counted). A run of any size summarises in flat
    memory, and a poll reads no transcript.
    """
    run = await store.get_run(run_id)
    repeats = run["options"].get("repeats") or 1
    max_turns = run["options"].get("max_turns") or 1
    totals = await store.session_totals(run_id, max_turns)
    usage, tally, untested = await tally_verdicts(store, await store.session_ids(run_id), usage=totals.usage)
    status = RunStatus(run["status"])
    notes = []
    if run["offline"]:
        notes.append("The offline backend played the user: a deterministic heuristic, not an LLM. "
                     "Set --model / CONVSIM_MODEL and a provider key for realistic users.")
    if status == RunStatus.RUNNING:
        notes.append(f"Still running: call get_run with run_id '{run_id}' again, or cancel_run to stop it.")
    if run["kind"] == "test_agent" and status == RunStatus.COMPLETED:
        notes.append(f"The report: get_report with run_id '{run_id}', or convsim://runs/{run_id}/report.md.")
    replay_ends = totals.stop_reasons.get(StopReason.REPLAY_END.value, 0)
    if replay_ends:
        notes.append(f"{replay_ends} session(s) ended replay_end: the recorded user messages of run "
                     f"'{run['options'].get('from_run')}' ran out while the agent's conversation went on; pass "
                     "continue_after_replay to let the simulated user take over from there.")
    if totals.sessions > max_sessions:
        notes.append(f"Showing {max_sessions} of {totals.sessions} sessions; read {run_uri(run_id)} for all.")
    return RunSummary(
        run_id=run_id,
        kind=run["kind"],
        status=status,
        created_at=run["created_at"],
        finished_at=run["finished_at"],
        target=describe_target(run["target"]),
        model=run["model"],
        offline=run["offline"],
        temperature=run["options"].get("temperature"),
        seed=run["options"].get("seed"),
        cache=bool(run["options"].get("cache")),
        sessions_total=run["sessions_total"],
        sessions_done=totals.done,
        turns_done=totals.turns,
        progress=round(totals.steps / max(run["sessions_total"] * max_turns, 1), 4)
        if status == RunStatus.RUNNING else 1.0,
        stop_reasons=totals.stop_reasons,
        untested=untested.count,
        untested_sessions=untested.listed,
        usage=usage,
        error=run["error"],
        resumed=run.get("resumed") or 0,
        resumed_at=run.get("resumed_at"),
        sessions=[summarize_session(row.session) for row in (await store.session_rows(run_id, limit=max_sessions))[0]],
        scores=tally.summaries(order=run["options"].get("scorers")),
        resource=run_uri(run_id),
        note=" ".join(notes) or None,
        trials=await run_trials(store, run_id, repeats) if repeats > 1 else None,
    )


async def session_summaries(store: Store, run_id: str, *, offset: int = 0, limit: int = 50,
                            attention_first: bool = False) -> tuple[list[SessionSummary], int]:
    """A page of a run's session summaries, and how many sessions the run has: from the store's per-session
    rows (`Store.session_rows`, whose verdict tallies and `attention_first` order say which failed), never
    from transcripts, so a poll of a 10,000-session run reads one page."""
    rows, total = await store.session_rows(run_id, offset=offset, limit=limit, attention_first=attention_first)
    return [summarize_session(row.session) for row in rows], total


async def run_trials(store: Store, run_id: str, repeats: int, *,
                     max_cases: int | None = MAX_CASES_LISTED) -> TrialsSummary:
    """A repeated run's trials (pass^k, flaky cases), read a page of sessions and their verdicts at a time.

    No transcript is read for a session whose transcript_mark was stored as it finished; one finished another
    way (an older database, a resume's bookkeeping) is read to compute it."""
    tally = TrialTally()
    async with aclosing(store.iter_sessions(run_id, with_messages=False)) as pages:
        async for page in pages:
            ids = [s.id for s in page]
            marks = await store.trial_marks(ids)
            unmarked = [s.id for s in page if marks.get(s.id) is None and s.stop_reason not in UNTESTED_ANYWAY]
            if unmarked:
                async with aclosing(store.iter_sessions(session_ids=unmarked)) as transcripts:  # paged by bytes
                    async for read in transcripts:
                        marks.update((s.id, transcript_mark(s)) for s in read)
            verdicts: dict[str, list[Assessment]] = {}
            for a in await store.get_assessments(ids):
                verdicts.setdefault(a.session_id, []).append(a)
            for s in page:
                tally.add(s, verdicts.get(s.id, []), marks.get(s.id))  # type: ignore[arg-type]
    return tally.summary(repeats, max_cases=max_cases)


def summarize_session(s: Session) -> SessionSummary:
    last_user = next((m.content for m in reversed(s.messages) if m.role == "user"), None)
    last_agent = next((m for m in reversed(s.messages) if m.role == "assistant"), None)
    return SessionSummary(
        session_id=s.id,
        case_index=s.case_index,
        case_id=s.test_case.id if s.test_case else None,
        goal=s.test_case.goal if s.test_case else None,
        repeat=s.repeat,
        stop_reason=s.stop_reason,
        stop_detail=s.stop_detail,
        turns=s.turns,
        replayed_turns=s.replayed_turns,
        last_user_message=one_line(last_user, 300) if last_user is not None else None,
        last_agent_reply=one_line(last_agent.content, 300) if last_agent and last_agent.content is not None else None,
        error=last_agent.error if last_agent else None,
        resource=session_uri(s.run_id or "", s.id),
    )


def describe_target(spec: dict[str, Any]) -> str:
    return spec.get("path") or spec.get("url") or spec.get("source") or "?"
