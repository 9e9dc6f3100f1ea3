"""The scoring job: judge stored, imported or inline conversations and summarise per scorer."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from ..errors import InvalidOption
from ..llm import LLM, resolve_llm
from ..models import (
    Assessment,
    FailingSession,
    Role,
    ScorerSummary,
    ScoreSummary,
    Session,
    Usage,
    add_usage,
)
from ..scorers import Scorer, parse_scorers
from ..store import Store, record_to_session
from ..workspace import WorkspaceArg, as_workspace
from ..text import one_line
from ._shared import MAX_CONCURRENCY, Progress, ProgressFn, check_range, scores_uri, untested_sessions

log = logging.getLogger("convsim.pipeline")


async def score_one(store: Store, session: Session, scorers: list[Scorer], llm: LLM) -> list[Assessment]:
    """Score one session with each scorer and store the verdicts. A scorer's bug is recorded, not raised."""
    out = []
    for scorer in scorers:
        out += await _score_pair(store, session, scorer, llm)
    return out


async def _score_pair(store: Store, session: Session, scorer: Scorer, llm: LLM) -> list[Assessment]:
    """One scorer's verdicts on one session, stored. A session the agent never answered is not judged:
    there is nothing of the agent's to judge (it ended before the agent's first turn)."""
    if not any(m.role == "assistant" for m in session.messages):
        return []
    try:
        assessments = await scorer.score(session, llm)
    except anyio.get_cancelled_exc_class():
        raise
    except Exception as e:
        log.exception("scorer %s failed on %s", scorer.name, session.id)
        assessments = [Assessment(session_id=session.id, scorer=scorer.name, error=f"{type(e).__name__}: {e}",
                                  error_kind="scorer")]
    now = time.time()
    assessments = [a.model_copy(update={"created_at": now}) for a in assessments]
    await store.save_assessments(assessments)
    return assessments


@dataclass
class ScoringJob:
    """Validated scoring of stored sessions; `run()` scores every (session, scorer) pair."""

    store: Store
    sessions: list[Session]
    scorers: list[Scorer]
    llm: LLM
    concurrency: int

    async def run(self, progress: ProgressFn | None = None) -> ScoreSummary:
        pairs = [(s, sc) for s in self.sessions for sc in self.scorers]
        limiter = anyio.CapacityLimiter(self.concurrency)
        done = 0

        async def one(session: Session, scorer: Scorer) -> None:
            nonlocal done
            async with limiter:
                await _score_pair(self.store, session, scorer, self.llm)
            done += 1
            if progress:
                await progress(Progress(done, len(pairs), f"{session.id} {scorer.name}"))

        async with anyio.create_task_group() as tg:
            for session, scorer in pairs:
                tg.start_soon(one, session, scorer)
        return await score_summary(self.store, self.sessions, [sc.name for sc in self.scorers], offline=self.llm.offline)


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
) -> ScoringJob:
    """Validate scorers and find the sessions (importing inline or file transcripts as a new run)."""
    given = [name for name, v in (("run_id", run_id), ("session_ids", session_ids), ("transcripts", transcripts),
                                  ("file", file)) if v]
    if len(given) != 1:
        raise InvalidOption("give exactly one of run_id, session_ids, transcripts or file "
                            f"({'got ' + ', '.join(given) if given else 'got none'})")
    check_range("concurrency", concurrency, 1, MAX_CONCURRENCY)
    workspace = as_workspace(workspace)
    scorer_list = parse_scorers(scorers, workspace=workspace)
    llm = llm or resolve_llm(model, max_concurrency=concurrency)
    sessions = await collect_sessions(store, run_id=run_id, session_ids=session_ids, transcripts=transcripts,
                                      file=file, workspace=workspace)
    if not sessions:
        raise InvalidOption("no sessions to score")
    return ScoringJob(store, sessions, scorer_list, llm, concurrency)


async def collect_sessions(store: Store, *, run_id: str | None = None, session_ids: list[str] | None = None,
                           transcripts: list[Any] | None = None, file: str | Path | None = None,
                           workspace: WorkspaceArg = None) -> list[Session]:
    """Sessions of a run, by id, or from inline transcripts or a JSONL file (imported as a new run)."""
    if run_id:
        await store.get_run(run_id)
        return await store.get_sessions(run_id)
    if session_ids:
        return [await store.get_session(sid) for sid in session_ids]
    if transcripts:
        parsed = [record_to_session(t, i, what="transcript") for i, t in enumerate(transcripts)]
        return await store.get_sessions(await store.import_sessions(parsed, source="inline transcripts"))
    if file:
        path = as_workspace(workspace).resolve_file(file, what="transcript file")
        with path.open(encoding="utf-8") as f:
            return await store.get_sessions(await store.import_jsonl(f, source=str(path)))
    return []


async def score_sessions(store: Store, *, progress: ProgressFn | None = None, **options: Any) -> ScoreSummary:
    """Validate, then score: `prepare_scoring(...).run(progress)`."""
    return await (await prepare_scoring(store, **options)).run(progress)


async def score_summary(store: Store, sessions: list[Session], scorer_names: list[str], *,
                        offline: bool) -> ScoreSummary:
    assessments = [a for a in await store.get_assessments([s.id for s in sessions]) if a.scorer in scorer_names]
    usage = judge_usage(assessments)
    run_ids = sorted({s.run_id for s in sessions if s.run_id})
    summaries = summarize_scores(assessments, order=scorer_names)
    untested, untested_list = untested_sessions(sessions, assessments)
    note = None
    if offline:
        note = ("Scored by the offline heuristics (no model): rough, deterministic checks. "
                "Configure a model for real judges.")
    return ScoreSummary(run_ids=run_ids, sessions=len(sessions), untested=untested, untested_sessions=untested_list,
                        scorers=summaries, usage=usage, offline=offline,
                        resources=[scores_uri(r) for r in run_ids], note=note)


def judge_usage(assessments: list[Assessment], into: dict[str, Usage] | None = None) -> dict[str, Usage]:
    """Model usage of the judges behind `assessments`, under role 'judge' (added to `into` when given)."""
    usage = dict(into or {})
    for a in assessments:
        if a.usage:
            usage = add_usage(usage, Role.JUDGE.value, a.usage)
    return usage


def summarize_scores(assessments: list[Assessment], *, order: list[str] | None = None,
                     max_listed: int = 20) -> list[ScorerSummary]:
    """Per scorer: a session fails if any of its verdicts fails (per-turn scorers have several)."""
    by_scorer: dict[str, dict[str, list[Assessment]]] = {}
    for a in assessments:
        by_scorer.setdefault(a.scorer, {}).setdefault(a.session_id, []).append(a)
    names = [n for n in (order or []) if n in by_scorer] + sorted(n for n in by_scorer if n not in (order or []))
    out = []
    for name in names:
        passed = failed = unscored = 0
        failing: list[FailingSession] = []
        errors: list[FailingSession] = []
        for session_id, verdicts in by_scorer[name].items():
            bad = next((v for v in verdicts if v.passed is False), None)
            if bad:
                failed += 1
                # the failure is the agent's: point at the first assistant evidence (a fact's source comes first)
                ev = next((e for e in bad.evidence if e.role == "assistant"), bad.evidence[0] if bad.evidence else None)
                failing.append(FailingSession(session_id=session_id, value=bad.value, rationale=one_line(bad.rationale),
                                              turn=ev.turn if ev else bad.turn, quote=ev.quote if ev else None))
            elif any(v.passed is True for v in verdicts):
                passed += 1
            else:
                unscored += 1
                err = next((v.error for v in verdicts if v.error), None) or "no pass rule (value only)"
                errors.append(FailingSession(session_id=session_id, rationale=one_line(err),
                                             value=verdicts[0].value))
        scored = passed + failed
        out.append(ScorerSummary(
            scorer=name, sessions=len(by_scorer[name]), passed=passed, failed=failed, unscored=unscored,
            pass_rate=round(passed / scored, 4) if scored else None,
            heuristic=any(v.heuristic for vs in by_scorer[name].values() for v in vs),
            failing=failing[:max_listed], errors=errors[:max_listed],
        ))
    return out
