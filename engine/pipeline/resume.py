"""Resume: continue an interrupted or cancelled run from its last stored turns, then finish it as its job would.

    job = await prepare_resume(store, run_id)   # checks everything, then takes the run back ('running')
    outcome = await job.run(progress)           # RunSummary (simulate) or Report (test_agent)

A run killed with its process reads 'interrupted'; one stopped with cancel_run reads 'cancelled'. Both
keep every completed turn. Resuming one:
- keeps its finished sessions (scoring those the kill left unscored);
- plays its unfinished sessions on from their last stored turn: the simulated user and the agent see the
  stored history; a user message stored without its reply is re-sent, never written twice, and a reply
  cut off half-way is discarded and asked for again (`engine.simulation.resume`);
- runs the sessions that never started from scratch;
- then scores, and for test_agent discovers issues and writes the report, as the original job would.
The run counts its resumes (`resumed`, `resumed_at`). What a resume needs besides the stored options
(the scorers as given; test_agent's description and switches) is recorded under `options.resume` when
the run is created; the target is stored redacted, so a target whose header held a literal secret must
be passed again (a `${VAR}` reference is stored as such and read from the environment on resume).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import anyio

from ..errors import InvalidOption, InvalidTarget, RunError
from ..ids import check_run_id
from ..judging import DEFAULT_SCORERS, Scorer, parse_scorers
from ..llm import CACHE_TRIAL, LLM, resolve_llm, resolve_model
from ..models import Message, Report, Role, RunStatus, RunSummary, Session, StopReason, TargetSpec, Usage, add_usage
from ..simulation import load_user_class, resolve_target
from ..simulation.resume import resume_point
from ..store import Store, new_session_id
from ..workspace import WorkspaceArg, as_workspace
from ._shared import ProgressFn, with_cache
from .agent_test import AgentTestJob, _give_instructions
from .scoring import score_one
from .simulation import SimulationJob

log = logging.getLogger("convsim.pipeline")

RESUMABLE_KINDS = ("simulate", "test_agent")


@dataclass
class ResumeJob:
    """A run taken back by this process; `run()` plays its unfinished sessions and finishes the job."""

    store: Store
    run_id: str
    kind: str
    inner: SimulationJob | AgentTestJob  # the original job, given the stored sessions to go on with
    scorers: list[Scorer]
    judge_llm: LLM
    continued: int = 0  # sessions played on from a stored turn
    restarted: int = 0  # sessions that had not started: run from scratch
    kept: int = 0  # finished sessions, kept as they are
    created: list[Session] = field(default_factory=list)  # sessions the interruption left uncreated
    ended: list[Session] = field(default_factory=list)  # their stored last turn had ended them; stop not recorded
    unscored: list[Session] = field(default_factory=list)  # finished before the interruption, never scored

    async def run(self, progress: ProgressFn | None = None) -> RunSummary | Report:
        try:
            for s in self.created:
                await self.store.create_session(s)
            for s in self.ended:
                await self.store.finish_session(s)
            for s in self.unscored:
                CACHE_TRIAL.set(s.repeat)  # each repeat is its own cached trial, as in SimulationJob.play
                await score_one(self.store, s, self.scorers, self.judge_llm)
        except BaseException as e:  # before the original job took over: end the run (a cancel leaves it resumable)
            cancelled = isinstance(e, anyio.get_cancelled_exc_class())
            with anyio.CancelScope(shield=True):
                for s in self.inner.sessions or []:
                    if s.stop_reason is None:
                        s.stop_reason, s.stop_detail = StopReason.CANCELLED, "the resume was stopped"
                        await self.store.finish_session(s)
                await self.store.finish_run(self.run_id, RunStatus.CANCELLED if cancelled else RunStatus.FAILED,
                                            "cancelled; completed turns are kept" if cancelled
                                            else f"{type(e).__name__}: {e}")
            if cancelled or isinstance(e, RunError):
                raise
            raise RunError(f"resuming run {self.run_id} failed: {type(e).__name__}: {e}") from e
        return await self.inner.run(progress)



async def prepare_resume(store: Store, run_id: str, *, target: str | dict[str, Any] | TargetSpec | None = None,
                         workspace: WorkspaceArg = None, llm: LLM | None = None) -> ResumeJob:
    """Check that `run_id` can be resumed and rebuild its job; then take the run back ('running', resumed + 1).

    Raises InvalidOption for a run that is complete, still running, failed or of another kind,
    InvalidTarget when its stored target lost a secret (pass `target`), NotFound for an unknown id.
    """
    check_run_id(run_id)
    run = await store.get_run(run_id)  # NotFound; a dead process's run reads 'interrupted' from here on
    status = RunStatus(run["status"])
    if status == RunStatus.COMPLETED:
        raise InvalidOption(f"run '{run_id}' is complete: nothing to resume")
    if status == RunStatus.RUNNING:
        raise InvalidOption(f"run '{run_id}' is still running (process {run['pid']}); it can be resumed once it "
                            "is cancelled (cancel_run) or its process has exited")
    if status not in (RunStatus.INTERRUPTED, RunStatus.CANCELLED):
        raise InvalidOption(f"run '{run_id}' is {status.value} ({run['error'] or 'no error recorded'}); only an "
                            "interrupted or cancelled run can be resumed: start a new run instead")
    if run["kind"] not in RESUMABLE_KINDS:
        raise InvalidOption(f"run '{run_id}' is a {run['kind']} run; resume continues simulate and test_agent runs")
    options = run["options"]
    extra = options.get("resume")
    if not isinstance(extra, dict):
        raise InvalidOption(f"run '{run_id}' was made by an older convsim that did not record what a resume needs; "
                            "start a new run instead")
    workspace = as_workspace(workspace)
    resolved = resolve_target(_target_spec(run, target), workspace=workspace)
    concurrency = int(options.get("concurrency") or 8)
    max_turns, repeats = int(options["max_turns"]), int(options.get("repeats") or 1)
    user_class = load_user_class(options.get("user_agent"), workspace=workspace)
    given = extra.get("scorers")  # as the original job read them: simulate scores only when told to
    if run["kind"] == "simulate":
        scorers = parse_scorers(given, workspace=workspace) if given else []
    else:
        scorers = parse_scorers(given if given is not None else list(DEFAULT_SCORERS), workspace=workspace)
    backends: dict[str, LLM] = {}

    def model_for(name: str | None) -> LLM:
        """One backend per model name, as the original job had (roles sharing a model share its key check)."""
        if llm is not None:
            return llm
        name = resolve_model(name)
        if name not in backends:  # sampled and cached as the run recorded (sampling_options)
            backends[name] = with_cache(resolve_llm(name, max_concurrency=concurrency,
                                                    temperature=options.get("temperature"), seed=options.get("seed"),
                                                    rpm=options.get("rpm"), tpm=options.get("tpm")),
                                        store, bool(options.get("cache")))
        return backends[name]

    user_llm = model_for("offline" if run["offline"] else run["model"])
    judge_llm = model_for(options.get("judge_model") or user_llm.model)
    cases = await store.get_test_cases(run_id)
    stored = await store.get_sessions(run_id)
    test_set = None
    if run["kind"] == "test_agent":
        test_set = await store.get_test_set(options["test_set_id"]) if options.get("test_set_id") else None
        if test_set is None and stored:
            raise InvalidOption(f"run '{run_id}' has sessions but no recorded test set; start a new run instead")
        if test_set is not None:
            cases = test_set.cases
            _give_instructions(scorers, test_set.profile, extra.get("description"))  # before kept sessions are scored
    resolved.check_cases(cases)  # a target given again must still fit every case, as at the start
    plan = _plan(run_id, stored, cases, repeats) if cases and (run["kind"] == "simulate" or test_set) else None
    replay, after_replay = None, bool(options.get("continue_after_replay"))
    if options.get("mode") == "replay":  # each stored session carries its recorded user turns as scripted turns
        if not stored or plan is None:
            raise InvalidOption(f"run '{run_id}' replays run '{options.get('from_run')}' but stored no session "
                                "before it stopped; start the replay again instead")
        replay = {(s.case_index, s.repeat): list(s.test_case.scripted_turns) for s in plan.sessions}
    if run["kind"] == "simulate":
        if plan is None:
            raise InvalidOption(f"run '{run_id}' has no stored test cases to resume")
        inner: SimulationJob | AgentTestJob = SimulationJob(
            store, run_id, resolved, cases, user_llm, user_class, max_turns, concurrency, repeats, scorers, judge_llm,
            sessions=plan.sessions, replay=replay, continue_after_replay=after_replay)
    else:
        inner = AgentTestJob(
            store, run_id, resolved, extra.get("description"),
            cases if test_set else await store.get_test_cases(run_id),
            0 if test_set else int(options.get("num_test_cases") or 0), options.get("guidance"),
            float(options.get("adversarial") or 0.0), max_turns, repeats, concurrency, scorers, user_llm, judge_llm,
            model_for(options.get("generator_model") or user_llm.model), user_class,
            ask_agent=bool(extra.get("ask_agent", True)), introspect=bool(extra.get("introspect", True)),
            workspace=workspace, shrink=bool(extra.get("shrink")),
            usage=dict(test_set.usage) if test_set else {}, test_set=test_set,
            sessions=plan.sessions if plan else None, replay=replay, continue_after_replay=after_replay)
    plan = plan or _Plan()
    unscored = await _unscored(store, plan.finished, scorers)  # before the run is taken: a failure leaves it as it was
    if not await store.reopen_run(run_id, [s.id for s in plan.reopen], plan.drop):
        raise InvalidOption(f"run '{run_id}' was taken by another process while it was being resumed")
    return ResumeJob(store, run_id, run["kind"], inner, scorers, judge_llm, continued=plan.continued,
                     restarted=plan.restarted, kept=plan.kept, created=plan.created, ended=plan.ended,
                     unscored=unscored)


async def resume(store: Store, run_id: str, *, progress: ProgressFn | None = None, **options: Any) -> RunSummary | Report:
    """Check and take the run back, then finish it: `prepare_resume(...).run(progress)`."""
    return await (await prepare_resume(store, run_id, **options)).run(progress)


@dataclass
class _Plan:
    sessions: list[Session] = field(default_factory=list)  # every session of the run, in run order
    reopen: list[Session] = field(default_factory=list)  # stored with a stop reason (cancelled): cleared
    drop: dict[str, int] = field(default_factory=dict)  # session id -> first message seq of a partial reply
    created: list[Session] = field(default_factory=list)
    ended: list[Session] = field(default_factory=list)
    finished: list[Session] = field(default_factory=list)
    continued: int = 0
    restarted: int = 0
    kept: int = 0


def _plan(run_id: str, stored: list[Session], cases: list, repeats: int) -> _Plan:
    """What becomes of each session: kept, played on (from which turn), run from scratch, or created."""
    plan = _Plan()
    by_slot = {(s.case_index, s.repeat): s for s in stored}
    for i, case in enumerate(cases):
        for r in range(repeats):
            s = by_slot.get((i, r))
            if s is None:  # killed before it was created: created and run from scratch
                s = Session(id=new_session_id(), run_id=run_id, case_index=i, repeat=r, test_case=case)
                plan.created.append(s)
                plan.restarted += 1
                plan.sessions.append(s)
                continue
            s.test_case = s.test_case or case
            plan.sessions.append(s)
            if s.stop_reason not in (None, StopReason.CANCELLED):
                plan.kept += 1
                plan.finished.append(s)
                continue
            plan.reopen.append(s)
            s.stop_reason, s.stop_detail, s.finished_at = None, None, None
            point = resume_point(s.messages)
            if point.drop_from is not None:
                plan.drop[s.id] = point.drop_from
                del s.messages[point.drop_from:]
            if point.stop is not None:  # its last stored turn had ended it: finished now, not played
                s.stop_reason, s.stop_detail = point.stop, point.stop_detail
                plan.ended.append(s)
                plan.finished.append(s)
            elif s.messages:
                plan.continued += 1
            else:
                plan.restarted += 1
            if Role.USER.value not in s.usage:  # killed before its usage was recorded: its messages hold it
                spent = _user_usage(s.messages)
                if spent.calls:
                    s.usage = add_usage(dict(s.usage), Role.USER.value, spent)
    return plan


def _user_usage(messages: list[Message]) -> Usage:
    total = Usage()
    for m in messages:
        if m.role == "user" and m.usage is not None:
            total = total.add(m.usage)
    return total


async def _unscored(store: Store, finished: list[Session], scorers: list[Scorer]) -> list[Session]:
    """Finished sessions the agent answered that lack a verdict from one of `scorers` (killed before scoring)."""
    if not scorers or not finished:
        return []
    judged: dict[str, set[str]] = {}
    for a in await store.get_assessments([s.id for s in finished]):
        judged.setdefault(a.session_id, set()).add(a.scorer)
    names = {sc.name for sc in scorers}
    return [s for s in finished if any(m.role == "assistant" for m in s.messages)
            and not names <= judged.get(s.id, set())]


def _target_spec(run: dict[str, Any], target: Any) -> Any:
    """The target to resume against: the one given, else the stored one unless storing it masked a secret."""
    if target is not None:
        return target
    stored = run["target"]
    if "***" in str(stored.get("headers", {})) + str(stored.get("url", "")):
        raise InvalidTarget(f"run '{run['id']}' stored its target with secrets masked (a literal header value, a "
                            "URL password or query); pass the target again (with ${VAR} references for secrets, "
                            "which are stored as references)")
    try:
        return TargetSpec.model_validate(stored)
    except ValueError as e:
        raise InvalidTarget(f"run '{run['id']}' has no usable stored target ({e}); pass the target again") from None
