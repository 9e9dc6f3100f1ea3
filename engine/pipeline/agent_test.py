"""The headline job: test an agent end to end, and re-run what failed after a fix.

    describe -> generate -> simulate + score (each session scored as it ends) -> discover issues -> report

Each stage reports progress. The run row exists from the start, so a
background run can be watched with get_run; the report is stored when the
run completes and served as convsim://runs/{run_id}/report(.md).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, TypeVar

import anyio

from ..errors import CouldNotTest, InvalidOption, LLMAuthError, LLMError, RunError
from ..cases import describe_agent, generate_cases
from ..issues import discover_issues, summarize_trials
from ..llm import LLM, close_models, resolve_llm, resolve_model
from ..llm.resolve import rate_limits
from ..models import AgentProfile, Report, Role, RunStatus, Session, TargetSpec, TestCase, TestSet, Usage, add_usage
from ..reports import build_report, render_markdown
from ..judging import DEFAULT_SCORERS, BuiltinJudge, Scorer, parse_scorers
from ..simulation import SimulatedUser, load_user_class
from ..store import Store, new_run_id, new_test_set_id
from ..simulation import Target, redacted_spec, resolve_target
from ..workspace import WorkspaceArg, as_workspace
from ._shared import (MAX_CONCURRENCY, MAX_REPEATS, MAX_TURNS_LIMIT, Progress, ProgressFn, cache_enabled, check_range,
                      sampling_options, with_cache)
from .generation import MAX_TEST_CASES
from .shrink import shrink_reproductions
from .replay import check_replay_options, load_from_run
from .simulation import SimulationJob, resolve_cases

log = logging.getLogger("convsim.pipeline")

R = TypeVar("R")

STAGES = ("describe", "generate", "simulate", "discover", "report")


def report_uri(run_id: str) -> str:
    return f"convsim://runs/{run_id}/report"


@dataclass
class AgentTestJob:
    """A validated test_agent request whose run row exists; `run()` does every stage."""

    store: Store
    run_id: str
    target: Target
    description: str | None
    given_cases: list[TestCase]
    num_test_cases: int
    guidance: str | None
    adversarial: float
    max_turns: int
    repeats: int
    concurrency: int
    scorers: list[Scorer]
    user_llm: LLM
    judge_llm: LLM
    generator_llm: LLM
    user_class: type[SimulatedUser]
    ask_agent: bool = True
    introspect: bool = True
    workspace: WorkspaceArg = None
    shrink: bool = False
    usage: dict[str, Usage] = field(default_factory=dict)
    # A resume: the test set made before the interruption (its cases and profile), and the run's sessions
    test_set: TestSet | None = None
    sessions: list[Session] | None = None
    replay: dict[tuple[int, int], list[str]] | None = None  # from_run in mode 'replay' (see replay.py)
    continue_after_replay: bool = False
    profile: AgentProfile | None = None  # from_run: the earlier run's reading of the agent

    async def run(self, progress: ProgressFn | None = None) -> Report:
        started = time.time()
        total_cases = len(self.given_cases) + self.num_test_cases
        sessions_total = len(self.replay) if self.replay is not None else total_cases * self.repeats
        sim_steps = sessions_total * self.max_turns
        total = 2 + sim_steps + 2

        async def stage(done: int, message: str, sim: Progress | None = None) -> None:
            if progress:
                await progress(Progress(min(done, total), total, message,
                                        **({"sessions_done": sim.sessions_done, "sessions_total": sim.sessions_total,
                                            "failures": sim.failures} if sim else {})))

        try:
            profile: AgentProfile | None = self.test_set.profile if self.test_set else self.profile
            cases = list(self.given_cases)
            if self.num_test_cases:
                await stage(0, "describe: reading the agent (description, self-description, source)")
                profile = await self._spend(Role.GENERATOR, describe_agent(
                    self.generator_llm, description=self.description, target=self.target, ask_agent=self.ask_agent,
                    introspect=self.introspect, workspace=self.workspace))
                await stage(1, f"generate: writing {self.num_test_cases} test cases")
                cases += await self._spend(Role.GENERATOR, generate_cases(
                    profile, self.generator_llm, num_test_cases=self.num_test_cases, guidance=self.guidance,
                    adversarial=self.adversarial))
            _give_instructions(self.scorers, profile, self.description)
            test_set = self.test_set or TestSet(id=new_test_set_id(), name=f"test_agent {self.run_id}", created_at=time.time(),
                               cases=cases, profile=profile, sources=profile.sources if profile else ["given"],
                               offline=self.generator_llm.offline, usage=self.usage)
            if self.test_set is None:
                await self.store.save_test_set(test_set)
                await self.store.update_run_options(self.run_id, test_set_id=test_set.id)  # what a resume plays
            if self.replay is None:
                sessions_total = len(cases) * self.repeats
            await self.store.set_run_cases(self.run_id, cases, sessions_total)
            await stage(2, f"simulate: {sessions_total} conversations")

            async def sim_progress(p: Progress) -> None:
                await stage(2 + round(p.done * sim_steps / max(p.total, 1)), f"simulate: {p.message}", p)

            simulation = SimulationJob(self.store, self.run_id, self.target, cases, self.user_llm, self.user_class,
                                       self.max_turns, self.concurrency, self.repeats, self.scorers, self.judge_llm,
                                       finish_run=False, sessions=self.sessions, replay=self.replay,
                                       continue_after_replay=self.continue_after_replay)
            summary = await simulation.run(sim_progress)
            if summary.status == RunStatus.FAILED:  # e.g. a refused key: the run is already marked failed
                raise _Stopped(summary.error or "the simulation failed")
            await stage(2 + sim_steps, "discover: clustering failures into issues")
            sessions = await self.store.get_sessions(self.run_id)
            assessments = await self.store.get_assessments([s.id for s in sessions])
            issues = await self._spend(Role.ANALYST, discover_issues(sessions, assessments, self.judge_llm))
            if self.shrink:
                await stage(3 + sim_steps, "shrink: minimising each issue's reproducing case")
                issues = await shrink_reproductions(issues, self.target, self.user_class(self.user_llm),
                                                    self.scorers, self.judge_llm)
            await stage(3 + sim_steps, "report: writing the report")
            usage = dict(summary.usage)
            for role, u in self.usage.items():
                usage = add_usage(usage, role, u)
            report = build_report(
                run_id=self.run_id, target=summary.target, started_at=started, finished_at=time.time(),
                offline=self.user_llm.offline or self.judge_llm.offline or self.generator_llm.offline,
                models={Role.USER.value: self.user_llm.model, Role.JUDGE.value: self.judge_llm.model,
                        Role.GENERATOR.value: self.generator_llm.model, Role.ANALYST.value: self.judge_llm.model},
                agent=profile, test_set_id=test_set.id, test_cases=cases, sessions=summary.sessions,
                scores=summary.scores, issues=issues, usage=usage, untested=summary.untested,
                untested_sessions=summary.untested_sessions,
                trials=summarize_trials(sessions, assessments, self.repeats) if self.repeats > 1 else None,
            )
            await self.store.save_report(report, render_markdown(report))
            await self.store.finish_run(self.run_id, RunStatus.COMPLETED)
            await stage(total, f"done: {len(report.issues)} issues")
            return report
        except anyio.get_cancelled_exc_class():
            with anyio.CancelScope(shield=True):
                run = await self.store.get_run(self.run_id)
                if run["status"] == RunStatus.RUNNING.value:
                    await self.store.finish_run(self.run_id, RunStatus.CANCELLED, "cancelled; completed turns are kept")
            raise
        except Exception as e:
            # a refused key or a stopped simulation says what to fix in its own words; anything else is a bug
            error = str(e) if isinstance(e, (LLMAuthError, _Stopped)) else f"{type(e).__name__}: {e}"
            if isinstance(e, LLMAuthError):
                log.error("test_agent run %s failed: %s", self.run_id, error)
            else:
                log.exception("test_agent run %s failed", self.run_id)
            await self.store.finish_run(self.run_id, RunStatus.FAILED, error)
            failure = CouldNotTest if isinstance(e, (LLMError, _Stopped)) else RunError
            raise failure(f"test_agent run {self.run_id} failed: {error}") from e
        finally:
            with anyio.CancelScope(shield=True):  # a cancelled run still closes the agent's and models' connections
                await self.target.aclose()
                await close_models(self.user_llm, self.judge_llm, self.generator_llm)

    async def _spend(self, role: Role, call: Awaitable[tuple[R, Usage]]) -> R:
        """Await a (result, usage) model step and count its usage under `role`, also when it fails."""
        try:
            result, spent = await call
        except LLMError as e:
            self.usage = add_usage(self.usage, role.value, e.usage)
            raise
        self.usage = add_usage(self.usage, role.value, spent)
        return result


class _Stopped(RunError):
    """The simulation stage ended the run as failed (its error is already stored)."""


async def prepare_agent_test(
    store: Store,
    target: str | dict[str, Any] | TargetSpec,
    *,
    description: str | None = None,
    test_cases: Any = None,
    num_test_cases: int = 7,
    guidance: str | None = None,
    adversarial: float = 0.0,
    max_turns: int = 8,
    repeats: int = 1,
    concurrency: int = 8,
    scorers: list[Any] | None = None,
    model: str | None = None,
    user_model: str | None = None,
    judge_model: str | None = None,
    generator_model: str | None = None,
    user_agent: str | None = None,
    ask_agent: bool = True,
    introspect: bool = True,
    shrink: bool | None = None,
    workspace: WorkspaceArg = None,
    llm: LLM | None = None,
    from_run: str | None = None,
    mode: str | None = None,
    continue_after_replay: bool = False,
    cache: bool | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    rpm: float | None = None,
    tpm: float | None = None,
) -> AgentTestJob:
    """Validate everything a test_agent run needs, then create its run. Raises UserInputError.

    `from_run` plays an earlier run's test cases (by `mode`, see replay.py) and generates none.
    `cache`, `temperature`, `seed`, `rpm` and `tpm`: as for `prepare_simulation`, for every role's model calls.
    """
    use_cache = cache_enabled(cache)
    rpm, tpm = rate_limits(rpm, tpm)
    check_range("max_turns", max_turns, 1, MAX_TURNS_LIMIT)
    check_range("concurrency", concurrency, 1, MAX_CONCURRENCY)
    check_range("repeats", repeats, 1, MAX_REPEATS)
    check_range("num_test_cases", num_test_cases, 0, MAX_TEST_CASES)
    if not 0.0 <= adversarial <= 1.0:
        raise InvalidOption(f"adversarial must be a share from 0 to 1, got {adversarial!r}")
    check_replay_options(from_run, mode, continue_after_replay)
    workspace = as_workspace(workspace)
    source = None
    if from_run is not None:
        if test_cases:
            raise InvalidOption("give test_cases or from_run, not both: from_run plays the earlier run's cases")
        source = await load_from_run(store, from_run, mode=mode, continue_after_replay=continue_after_replay,
                                     repeats=repeats)
        given, num_test_cases = source.cases, 0  # the earlier run's cases are the test: nothing is generated
        if source.replay is not None:
            repeats = source.recorded_repeats
    else:
        given = await resolve_cases(store, test_cases, workspace=workspace) if test_cases else []
    if not given and num_test_cases == 0:
        raise InvalidOption("num_test_cases is 0 and no test_cases were given: nothing to test")
    resolved = resolve_target(target, workspace=workspace)
    resolved.check_cases(given)
    scorer_list = parse_scorers(scorers if scorers is not None else list(DEFAULT_SCORERS), workspace=workspace)
    user_class = load_user_class(user_agent, workspace=workspace)

    backends: dict[str, LLM] = {}

    def model_for(specific: str | None) -> LLM:
        """One backend per model name, so that roles sharing a model share one key check and one latch."""
        if llm is not None and (specific is None or resolve_model(specific) == llm.model):
            name = llm.model
            backends.setdefault(name, with_cache(llm, store, use_cache))
            return backends[name]
        name = resolve_model(specific or model)
        if name not in backends:
            backends[name] = with_cache(resolve_llm(name, max_concurrency=concurrency, temperature=temperature,
                                                    seed=seed, rpm=rpm, tpm=tpm), store, use_cache)
        return backends[name]

    user_llm, judge_llm, generator_llm = model_for(user_model), model_for(judge_model), model_for(generator_model)
    run_id = new_run_id()
    options = {"max_turns": max_turns, "concurrency": concurrency, "repeats": repeats, "user_agent": user_agent,
               "scorers": [s.name for s in scorer_list], "num_test_cases": num_test_cases, "guidance": guidance,
               "adversarial": adversarial, "judge_model": judge_llm.model, "generator_model": generator_llm.model,
               **(source.options() if source else {}), **sampling_options(user_llm, use_cache), "rpm": rpm,
               "tpm": tpm}
    options["resume"] = {"scorers": scorers, "description": description, "ask_agent": ask_agent,
                         "introspect": introspect, "shrink": (user_llm.offline and judge_llm.offline)
                         if shrink is None else shrink}  # what resume_run needs besides the options above
    replay = source.replay if source else None
    await store.create_run(run_id=run_id, kind="test_agent", target=redacted_spec(resolved.spec), options=options,
                           model=user_llm.model, offline=user_llm.offline, test_cases=given,
                           sessions_total=len(replay) if replay is not None else (len(given) + num_test_cases) * repeats)
    return AgentTestJob(store, run_id, resolved, description, given, num_test_cases, guidance, adversarial, max_turns,
                        repeats, concurrency, scorer_list, user_llm, judge_llm, generator_llm, user_class,
                        ask_agent, introspect, workspace,
                        shrink=(user_llm.offline and judge_llm.offline) if shrink is None else shrink,
                        replay=replay, continue_after_replay=continue_after_replay,
                        profile=source.profile if source else None)


INSTRUCTION_JUDGES = ("prompt_leak", "role_adherence")  # built-in judges that read the agent's instructions


def _give_instructions(scorers: list[Scorer], profile: AgentProfile | None, description: str | None) -> None:
    """Hand the agent's known instructions (its system prompt from the source, else the description) to the
    judges that compare replies against them, unless the caller gave them a `role` already."""
    role = (profile.system_prompt if profile and profile.system_prompt else None) or description
    if not role:
        return
    for s in scorers:
        if isinstance(s, BuiltinJudge) and s.name in INSTRUCTION_JUDGES and not s.params.get("role"):
            s.params["role"] = role


async def test_agent(store: Store, target: Any, *, progress: ProgressFn | None = None, **options: Any) -> Report:
    """Validate, then run every stage: `prepare_agent_test(...).run(progress)`."""
    return await (await prepare_agent_test(store, target, **options)).run(progress)


test_agent.__test__ = False  # type: ignore[attr-defined]  # not a pytest test
