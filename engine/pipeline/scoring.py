"""The scoring job: judge stored, imported or inline conversations and summarise per scorer.

Memory stays flat however many sessions are scored: the job holds session ids, reads the
sessions a page at a time (PAGE_SESSIONS), writes verdicts in batches, and the summary is
tallied from the verdicts page by page without reading a transcript.
"""

from __future__ import annotations

import logging
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import anyio
import anyio.lowlevel

from ..errors import InvalidOption, NotFound
from ..limits import MAX_TRANSCRIPTS
from ..llm import CACHE_TRIAL, LLM, close_models, prepare_models, resolve_llm
from ..models import Assessment, FailingSession, Role, ScorerSummary, ScoreSummary, Session, StopReason, Usage, add_usage
from ..judging import Scorer, parse_scorers
from ..judging.judges import DETERMINISTIC_JUDGES
from ..simulation.role import role_breaks
from ..store import PAGE_SESSIONS, Store
from ..workspace import WorkspaceArg, as_workspace
from ..text import one_line
from ._shared import (MAX_CONCURRENCY, Progress, ProgressFn, UntestedTally, cache_enabled, check_range,
                      ensure_open_files, scores_uri, with_cache)

log = logging.getLogger("convsim.pipeline")


async def score_one(store: Store, session: Session, scorers: list[Scorer], llm: LLM) -> list[Assessment]:
    """Score one session with each scorer and store the verdicts. A scorer's bug is recorded, not raised."""
    out = []
    for scorer in scorers:
        out += await judge_session(session, scorer, llm)
    await store.save_assessments(out)
    return out


async def judge_session(session: Session, scorer: Scorer, llm: LLM) -> list[Assessment]:
    """One scorer's verdicts on one session. A session the agent never answered is not judged: there is
    nothing of the agent's to judge (it ended before the agent's first turn). Nor is one whose simulated user
    broke its role (`simulation.role`): it gets one unscored verdict saying so, and counts as could-not-test."""
    if not any(m.role == "assistant" for m in session.messages):
        return []
    breaks = role_breaks(session)
    if breaks:  # could not test: no verdict on the agent, never a pass (counted untested, error_kind "simulator")
        return [Assessment(session_id=session.id, scorer=scorer.name, error=f"not judged: {breaks[0].rationale}",
                           error_kind="simulator", judged_by=judged_by(scorer, llm), created_at=time.time())]
    try:
        assessments = await scorer.score(session, llm)
    except anyio.get_cancelled_exc_class():
        raise
    except Exception as e:
        log.exception("scorer %s failed on %s", scorer.name, session.id)
        assessments = [Assessment(session_id=session.id, scorer=scorer.name, error=f"{type(e).__name__}: {e}",
                                  error_kind="scorer", judged_by=judged_by(scorer, llm))]
    now = time.time()
    return [a.model_copy(update={"created_at": now}) for a in assessments]


def judged_by(scorer: Scorer, llm: LLM) -> str:
    """How `scorer` judges with `llm`: as code (code scorers, the checks that never ask a model), offline, or a model."""
    if scorer.kind == "code" or scorer.name in DETERMINISTIC_JUDGES:
        return "code"
    return "offline" if llm.offline else "model"


class _VerdictWriter:
    """Verdicts saved in batches: one transaction per `batch` verdicts or per `every_s` seconds, not per pair."""

    def __init__(self, store: Store, batch: int = 500, every_s: float = 1.0):
        self.store, self.batch, self.every_s = store, batch, every_s
        self.pending: list[Assessment] = []
        self.last = time.monotonic()

    async def add(self, assessments: list[Assessment]) -> None:
        self.pending += assessments
        if len(self.pending) >= self.batch or time.monotonic() - self.last >= self.every_s:
            await self.flush()

    async def flush(self) -> None:
        pending, self.pending, self.last = self.pending, [], time.monotonic()
        await self.store.save_assessments(pending)


@dataclass
class ScoringJob:
    """Validated scoring of stored sessions; `run()` scores every (session, scorer) pair.

    Holds the session ids only: sessions are read PAGE_SESSIONS at a time as they are scored.
    """

    store: Store
    session_ids: list[str]
    scorers: list[Scorer]
    llm: LLM
    concurrency: int
    run_ids: list[str] | None = None  # the runs the sessions belong to, when known

    async def run(self, progress: ProgressFn | None = None) -> ScoreSummary:
        ensure_open_files(self.concurrency)  # each judge call in flight may hold a model connection
        await prepare_models(self.llm)  # litellm's import, the HTTP pool: before the first verdict
        total = len(self.session_ids) * len(self.scorers)
        writer = _VerdictWriter(self.store)
        done = 0

        async def worker(pairs: Iterator[tuple[Session, Scorer]]) -> None:
            nonlocal done
            for session, scorer in pairs:  # shared by the page's workers: each pair is taken once
                CACHE_TRIAL.set(session.repeat)  # as when the session was scored as it finished
                await writer.add(await judge_session(session, scorer, self.llm))
                done += 1
                if progress:
                    await progress(Progress(done, total, f"{session.id} {scorer.name}"))
                await anyio.lowlevel.checkpoint()  # offline judges never wait: let the event loop in

        try:
            async with aclosing(self.store.iter_sessions(session_ids=self.session_ids, page=PAGE_SESSIONS)) as pages:
                async for page in pages:
                    pairs = iter([(s, sc) for s in page for sc in self.scorers])
                    async with anyio.create_task_group() as tg:
                        for _ in range(min(self.concurrency, len(page) * len(self.scorers))):
                            tg.start_soon(worker, pairs)
        finally:
            with anyio.CancelScope(shield=True):  # verdicts reached are kept, even when cancelled
                await writer.flush()
            await close_models(self.llm)
        return await score_summary(self.store, self.session_ids, [sc.name for sc in self.scorers],
                                   offline=self.llm.offline, run_ids=self.run_ids)


async def prepare_scoring(
    store: Store,
    *,
    run_id: str | None = None,
    session_ids: list[str] | None = None,
    transcripts: list[Any] | None = None,
    file: str | Path | None = None,
    scorers: list[Any] | None = None,
    model: str | None = None,
    concurrency: int = 8,
    workspace: WorkspaceArg = None,
    llm: LLM | None = None,
    cache: bool | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    rpm: float | None = None,
    tpm: float | None = None,
) -> ScoringJob:
    """Validate scorers and find the sessions (importing inline or file transcripts as a new run).

    `cache`, `temperature`, `seed`, `rpm` and `tpm`: as for `prepare_simulation`, for the judges' model calls.
    """
    given = [name for name, v in (("run_id", run_id), ("session_ids", session_ids), ("transcripts", transcripts),
                                  ("file", file)) if v]
    if len(given) != 1:
        raise InvalidOption("give exactly one of run_id, session_ids, transcripts or file "
                            f"({'got ' + ', '.join(given) if given else 'got none'})")
    check_range("concurrency", concurrency, 1, MAX_CONCURRENCY)
    workspace = as_workspace(workspace)
    scorer_list = parse_scorers(scorers, workspace=workspace)
    llm = with_cache(llm or resolve_llm(model, max_concurrency=concurrency, temperature=temperature, seed=seed,
                                        rpm=rpm, tpm=tpm), store, cache_enabled(cache))
    ids, run_ids = await collect_session_ids(store, run_id=run_id, session_ids=session_ids, transcripts=transcripts,
                                             file=file, workspace=workspace)
    if not ids:
        raise InvalidOption("no sessions to score")
    return ScoringJob(store, ids, scorer_list, llm, concurrency, run_ids)


async def collect_session_ids(store: Store, *, run_id: str | None = None, session_ids: list[str] | None = None,
                              transcripts: list[Any] | None = None, file: str | Path | None = None,
                              workspace: WorkspaceArg = None) -> tuple[list[str], list[str]]:
    """(session ids, their run ids): of a run, given ids (checked), or inline / file transcripts imported
    as a new run. Transcripts beyond MAX_TRANSCRIPTS are refused before anything is stored."""
    if run_id:
        await store.get_run(run_id)
        return await store.session_ids(run_id), [run_id]
    if session_ids:
        ids = list(dict.fromkeys(session_ids))
        if len(ids) > MAX_TRANSCRIPTS:
            raise InvalidOption(f"{len(ids)} session ids; at most {MAX_TRANSCRIPTS} at once (MAX_TRANSCRIPTS)")
        runs = await store.session_runs(ids)
        missing = next((sid for sid in ids if sid not in runs), None)
        if missing is not None:
            raise NotFound(f"no session with id '{missing}'; call get_run to list a run's sessions")
        return ids, sorted(set(runs.values()))
    if transcripts:
        if not isinstance(transcripts, list):
            raise InvalidOption("transcripts must be a list of conversations")
        new_run = await store.import_records(transcripts, source="inline transcripts")
    elif file:
        path = as_workspace(workspace).resolve_file(file, what="transcript file")
        new_run = await store.import_file(path, source=str(path))
    else:
        return [], []
    return await store.session_ids(new_run), [new_run]


async def collect_sessions(store: Store, *, run_id: str | None = None, session_ids: list[str] | None = None,
                           transcripts: list[Any] | None = None, file: str | Path | None = None,
                           workspace: WorkspaceArg = None) -> list[Session]:
    """Sessions of a run, by id, or from inline transcripts or a JSONL file (imported as a new run), in memory.

    For jobs that need every transcript at once (distillation); scoring pages them instead.
    """
    ids, _ = await collect_session_ids(store, run_id=run_id, session_ids=session_ids, transcripts=transcripts,
                                       file=file, workspace=workspace)
    return await store.get_sessions_by_ids(ids)


async def score_sessions(store: Store, *, progress: ProgressFn | None = None, **options: Any) -> ScoreSummary:
    """Validate, then score: `prepare_scoring(...).run(progress)`."""
    return await (await prepare_scoring(store, **options)).run(progress)


async def score_summary(store: Store, session_ids: Sequence[str], scorer_names: list[str], *,
                        offline: bool, run_ids: list[str] | None = None) -> ScoreSummary:
    """Per scorer over these sessions, tallied from their stored verdicts a page at a time (no transcripts)."""
    if run_ids is None:
        run_ids = sorted(set((await store.session_runs(session_ids)).values()))
    usage, tally, untested = await tally_verdicts(store, session_ids, scorer_names=scorer_names)
    note = None
    if offline:
        note = ("Scored by the offline heuristics (no model): rough, deterministic checks. "
                "Configure a model for real judges.")
    return ScoreSummary(run_ids=run_ids, sessions=len(session_ids), untested=untested.count,
                        untested_sessions=untested.listed, scorers=tally.summaries(order=scorer_names),
                        usage=usage, offline=offline, resources=[scores_uri(r) for r in run_ids], note=note)


async def tally_verdicts(store: Store, session_ids: Sequence[str], *, scorer_names: list[str] | None = None,
                         usage: dict[str, Usage] | None = None) -> tuple[dict[str, Usage], ScoreTally, UntestedTally]:
    """The stored verdicts on these sessions (only `scorer_names`' when given), read a page at a time:
    the judges' usage added to `usage`, the per-scorer tally, and the sessions that could not be tested."""
    tally, untested, usage = ScoreTally(), UntestedTally(), dict(usage or {})
    untested.add_simulator_errors(await store.stopped_sessions(StopReason.SIMULATOR_ERROR, session_ids=session_ids))
    async with aclosing(store.iter_assessments(session_ids)) as pages:
        async for page in pages:
            if scorer_names is not None:
                page = [a for a in page if a.scorer in scorer_names]
            usage = judge_usage(page, into=usage)
            tally.add(page)
            untested.add_verdicts(page)
    return usage, tally, untested


def judge_usage(assessments: list[Assessment], into: dict[str, Usage] | None = None) -> dict[str, Usage]:
    """Model usage of the judges behind `assessments`, under role 'judge' (added to `into` when given)."""
    usage = dict(into or {})
    for a in assessments:
        if a.usage:
            usage = add_usage(usage, Role.JUDGE.value, a.usage)
    return usage


def summarize_scores(assessments: Iterable[Assessment], *, order: list[str] | None = None,
                     max_listed: int = 20) -> list[ScorerSummary]:
    """Per scorer: a session fails if any of its verdicts fails (per-turn scorers have several).

    A list may come in any order (sessions keep the order they first appear in); for a stream,
    feed a `ScoreTally` with verdicts grouped by session, as the store returns them.
    """
    if isinstance(assessments, list):
        first: dict[str, int] = {}
        for a in assessments:
            first.setdefault(a.session_id, len(first))
        assessments = sorted(assessments, key=lambda a: first[a.session_id])
    tally = ScoreTally(max_listed=max_listed)
    tally.add(assessments)
    return tally.summaries(order=order)


@dataclass
class _ScorerTally:
    name: str
    max_listed: int
    sessions: int = 0
    passed: int = 0
    failed: int = 0
    unscored: int = 0
    heuristic: bool = False
    judged_by: set[str] = field(default_factory=set)
    failing: list[FailingSession] = field(default_factory=list)
    errors: list[FailingSession] = field(default_factory=list)

    def add(self, session_id: str, verdicts: list[Assessment]) -> None:
        self.sessions += 1
        self.heuristic = self.heuristic or any(v.heuristic for v in verdicts)
        # verdicts stored before `judged_by` existed say only whether they were heuristic
        self.judged_by |= {v.judged_by or ("offline" if v.heuristic else "model") for v in verdicts
                           if v.judged_by or v.error_kind != "scorer"}
        bad = next((v for v in verdicts if v.passed is False), None)
        if bad:
            self.failed += 1
            if len(self.failing) < self.max_listed:
                # the failure is the agent's: point at the first assistant evidence (a fact's source comes first)
                ev = next((e for e in bad.evidence if e.role == "assistant"), bad.evidence[0] if bad.evidence else None)
                self.failing.append(FailingSession(session_id=session_id, value=bad.value,
                                                   rationale=one_line(bad.rationale),
                                                   turn=ev.turn if ev else bad.turn, quote=ev.quote if ev else None))
        elif any(v.passed is True for v in verdicts):
            self.passed += 1
        else:
            self.unscored += 1
            if len(self.errors) < self.max_listed:
                err = next((v.error for v in verdicts if v.error), None) or "no pass rule (value only)"
                self.errors.append(FailingSession(session_id=session_id, rationale=one_line(err),
                                                  value=verdicts[0].value))

    def summary(self) -> ScorerSummary:
        scored = self.passed + self.failed
        return ScorerSummary(
            scorer=self.name, sessions=self.sessions, passed=self.passed, failed=self.failed, unscored=self.unscored,
            pass_rate=round(self.passed / scored, 4) if scored else None, heuristic=self.heuristic,
            judged_by=next((k for k in ("code", "offline") if k in self.judged_by), "model"),
            failing=self.failing, errors=self.errors,
        )


class ScoreTally:
    """`summarize_scores` over a stream of verdicts, in constant memory.

    Feed verdicts grouped by session (the store's order: `Store.iter_assessments`), in any number
    of `add` calls; a session may even span two calls. Keeps counts and the first `max_listed`
    failing and unscored sessions per scorer, never the verdicts themselves.
    """

    def __init__(self, *, max_listed: int = 20):
        self.max_listed = max_listed
        self._scorers: dict[str, _ScorerTally] = {}
        self._open_id: str | None = None  # the session whose verdicts may continue in the next `add`
        self._open: list[Assessment] = []

    def add(self, assessments: Iterable[Assessment]) -> None:
        for session_id, group in groupby(assessments, key=lambda a: a.session_id):
            if session_id != self._open_id:
                self._close()
                self._open_id = session_id
            self._open += group

    def _close(self) -> None:
        if self._open_id is not None:
            by_scorer: dict[str, list[Assessment]] = {}
            for a in self._open:
                by_scorer.setdefault(a.scorer, []).append(a)
            for name, verdicts in by_scorer.items():
                if name not in self._scorers:
                    self._scorers[name] = _ScorerTally(name, self.max_listed)
                self._scorers[name].add(self._open_id, verdicts)
        self._open_id, self._open = None, []

    def summaries(self, *, order: list[str] | None = None) -> list[ScorerSummary]:
        self._close()
        names = [n for n in (order or []) if n in self._scorers]
        names += sorted(n for n in self._scorers if n not in names)
        return [self._scorers[n].summary() for n in names]
