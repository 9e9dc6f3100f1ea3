"""The MCP server: thin tools over `engine.pipeline`, transcripts as resources.

Each tool validates its arguments, calls one engine function and returns a
pydantic model sized for an assistant's context. Engine errors become
`ToolError`s carrying the engine's message (which says what to fix); full
transcripts are resources, not tool results.
"""

from __future__ import annotations

import functools
import json
import logging
from contextlib import asynccontextmanager
from typing import Annotated, Any, AsyncIterator, Awaitable, Callable, TypeVar

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from mcp.types import ToolAnnotations
from pydantic import BaseModel, Field, WithJsonSchema

from engine import ConvsimError, JobRegistry, NotFound, Progress, RunStatus, RunSummary, Store, TargetSpec, TestCase, Workspace
from engine.limits import MAX_JSON_DEPTH, has_lone_surrogate, json_depth
from engine.secrets import redact
from engine.text import clip
from engine.models import AgentProfile, Issue, Report, ScoreSummary, Usage
from engine.pipeline import describe_target, prepare_scoring, prepare_simulation, run_summary, run_uri, scores_uri, summarize_scores
from engine.pipeline.agent_test import prepare_agent_test, report_uri
from engine.pipeline.rerun import IssueCheck, rerun_issues
from engine.ids import check_run_id
from engine.pipeline.resume import prepare_resume
from engine.pipeline.compare import compare_runs, compare_uri, comparison_markdown
from engine.pipeline.generation import build_test_set
from engine.reports import ReportDigest, compact_result
from engine.reports.comparison import FlippedCase, IssueChange, ScorerChange
from engine.judging import list_builtin_scorers
from engine.records import session_to_record

log = logging.getLogger("convsim.server")

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
MAX_ERROR_CHARS = 2000  # an error echoes at most this much (a 1 MB id must not come back as a 1 MB message)

INSTRUCTIONS = """\
convsim tests a conversational agent by playing simulated users against it.
"Test my agent": call test_agent with the target (import path or URL). It describes the agent, generates test
cases, simulates, scores and returns ranked issues with evidence and reproducing cases; after a fix, call
rerun_issue to check whether each issue still reproduces. compare_runs(base, candidate) says whether a new version
got better or worse on the same test cases, with p-values and intervals.
Finer steps: generate_test_cases, simulate_conversations (target = the agent, test_cases = goals and personas).
Long runs: pass wait=false, then poll get_run; cancel_run stops a run and keeps completed turns, and resume_run
continues a cancelled or interrupted run from its last stored turns.
Judge conversations with score_sessions (a run id, session ids, inline transcripts or a JSONL file);
list_scorers describes the built-in judges. simulate_conversations also takes scorers to score as it goes.
Full transcripts are resources: convsim://runs/{run_id} and convsim://runs/{run_id}/sessions/{session_id};
full verdicts with evidence: convsim://runs/{run_id}/scores."""

TARGET_SCHEMA = {
    "anyOf": [
        {"type": "string", "description": "'pkg.module:func', 'path/to/file.py:func', or an http(s) URL of an "
                                          "OpenAI-compatible chat endpoint"},
        TargetSpec.model_json_schema(),
    ]
}
TEST_CASES_SCHEMA = {
    "anyOf": [
        {"type": "array", "items": TestCase.model_json_schema()},
        {"type": "string", "description": "Path to a .json, .jsonl, .yaml or .yml file of test cases"},
    ]
}
# Loose types plus a precise published schema: the engine validates, so errors name the case index and field.
TargetArg = Annotated[str | dict[str, Any], WithJsonSchema(TARGET_SCHEMA), Field(description="The agent under test.")]
TestCasesArg = Annotated[
    list[Any] | str,
    WithJsonSchema(TEST_CASES_SCHEMA),
    Field(description="Test cases (goal required; persona, simulation_guidelines, context, expectations, "
                      "scripted_turns, id optional), inline or as a file path."),
]


ScorersArg = Annotated[
    list[str | dict[str, Any]] | None,
    Field(description="Scorers: built-in judge names (see list_scorers), {name: 'guidelines', guidelines: [...]}, "
                      "custom judges {name, instructions with {{ conversation }}, output: 'bool' | "
                      "{labels, pass} | {range, threshold}}, or code scorers 'pkg.mod:fn' / 'file.py:fn'."),
]

FromRunArg = Annotated[str | None, Field(description="An earlier run's id: play its test cases (same ids and "
                                                     "indexes, so the runs can be compared) instead of test_cases.")]
ModeArg = Annotated[str | None, WithJsonSchema({"anyOf": [{"enum": ["resimulate", "replay"]}, {"type": "null"}]}), Field(
    description="With from_run: 'resimulate' (default) plays new simulated users on the same cases; 'replay' "
                "sends each earlier session's user messages verbatim, in order (same case and repeat); when they "
                "run out first the session ends replay_end.")]
ContinueArg = Annotated[bool, Field(description="With mode 'replay': when the recorded user messages run out, the "
                                                "simulated user takes over from there instead of ending replay_end.")]


CacheArg = Annotated[bool | None, Field(description="Answer model requests seen before from the response cache (no "
                                                   "call, no cost; hits count in usage.cache_hits), and store new "
                                                   "replies. Default: CONVSIM_CACHE (off).")]
TemperatureArg = Annotated[float | None, Field(description="Sampling temperature of every model call, 0-2. Default: "
                                                           "CONVSIM_TEMPERATURE, else the provider's.")]
SeedArg = Annotated[int | None, Field(description="Sampling seed sent with every model call (providers that take one "
                                                  "sample reproducibly). Default: CONVSIM_SEED, else none.")]
RpmArg = Annotated[float | None, Field(description="Most requests per minute to each model: queued and evenly paced, "
                                                   "slowed on 429. Default: CONVSIM_LLM_RPM, else unpaced.")]
TpmArg = Annotated[float | None, Field(description="Most tokens per minute to each model. Default: CONVSIM_LLM_TPM.")]


class ScorerInfo(BaseModel):
    name: str
    kind: str
    description: str = ""
    output: str = ""
    default: bool = Field(False, description="Used when no scorers are given.")


class ScorerList(BaseModel):
    scorers: list[ScorerInfo]
    custom_judge_format: str
    code_scorer_format: str


class TestAgentResult(BaseModel):
    """Compact: the issues and the numbers once done; the full report is a resource (and get_report)."""

    __test__ = False
    run_id: str
    status: RunStatus
    report: ReportDigest | None = Field(None, description="Issues ranked by severity, pass rates, usage; None "
                                                          "while the run is in progress.")
    markdown: str | None = Field(None, description="The human-readable report (get_report with markdown=true).")
    resources: dict[str, str] = Field(default_factory=dict)
    note: str | None = None


class TestSetResult(BaseModel):
    __test__ = False
    test_set_id: str
    name: str
    cases: list[TestCase]
    agent: AgentProfile | None = None
    sources: list[str]
    offline: bool
    usage: dict[str, Usage]
    resource: str
    note: str


class RerunResult(BaseModel):
    run_id: str = Field(description="The new run.")
    rerun_of: str
    issues: list[IssueCheck] = Field(description="Per old issue: status 'reproduces', 'fixed' or 'inconclusive' "
                                                 "(the failing turn was not reached), and the reason.")
    new_issues: list[Issue] = Field(description="Failures of the re-run that no old issue explains, with "
                                                "evidence and reproducing cases.")
    reproduces: int
    fixed: int
    inconclusive: int
    resource: str


class ResumeResult(BaseModel):
    """What a resume did: how many sessions went on, restarted or were kept, and the run as it stands."""

    run_id: str
    kind: str = Field(description="simulate or test_agent.")
    continued: int = Field(description="Sessions played on from their last stored turn.")
    restarted: int = Field(description="Sessions that had not started, run from scratch.")
    kept: int = Field(description="Sessions that had finished, kept as they were.")
    run: RunSummary = Field(description="The run now (status, resumed count, stop reasons, scores); per-session "
                                        "summaries via get_run.")
    report: ReportDigest | None = Field(None, description="test_agent: the issues and numbers once done.")
    note: str | None = None


MAX_FLIPS_SHOWN = 5


class CompareResult(BaseModel):
    """Compact: the verdict, the scorers and what changed; the whole comparison is a resource."""

    base: str
    candidate: str
    regression: bool = Field(description="A scorer's pass rate fell with p < 0.05, or a new high issue appeared.")
    regression_reasons: list[str]
    improvements: list[str]
    pairs: int = Field(description="Sessions paired by test case id and repeat index, both tested.")
    left_out: dict[str, int]
    scorers: list[ScorerChange]
    pass_to_fail: int
    fail_to_pass: int
    first_pass_to_fail: list[FlippedCase] = Field(description=f"At most {MAX_FLIPS_SHOWN}; the rest are in the "
                                                              "resource.")
    new_issues: list[IssueChange]
    fixed_issues: list[IssueChange]
    persisting_issues: int
    resources: dict[str, str]


def _resources(run_id: str) -> dict[str, str]:
    return {"report": report_uri(run_id), "report_md": report_uri(run_id) + ".md", "run": run_uri(run_id),
            "scores": scores_uri(run_id)}


def _done(report: Report, markdown: str | None = None) -> TestAgentResult:
    resources = _resources(report.run_id)
    return TestAgentResult(run_id=report.run_id, status=RunStatus.COMPLETED,
                           report=compact_result(report, resources=resources), markdown=markdown,
                           resources=resources, note=report.note)


class RunBrief(BaseModel):
    run_id: str
    kind: str
    status: RunStatus
    created_at: float
    target: str
    model: str
    sessions_total: int
    resource: str


class RunList(BaseModel):
    runs: list[RunBrief]


def _guarded(error: type[ToolError] | type[ResourceError]) -> Callable[[F], F]:
    """Every failure reaches the caller with its reason, never the SDK's masked "Error executing tool".

    Arguments nested deeper than MAX_JSON_DEPTH, or holding a lone UTF-16 surrogate (not text: it
    could be neither stored nor sent back), are refused before the handler runs; engine
    errors become `error` with their message (which says what to fix); anything else is a bug,
    logged with its traceback and reported as such. Messages are redacted.
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            for name, value in kwargs.items():
                if json_depth(value) > MAX_JSON_DEPTH:
                    raise error(f"argument '{name}' is nested more than {MAX_JSON_DEPTH} levels deep "
                                "(MAX_JSON_DEPTH)")
                if has_lone_surrogate(value):
                    raise error(f"argument '{name}' holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is "
                                "not text: send valid Unicode")
            try:
                return await fn(*args, **kwargs)
            except (ToolError, ResourceError) as e:
                raise error(clip(redact(str(e)), MAX_ERROR_CHARS)) from e
            except ConvsimError as e:
                raise error(clip(redact(str(e)), MAX_ERROR_CHARS)) from e
            except Exception as e:
                log.exception("%s failed", fn.__name__)
                raise error(clip(redact(f"internal error in {fn.__name__}: {type(e).__name__}: {e}"), MAX_ERROR_CHARS)
                            + ". This is a convsim bug (please report it); the server is still running.") from e

        return wrapper  # type: ignore[return-value]

    return decorate


tool_errors = _guarded(ToolError)
resource_errors = _guarded(ResourceError)


def build_server(store: Store | None = None, registry: JobRegistry | None = None, *,
                 workspace: Workspace | None = None, server_options: dict[str, Any] | None = None) -> MCPServer:
    """The convsim MCP server. `store` defaults to $CONVSIM_HOME/convsim.sqlite.

    `workspace` (default: the working directory and CONVSIM_ROOTS, code allowed) says what callers may
    run, read and reach; `server_options` go to the MCPServer constructor as they are (the transport's
    auth settings).
    """
    store = store or Store()
    registry = registry or JobRegistry()
    workspace = workspace or Workspace.default()

    @asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[dict[str, Any]]:
        await store.mark_interrupted()
        async with registry.running():
            yield {}

    server = MCPServer("convsim", instructions=INSTRUCTIONS, log_level="WARNING", lifespan=lifespan,
                       **(server_options or {}))

    @server.tool(annotations=ToolAnnotations(readOnlyHint=False, openWorldHint=True))
    @tool_errors
    async def simulate_conversations(
        target: TargetArg,
        ctx: Context,
        test_cases: Annotated[TestCasesArg | None, Field(description="Test cases (goal required; persona, "
                                                                     "simulation_guidelines, context, expectations, "
                                                                     "scripted_turns, id optional), inline or as a "
                                                                     "file path. Required unless from_run.")] = None,
        max_turns: Annotated[int, Field(description="Most user messages per conversation (1-100).")] = 10,
        model: Annotated[str | None, Field(description="Simulated user's model, e.g. 'openai/gpt-4o-mini' or "
                                                       "'openai:/gpt-4o-mini'; 'offline' for the no-LLM heuristic. "
                                                       "Default: CONVSIM_MODEL, else by available API key.")] = None,
        concurrency: Annotated[int, Field(description="Conversations run at the same time.")] = 8,
        repeats: Annotated[int, Field(description="Run each test case this many times (separate sessions).")] = 1,
        user_agent: Annotated[str | None, Field(description="Custom simulated user: 'pkg.mod:Class' subclassing "
                                                            "engine.SimulatedUser.")] = None,
        scorers: Annotated[ScorersArg, Field(description="Score each session as it finishes (see score_sessions). "
                                                         "Default: none.")] = None,
        judge_model: Annotated[str | None, Field(description="Judges' model; default: the user's model.")] = None,
        from_run: FromRunArg = None,
        mode: ModeArg = None,
        continue_after_replay: ContinueArg = False,
        wait: Annotated[bool, Field(description="true: return when done, reporting progress per turn. false: "
                                                "return the run id at once; poll get_run.")] = True,
        cache: CacheArg = None,
        temperature: TemperatureArg = None,
        seed: SeedArg = None,
        rpm: RpmArg = None,
        tpm: TpmArg = None,
    ) -> RunSummary:
        """Play simulated users against an agent for many turns and store the conversations.

        Returns per session the stop reason (goal_achieved, user_ended, max_turns, agent_error,
        agent_empty, simulator_error, cancelled, replay_end), the turn count and the last exchange.
        With from_run, re-tests a new version on an earlier run's cases (mode 'replay': its user messages verbatim).
        """
        job = await prepare_simulation(
            store, target, test_cases, max_turns=max_turns, model=model, concurrency=concurrency,
            repeats=repeats, user_agent=user_agent, scorers=scorers, judge_model=judge_model, workspace=workspace,
            from_run=from_run, mode=mode, continue_after_replay=continue_after_replay,
            cache=cache, temperature=temperature, seed=seed, rpm=rpm, tpm=tpm,
        )
        if not wait:
            registry.start(job)
            return await run_summary(store, job.run_id)

        registry.start(job, on_progress=_forward(ctx))
        try:
            await registry.wait(job.run_id)
        except anyio.get_cancelled_exc_class():
            registry.cancel(job.run_id)  # the caller gave up waiting: stop the run, keep its turns
            raise
        return await run_summary(store, job.run_id)

    @server.tool(annotations=ToolAnnotations(readOnlyHint=False, openWorldHint=True))
    @tool_errors
    async def test_agent(
        target: TargetArg,
        ctx: Context,
        description: Annotated[str | None, Field(description="What the agent is for, in plain text (optional: "
                                                             "the agent is also asked, and Python agents' source "
                                                             "is read).")] = None,
        test_cases: Annotated[TestCasesArg | None, Field(description="Your own cases (or a test set id) to run "
                                                                     "besides the generated ones.")] = None,
        num_test_cases: Annotated[int, Field(description="Cases to generate (0-50).")] = 7,
        guidance: Annotated[str | None, Field(description="What to focus the generated cases on.")] = None,
        adversarial: Annotated[float, Field(description="Share of red-team cases (0-1).")] = 0.0,
        max_turns: Annotated[int, Field(description="Most user messages per conversation.")] = 8,
        model: Annotated[str | None, Field(description="Model for every role unless set per role; 'offline' for "
                                                       "the no-LLM heuristics.")] = None,
        user_model: Annotated[str | None, Field(description="Simulated user's model.")] = None,
        judge_model: Annotated[str | None, Field(description="Judges' and issue analysis's model.")] = None,
        generator_model: Annotated[str | None, Field(description="Test-case generator's model.")] = None,
        scorers: Annotated[ScorersArg, Field(description="Default: goal_achievement, conversation_completeness, "
                                                         "user_frustration, knowledge_retention, "
                                                         "tool_call_efficiency.")] = None,
        repeats: Annotated[int, Field(description="Run each case this many times (finds intermittent issues).")] = 1,
        concurrency: Annotated[int, Field(description="Conversations at the same time.")] = 8,
        shrink: Annotated[bool | None, Field(description="Shrink each issue's reproducing case to the user turns "
                                                         "it needs (replays; default: on when the user and judge "
                                                         "are offline, off with a model since replays cost calls).")] = None,
        from_run: Annotated[FromRunArg, Field(description="Re-test on this earlier run's test cases (same ids); "
                                                          "nothing is generated.")] = None,
        mode: ModeArg = None,
        continue_after_replay: ContinueArg = False,
        wait: Annotated[bool, Field(description="true: return the issues when done (progress per stage and turn). "
                                                "false: return the run id at once; poll get_run, then get_report.")] = True,
        cache: CacheArg = None,
        temperature: TemperatureArg = None,
        seed: SeedArg = None,
        rpm: RpmArg = None,
        tpm: TpmArg = None,
    ) -> TestAgentResult:
        """Test an agent end to end: describe it, generate cases, simulate users, judge, and report issues.

        Returns the issues ranked by severity (what broke, how badly, where: session, turn, quote) and the
        numbers; each issue in the full report has a reproducing test case. After changing the agent, call
        rerun_issue to see whether each issue still reproduces.
        """
        job = await prepare_agent_test(
            store, target, description=description, test_cases=test_cases, num_test_cases=num_test_cases,
            guidance=guidance, adversarial=adversarial, max_turns=max_turns, repeats=repeats,
            concurrency=concurrency, scorers=scorers, model=model, user_model=user_model,
            judge_model=judge_model, generator_model=generator_model, shrink=shrink, workspace=workspace,
            from_run=from_run, mode=mode, continue_after_replay=continue_after_replay,
            cache=cache, temperature=temperature, seed=seed, rpm=rpm, tpm=tpm,
        )
        if not wait:
            registry.start(job)
            return TestAgentResult(
                run_id=job.run_id, status=RunStatus.RUNNING, resources=_resources(job.run_id),
                note=f"Running in the background: call get_run with run_id '{job.run_id}' for progress, then "
                     "get_report when its status is completed.",
            )
        registry.start(job, on_progress=_forward(ctx))
        try:
            await registry.wait(job.run_id)
        except anyio.get_cancelled_exc_class():
            registry.cancel(job.run_id)
            raise
        try:
            report, _ = await store.get_report(job.run_id)
        except NotFound:
            run = await store.get_run(job.run_id)
            raise ToolError(f"test_agent run {job.run_id} ended {run['status']}: {run['error'] or 'no report'}") from None
        return _done(report)

    @server.tool(annotations=ToolAnnotations(readOnlyHint=True, openWorldHint=False))
    @tool_errors
    async def get_report(
        run_id: Annotated[str, Field(description="A test_agent run.")],
        markdown: Annotated[bool, Field(description="Include the Markdown report a person reads.")] = False,
    ) -> TestAgentResult:
        """The issues and numbers of a finished test_agent run (optionally with the Markdown report)."""
        report, text = await store.get_report(run_id)
        return _done(report, markdown=text if markdown else None)

    @server.tool(annotations=ToolAnnotations(readOnlyHint=False, openWorldHint=True))
    @tool_errors
    async def rerun_issue(
        run_id: Annotated[str, Field(description="The test_agent run whose issues to check.")],
        ctx: Context,
        issue_id: Annotated[str | None, Field(description="One issue (its reproducing case is re-run); omit to "
                                                          "re-run every case of the run.")] = None,
        target: Annotated[TargetArg | None, Field(description="The agent, if it moved or its headers held "
                                                               "secrets; default: the run's target.")] = None,
        max_turns: Annotated[int | None, Field(description="Default: the run's.")] = None,
        model: Annotated[str | None, Field(description="Default: the run's models.")] = None,
        repeats: Annotated[int | None, Field(description="Re-runs per case; default: the run's, at least 3 for an "
                                                         "issue seen in only some sessions.", ge=1, le=20)] = None,
        rpm: Annotated[float | None, Field(description="As for test_agent; default: the run's.")] = None,
        tpm: Annotated[float | None, Field(description="As for test_agent; default: the run's.")] = None,
    ) -> RerunResult:
        """After changing the agent: re-run and say, per issue, whether it reproduces, is fixed, or could not be
        checked (inconclusive: the failing turn was not reached), plus any new issues."""
        outcome = await rerun_issues(store, run_id, issue_id=issue_id, target=target, max_turns=max_turns,
                                     model=model, repeats=repeats, progress=_forward(ctx), workspace=workspace,
                                     rpm=rpm, tpm=tpm)
        count = {s: sum(c.status == s for c in outcome.issues) for s in ("reproduces", "fixed", "inconclusive")}
        return RerunResult(run_id=outcome.run_id, rerun_of=run_id, issues=outcome.issues,
                           new_issues=outcome.new_issues, **count, resource=run_uri(outcome.run_id))

    @server.tool(name="compare_runs", annotations=ToolAnnotations(readOnlyHint=True, openWorldHint=False))
    @tool_errors
    async def compare_runs_tool(
        base: Annotated[str, Field(description="The earlier run id (e.g. before the change).")],
        candidate: Annotated[str, Field(description="The run id to judge against it (same test cases).")],
    ) -> CompareResult:
        """Compare two runs of the same test cases (e.g. before and after a change to the agent): per scorer the
        paired pass rates, difference, exact McNemar p-value and bootstrap 95% interval; the cases that flipped;
        issues new, fixed or persisting; cost and latency. The whole comparison: convsim://compare/{base}/{candidate}
        (Markdown: .../report.md)."""
        c = await compare_runs(store, base, candidate)
        uri = compare_uri(base, candidate)
        return CompareResult(base=c.base, candidate=c.candidate, regression=c.regression,
                             regression_reasons=c.regression_reasons, improvements=c.improvements, pairs=c.pairs,
                             left_out=c.left_out, scorers=c.scorers, pass_to_fail=len(c.flipped.pass_to_fail),
                             fail_to_pass=len(c.flipped.fail_to_pass),
                             first_pass_to_fail=c.flipped.pass_to_fail[:MAX_FLIPS_SHOWN], new_issues=c.issues.new,
                             fixed_issues=c.issues.fixed, persisting_issues=len(c.issues.persisting),
                             resources={"comparison": uri, "report_md": uri + "/report.md"})

    @server.tool(annotations=ToolAnnotations(readOnlyHint=False, openWorldHint=True))
    @tool_errors
    async def generate_test_cases(
        description: Annotated[str | None, Field(description="What the agent does, in plain text.")] = None,
        target: Annotated[TargetArg | None, Field(description="The agent: it is asked to describe itself, and a "
                                                               "Python agent's source (system prompt, tools, "
                                                               "docstrings) is read.")] = None,
        run_id: Annotated[str | None, Field(description="Distill cases from this run's conversations.")] = None,
        session_ids: Annotated[list[str] | None, Field(description="Distill cases from these sessions.")] = None,
        file: Annotated[str | None, Field(description="Distill cases from a JSONL file of conversations.")] = None,
        num_test_cases: Annotated[int, Field(description="Cases to generate (1-50); each distinct transcript adds "
                                                         "one distilled case.")] = 7,
        guidance: Annotated[str | None, Field(description="What to focus on.")] = None,
        adversarial: Annotated[float, Field(description="Share of red-team cases (0-1).")] = 0.0,
        ask_agent: Annotated[bool, Field(description="Ask the target to describe itself.")] = True,
        model: Annotated[str | None, Field(description="Generator's model; 'offline' for templates.")] = None,
        name: Annotated[str | None, Field(description="A name for the test set.")] = None,
        cache: CacheArg = None,
        temperature: TemperatureArg = None,
        seed: SeedArg = None,
        rpm: RpmArg = None,
        tpm: TpmArg = None,
    ) -> TestSetResult:
        """Write realistic test cases (goal, persona, guidelines, expectations) and store them as a test set.

        Sources, any combination: a description, the agent itself, its source, existing transcripts.
        """
        test_set = await build_test_set(store, description=description, target=target, run_id=run_id,
                                        session_ids=session_ids, file=file, num_test_cases=num_test_cases,
                                        guidance=guidance, adversarial=adversarial, ask_agent=ask_agent,
                                        model=model, name=name, workspace=workspace, cache=cache,
                                        temperature=temperature, seed=seed, rpm=rpm, tpm=tpm)
        return TestSetResult(
            test_set_id=test_set.id, name=test_set.name, cases=test_set.cases, agent=test_set.profile,
            sources=test_set.sources, offline=test_set.offline, usage=test_set.usage,
            resource=f"convsim://test-sets/{test_set.id}",
            note=f"Pass test_cases='{test_set.id}' to simulate_conversations or test_agent to run these cases."
                 + (" Written by the offline templates, not a model." if test_set.offline else ""),
        )

    @server.tool(annotations=ToolAnnotations(readOnlyHint=False, openWorldHint=True))
    @tool_errors
    async def score_sessions(
        ctx: Context,
        run_id: Annotated[str | None, Field(description="Score every session of this run.")] = None,
        session_ids: Annotated[list[str] | None, Field(description="Score these stored sessions.")] = None,
        transcripts: Annotated[list[dict[str, Any]] | None, Field(
            description="Conversations you already have: [{session_id?, messages: [{role, content, tool_calls?}], "
                        "goal?, expectations?}]. Stored as a new run.")] = None,
        file: Annotated[str | None, Field(description="A JSONL file: one session per line (convsim export format) "
                                                      "or one list of OpenAI messages per line.")] = None,
        scorers: Annotated[ScorersArg, Field(description="Default: goal_achievement, conversation_completeness, "
                                                         "user_frustration, knowledge_retention, tool_call_efficiency.")] = None,
        model: Annotated[str | None, Field(description="Judges' model ('provider/model'); 'offline' for the "
                                                       "deterministic heuristics. Default as for simulation.")] = None,
        concurrency: Annotated[int, Field(description="Judge calls at the same time.")] = 8,
        cache: CacheArg = None,
        temperature: TemperatureArg = None,
        seed: SeedArg = None,
        rpm: RpmArg = None,
        tpm: TpmArg = None,
    ) -> ScoreSummary:
        """Judge whole conversations: per scorer, the pass rate and the failing sessions with one-line rationales.

        Give exactly one of run_id, session_ids, transcripts or file. Full verdicts (rationale, evidence turns
        and quotes) are in convsim://runs/{run_id}/scores. Reports progress per scored (session, scorer) pair.
        """
        job = await prepare_scoring(store, run_id=run_id, session_ids=session_ids, transcripts=transcripts,
                                    file=file, scorers=scorers, model=model, concurrency=concurrency,
                                    workspace=workspace, cache=cache, temperature=temperature, seed=seed,
                                    rpm=rpm, tpm=tpm)

        return await job.run(_forward(ctx))

    @server.tool(annotations=ToolAnnotations(readOnlyHint=True, openWorldHint=False))
    @tool_errors
    async def list_scorers() -> ScorerList:
        """The built-in judges, and how to write custom judges and code scorers."""
        return ScorerList(
            scorers=[ScorerInfo(**d) for d in list_builtin_scorers()],
            custom_judge_format='{"name": "polite", "instructions": "Is the assistant polite? {{ conversation }}", '
                                '"output": "bool" | {"labels": ["good", "ok", "bad"], "pass": ["good", "ok"]} | '
                                '{"range": [1, 5], "threshold": 4}}; variables: {{ conversation }} (required), '
                                '{{ goal }}, {{ expectations }}',
            code_scorer_format="'pkg.mod:fn' or 'file.py:fn'. fn(session, expectations?) is session-level; "
                               "fn(inputs?, outputs?, turn?, expectations?) runs per agent turn. Return bool, a "
                               "number, a label, or {value, passed, rationale}.",
        )

    @server.tool(annotations=ToolAnnotations(readOnlyHint=True, openWorldHint=False))
    @tool_errors
    async def get_run(run_id: Annotated[str, Field(description="Id returned by simulate_conversations.")]) -> RunSummary:
        """Status, progress and per-session summaries of a run."""
        return await run_summary(store, run_id)

    @server.tool(annotations=ToolAnnotations(readOnlyHint=True, openWorldHint=False))
    @tool_errors
    async def list_runs(limit: Annotated[int, Field(ge=1, le=200, description="Most recent runs to list.")] = 20) -> RunList:
        """The most recent runs, newest first."""
        runs = await store.list_runs(limit)
        return RunList(runs=[
            RunBrief(run_id=r["id"], kind=r["kind"], status=RunStatus(r["status"]), created_at=r["created_at"],
                     target=describe_target(r["target"]),
                     model=r["model"], sessions_total=r["sessions_total"], resource=run_uri(r["id"]))
            for r in runs
        ])

    @server.tool(annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=False, openWorldHint=False))
    @tool_errors
    async def cancel_run(run_id: Annotated[str, Field(description="The run to stop.")]) -> RunSummary:
        """Stop a running run. Completed turns are kept; unfinished sessions end with stop reason 'cancelled'."""
        summary = await run_summary(store, run_id)
        if summary.status != RunStatus.RUNNING:
            raise ToolError(f"run '{run_id}' is not running (status: {summary.status.value}); nothing to cancel")
        if not registry.cancel(run_id):
            raise ToolError(f"run '{run_id}' is running in another process; stop that process to cancel it")
        await registry.wait(run_id)
        return await run_summary(store, run_id)

    @server.tool(annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=False, openWorldHint=True))
    @tool_errors
    async def resume_run(
        run_id: Annotated[str, Field(description="An interrupted (its process died) or cancelled run.")],
        ctx: Context,
        target: Annotated[TargetArg | None, Field(description="The agent again, only if its stored spec had a "
                                                               "secret masked (a literal header value); default: "
                                                               "the run's target.")] = None,
        wait: Annotated[bool, Field(description="true: return when done. false: return at once; poll get_run "
                                                "(and get_report for a test_agent run).")] = True,
    ) -> ResumeResult:
        """Continue an interrupted or cancelled run from its last stored turns, then score (and, for a test_agent
        run, find issues and report) as the original job would. Finished sessions are kept; unfinished ones go on
        with their stored history; sessions never started run from scratch. No completed turn is lost or
        repeated."""
        check_run_id(run_id)
        if registry.is_live(run_id):
            raise ToolError(f"run '{run_id}' is running in this server; wait for it, or cancel_run it first")
        job = await prepare_resume(store, run_id, target=target, workspace=workspace)
        counts = {"continued": job.continued, "restarted": job.restarted, "kept": job.kept}
        if not wait:
            registry.start(job)
            return ResumeResult(run_id=run_id, kind=job.kind, **counts, run=await run_summary(store, run_id),
                                note=f"Resuming in the background: call get_run with run_id '{run_id}' for progress"
                                     + (", then get_report." if job.kind == "test_agent" else "."))
        registry.start(job, on_progress=_forward(ctx))
        try:
            await registry.wait(run_id)
        except anyio.get_cancelled_exc_class():
            registry.cancel(run_id)
            raise
        summary = await run_summary(store, run_id)
        report = None
        if job.kind == "test_agent" and summary.status == RunStatus.COMPLETED:
            full, _ = await store.get_report(run_id)
            report = compact_result(full, resources=_resources(run_id))
        return ResumeResult(run_id=run_id, kind=job.kind, **counts, run=summary.model_copy(update={"sessions": []}),
                            report=report, note=summary.note)

    @server.resource("convsim://runs/{run_id}", mime_type="application/json",
                     description="A run: summary and every session's full transcript (JSON).")
    @resource_errors
    async def run_resource(run_id: str) -> str:
        summary = await run_summary(store, run_id)
        sessions = await store.get_sessions(run_id)
        return json.dumps({"run": summary.model_dump(mode="json", exclude={"sessions"}),
                           "sessions": [session_to_record(s) for s in sessions]}, ensure_ascii=False)

    @server.resource("convsim://runs/{run_id}/report", mime_type="application/json",
                     description="A test_agent run's full report (JSON): agent profile, cases, sessions, scores, "
                                 "issues with evidence and reproducing cases, usage.")
    @resource_errors
    async def report_resource(run_id: str) -> str:
        report, _ = await store.get_report(run_id)
        return report.model_dump_json()

    @server.resource("convsim://runs/{run_id}/report.md", mime_type="text/markdown",
                     description="A test_agent run's report as Markdown, for a person.")
    @resource_errors
    async def report_markdown_resource(run_id: str) -> str:
        _, text = await store.get_report(run_id)
        return text

    @server.resource("convsim://compare/{base}/{candidate}", mime_type="application/json",
                     description="The whole comparison of two runs (JSON): scorers with p-values and intervals, "
                                 "every flipped case with session ids, issues new/fixed/persisting, cost, latency, "
                                 "stop reasons.")
    @resource_errors
    async def compare_resource(base: str, candidate: str) -> str:
        return (await compare_runs(store, base, candidate)).model_dump_json()

    @server.resource("convsim://compare/{base}/{candidate}/report.md", mime_type="text/markdown",
                     description="The comparison of two runs as Markdown: what got better, what got worse, how "
                                 "sure we are.")
    @resource_errors
    async def compare_markdown_resource(base: str, candidate: str) -> str:
        return comparison_markdown(await compare_runs(store, base, candidate))

    @server.resource("convsim://test-sets/{set_id}", mime_type="application/json",
                     description="A generated test set: its cases (loadable as test cases) and the agent profile.")
    @resource_errors
    async def test_set_resource(set_id: str) -> str:
        return (await store.get_test_set(set_id)).model_dump_json()

    @server.resource("convsim://runs/{run_id}/scores", mime_type="application/json",
                     description="Every verdict on a run's sessions: value, pass, rationale, evidence turns and quotes.")
    @resource_errors
    async def scores_resource(run_id: str) -> str:
        await store.get_run(run_id)
        sessions = await store.get_sessions(run_id, with_messages=False)
        assessments = await store.get_assessments([s.id for s in sessions])
        return json.dumps({"run_id": run_id,
                           "summary": [x.model_dump(mode="json") for x in summarize_scores(assessments)],
                           "assessments": [a.model_dump(mode="json", exclude_none=True) for a in assessments]},
                          ensure_ascii=False)

    @server.resource("convsim://runs/{run_id}/sessions/{session_id}", mime_type="application/json",
                     description="One session's full transcript with test case, stop reason and usage (JSON).")
    @resource_errors
    async def session_resource(run_id: str, session_id: str) -> str:
        session = await store.get_session(session_id, run_id=run_id)
        return json.dumps(session_to_record(session), ensure_ascii=False)

    return server


def _forward(ctx: Context):
    """A progress callback that reports to the MCP client and outlives it (a gone client stops nothing)."""

    async def forward(p: Progress) -> None:
        try:
            await ctx.report_progress(p.done, p.total, p.message)
        except Exception:
            pass

    return forward
