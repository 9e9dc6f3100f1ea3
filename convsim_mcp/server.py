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
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from pydantic import BaseModel, Field, WithJsonSchema

from engine import ConvsimError, JobRegistry, NotFound, Progress, RunStatus, Store, TargetSpec, TestCase, Workspace
from engine.limits import MAX_JSON_DEPTH, has_lone_surrogate, json_depth
from engine.secrets import redact
from engine.text import clip
from engine.models import AgentProfile, Issue, Report, ScoreSummary, Usage
from engine.models import IssueCheck
from engine.ids import check_run_id
from engine.reports.markdown import ReportDigest, compact_result
from engine.pipeline._shared import MAX_CONCURRENCY
from engine.reports.comparison import FlippedCase, IssueChange, ScorerChange
from engine.records import session_to_record
from engine._lazy import deferred

# The tools' entry points, imported at a tool's first call: `tools/list` needs only the models above (engine/_lazy.py).
describe_target, prepare_scoring, prepare_simulation, run_summary, run_uri, scores_uri, summarize_scores = deferred(
    "engine.pipeline", "describe_target", "prepare_scoring", "prepare_simulation", "run_summary", "run_uri",
    "scores_uri", "summarize_scores")
prepare_agent_test, report_uri = deferred("engine.pipeline.agent_test", "prepare_agent_test", "report_uri")
rerun_issues = deferred("engine.pipeline.rerun", "rerun_issues")
prepare_resume = deferred("engine.pipeline.resume", "prepare_resume")
compare_runs, compare_uri, comparison_markdown = deferred("engine.pipeline.compare", "compare_runs", "compare_uri",
                                                          "comparison_markdown")
build_test_set = deferred("engine.pipeline.generation", "build_test_set")
list_builtin_scorers = deferred("engine.judging", "list_builtin_scorers")
comparison_html, run_report_html = deferred("engine.reports.html", "comparison_html", "run_report_html")

from .views import (MAX_PAGE, MAX_RESULT_BYTES, SESSIONS_SHOWN, RunView, cap, compact_json, fit, lean_schema, trim,
                    optional_without_null, result_bytes, run_view)

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
Results stay small whatever the run's size: a run lists its failed and untested sessions first and says how many
it left out; get_run(offset=next_offset) and get_report(offset=next_offset) page on.
Judge conversations with score_sessions (a run id, session ids, inline transcripts or a JSONL file);
list_scorers describes the built-in judges. simulate_conversations also takes scorers to score as it goes.
Full transcripts are resources: convsim://runs/{run_id} and convsim://runs/{run_id}/sessions/{session_id};
full verdicts with evidence: convsim://runs/{run_id}/scores."""


def _short(schema: dict[str, Any], descriptions: dict[str, str]) -> dict[str, Any]:
    """A model's JSON schema with these field descriptions (the others dropped) and no model docstring:
    what a caller needs to fill it in, and nothing more."""
    props = {name: {k: v for k, v in sub.items() if k != "description"} | (
        {"description": descriptions[name]} if name in descriptions else {})
        for name, sub in schema["properties"].items()}
    return {k: v for k, v in schema.items() if k != "description"} | {"properties": props}


TARGET_SCHEMA = {
    "anyOf": [
        {"type": "string"},
        _short(TargetSpec.model_json_schema(), {
            "path": "Python agent.",
            "url": "HTTP agent.",
            "model": "Sent as 'model' (kind openai).",
            "headers": "Values may be ${ENV_VAR}.",
            "request": "kind json: body template ({{message}}, {{session_id}}, {{context.KEY}}).",
            "response_path": "kind json: dotted path to the reply, e.g. 'reply.text'.",
        }),
    ]
}
TEST_CASES_SCHEMA = {
    "anyOf": [
        {"type": "array", "items": _short(TestCase.model_json_schema(), {
            "goal": "What the user wants (and the expected outcome).",
            "persona": "Who the user is, how they talk.",
            "simulation_guidelines": "Rules for the simulated user.",
            "context": "Keyword arguments for a Python agent.",
            "scripted_turns": "Opening user messages, sent verbatim.",
            "id": "Default: the index.",
            "tags": "Your labels; never shown to the user or the judges.",
        })},
        {"type": "string"},
    ]
}
TARGET_DESCRIPTION = "The agent: 'pkg.mod:func', 'file.py:func', an OpenAI-compatible chat URL, or an object."
# Loose types plus a precise published schema: the engine validates, so errors name the case index and field.
TargetArg = Annotated[str | dict[str, Any], WithJsonSchema(TARGET_SCHEMA), Field(description=TARGET_DESCRIPTION)]
# Other tools that take an agent: test_agent's forms, without repeating them.
LooseTargetArg = Annotated[str | dict[str, Any] | None, WithJsonSchema({"type": ["string", "object", "null"]})]
TestCasesArg = Annotated[list[Any] | str, WithJsonSchema(TEST_CASES_SCHEMA),
                         Field(description="Inline, a .json/.jsonl/.yaml file, or a test set id.")]

ScorersArg = Annotated[
    list[str | dict[str, Any]] | None,
    Field(description="Judge names (list_scorers), custom judges {name, instructions, output} or code scorers "
                      "'pkg.mod:fn'."),
]

FromRunArg = Annotated[str | None, Field(description="Play this earlier run's cases instead (for compare_runs).")]
ModeArg = Annotated[str | None, WithJsonSchema({"enum": ["resimulate", "replay", None]}), Field(
    description="from_run: new users (default), or its user messages verbatim.")]
ContinueArg = Annotated[bool, Field(description="replay: then the simulated user goes on.")]

CacheArg = Annotated[bool | None, Field(description="Use the response cache. Default: CONVSIM_CACHE.")]
TemperatureArg = Annotated[float | None, Field(description="0-2. Default: CONVSIM_TEMPERATURE.")]
SeedArg = Annotated[int | None, Field(description="Default: CONVSIM_SEED.")]
RpmArg = Annotated[float | None, Field(description="Requests/min per model.")]
TpmArg = Annotated[float | None, Field(description="Tokens/min per model.")]


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
    offset: int = Field(0, description="Index of the first of report.issues.")
    next_offset: int | None = Field(None, description="get_report with this offset lists more issues.")
    left_out: int = Field(0, description="Agent issues not listed here.")
    simulator_issues_left_out: int = 0
    resources: dict[str, str] = Field(default_factory=dict)
    note: str | None = None


class TestSetResult(BaseModel):
    __test__ = False
    test_set_id: str
    name: str
    cases: list[TestCase] = Field(description="The first cases; every case: resource.")
    cases_left_out: int = 0
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
    issues_left_out: int = 0
    new_issues_left_out: int = Field(0, description="Not listed here: see the new run's report.")
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
    run: RunView = Field(description="The run now; more sessions via get_run.")
    report: ReportDigest | None = Field(None, description="test_agent: the numbers and the first issues "
                                                          "(get_report pages on).")
    issues_left_out: int = 0
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
    new_issues_left_out: int = 0
    fixed_issues_left_out: int = Field(0, description="Not listed here: see the comparison resource.")
    persisting_issues: int
    resources: dict[str, str]


def _resources(run_id: str) -> dict[str, str]:
    return {"report": report_uri(run_id), "report_md": report_uri(run_id) + ".md",
            "report_html": report_uri(run_id) + ".html", "run": run_uri(run_id), "scores": scores_uri(run_id)}


RESUMED_ISSUES_SHOWN = 3  # beside the run's aggregates
ISSUES_SHOWN = 5  # agent issues a test_agent result lists by default (get_report pages on)
SIMULATOR_ISSUES_SHOWN = 3
FLAKY_CASES_SHOWN = 5


def _done(report: Report, markdown: str | None = None, *, offset: int = 0, limit: int = ISSUES_SHOWN) -> TestAgentResult:
    """A finished report for a tool result: its numbers and a page of issues, within MAX_RESULT_BYTES (the
    Markdown only when it fits too: otherwise resources.report_md)."""
    resources = _resources(report.run_id)
    digest = compact_result(report, resources=resources)
    issues = digest.issues
    simulator_issues, simulator_left_out = cap(digest.simulator_issues, SIMULATOR_ISSUES_SHOWN)
    trials = digest.trials.model_copy(update={"case_results": digest.trials.case_results[:FLAKY_CASES_SHOWN]}) \
        if digest.trials else None
    digest = digest.model_copy(update={"issues": issues[offset:offset + limit], "simulator_issues": simulator_issues,
                                       "trials": trials})
    result = fit(TestAgentResult(run_id=report.run_id, status=RunStatus.COMPLETED, report=digest, offset=offset,
                                 simulator_issues_left_out=simulator_left_out, resources=resources,
                                 note=report.note), "report.issues", total=len(issues))
    if markdown is not None:
        with_text = result.model_copy(update={"markdown": markdown})
        if result_bytes(with_text.model_dump(mode="json")) <= MAX_RESULT_BYTES:
            return with_text
        result = result.model_copy(update={"note": " ".join(filter(None, [
            result.note, f"The Markdown report is too long to inline: read {resources['report_md']}."]))})
    return result


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
    left_out: int = Field(0, description="Runs asked for but not listed (the result's size bound).")


class LeanServer(MCPServer):
    """An MCPServer that costs an assistant less: it publishes lean schemas (`views.lean_schema`; output
    schemas without descriptions or defaults) and sends a structured result's text as compact JSON."""

    async def list_tools(self) -> list[Any]:
        return [t.model_copy(update={
            "input_schema": optional_without_null(lean_schema(t.input_schema)),
            "output_schema": lean_schema(t.output_schema, descriptions=False, defaults=False)
            if t.output_schema else None,
        }) for t in await super().list_tools()]

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Context | None = None) -> Any:
        result = await super().call_tool(name, arguments, context)
        if isinstance(result, CallToolResult) and result.structured_content is not None and not result.is_error:
            result = result.model_copy(update={"content": [TextContent(type="text",
                                                                        text=compact_json(result.structured_content))]})
        return result


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

    server = LeanServer("convsim", instructions=INSTRUCTIONS, log_level="WARNING", lifespan=lifespan,
                        **(server_options or {}))

    @server.tool(annotations=ToolAnnotations(readOnlyHint=False, openWorldHint=True))
    @tool_errors
    async def simulate_conversations(
        target: TargetArg,
        ctx: Context,
        test_cases: Annotated[TestCasesArg | None, Field(description="Inline, a .json/.jsonl/.yaml file, or a test "
                                                                     "set id. Required unless from_run.")] = None,
        max_turns: Annotated[int, Field(description="1-100.")] = 10,
        model: Annotated[str | None, Field(description="The user's: 'provider/model' or 'offline'. Default: "
                                                       "CONVSIM_MODEL.")] = None,
        concurrency: Annotated[int, Field(description=f"At once: 1-{MAX_CONCURRENCY}.")] = 8,
        repeats: Annotated[int, Field(description="Sessions per test case.")] = 1,
        user_agent: Annotated[str | None, Field(description="'pkg.mod:Class' subclassing engine.SimulatedUser.")] = None,
        scorers: Annotated[ScorersArg, Field(description="Judges (list_scorers), custom judges or 'pkg.mod:fn'.")] = None,
        judge_model: Annotated[str | None, Field(description="Default: model.")] = None,
        from_run: FromRunArg = None,
        mode: ModeArg = None,
        continue_after_replay: ContinueArg = False,
        wait: Annotated[bool, Field(description="false: return at once; poll get_run.")] = True,
        cache: CacheArg = None,
        temperature: TemperatureArg = None,
        seed: SeedArg = None,
        rpm: RpmArg = None,
        tpm: TpmArg = None,
    ) -> RunView:
        """Play simulated users against an agent and store the conversations. Returns the aggregates and the
        first sessions, failed and untested first; get_run pages on."""
        job = await prepare_simulation(
            store, target, test_cases, max_turns=max_turns, model=model, concurrency=concurrency,
            repeats=repeats, user_agent=user_agent, scorers=scorers, judge_model=judge_model, workspace=workspace,
            from_run=from_run, mode=mode, continue_after_replay=continue_after_replay,
            cache=cache, temperature=temperature, seed=seed, rpm=rpm, tpm=tpm,
        )
        if not wait:
            registry.start(job)
            return await run_view(store, await run_summary(store, job.run_id, max_sessions=0))

        registry.start(job, on_progress=_forward(ctx))
        try:
            await registry.wait(job.run_id)
        except anyio.get_cancelled_exc_class():
            registry.cancel(job.run_id)  # the caller gave up waiting: stop the run, keep its turns
            raise
        return await run_view(store, await run_summary(store, job.run_id, max_sessions=0))

    @server.tool(annotations=ToolAnnotations(readOnlyHint=False, openWorldHint=True))
    @tool_errors
    async def test_agent(
        target: TargetArg,
        ctx: Context,
        description: Annotated[str | None, Field(description="What the agent is for.")] = None,
        test_cases: Annotated[list[Any] | str | None, WithJsonSchema({"type": ["array", "string", "null"]}), Field(
            description="Your cases too, as in simulate_conversations.")] = None,
        num_test_cases: Annotated[int, Field(description="Cases to generate (0-50).")] = 7,
        guidance: Annotated[str | None, Field(description="What the generated cases focus on.")] = None,
        adversarial: Annotated[float, Field(description="Share of red-team cases (0-1).")] = 0.0,
        max_turns: int = 8,
        model: Annotated[str | None, Field(description="Every role's; 'offline': no LLM.")] = None,
        user_model: str | None = None,
        judge_model: str | None = None,
        generator_model: str | None = None,
        user_agent: Annotated[str | None, Field(description="'pkg.mod:Class' subclassing engine.SimulatedUser.")] = None,
        scorers: Annotated[ScorersArg, Field(description="Default: the default judges (list_scorers).")] = None,
        repeats: Annotated[int, Field(description="Sessions per case.")] = 1,
        concurrency: Annotated[int, Field(description=f"At once: 1-{MAX_CONCURRENCY}.")] = 8,
        shrink: Annotated[bool | None, Field(description="Shrink reproductions (default: on offline, off with a "
                                                         "model).")] = None,
        from_run: Annotated[FromRunArg, Field(description="Re-test this earlier run's cases; nothing is "
                                                          "generated.")] = None,
        mode: ModeArg = None,
        continue_after_replay: ContinueArg = False,
        wait: Annotated[bool, Field(description="false: return at once; poll get_run, then get_report.")] = True,
        cache: CacheArg = None,
        temperature: TemperatureArg = None,
        seed: SeedArg = None,
        rpm: RpmArg = None,
        tpm: TpmArg = None,
    ) -> TestAgentResult:
        """Test an agent end to end: describe it, generate cases, simulate users, judge, report issues ranked
        by severity with evidence (session, turn, quote) and a reproducing case. After a fix: rerun_issue."""
        job = await prepare_agent_test(
            store, target, description=description, test_cases=test_cases, num_test_cases=num_test_cases,
            guidance=guidance, adversarial=adversarial, max_turns=max_turns, repeats=repeats,
            concurrency=concurrency, scorers=scorers, model=model, user_model=user_model,
            judge_model=judge_model, generator_model=generator_model, user_agent=user_agent, shrink=shrink,
            workspace=workspace,
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
        markdown: Annotated[bool, Field(description="Include the report for a person.")] = False,
        offset: Annotated[int, Field(ge=0, description="A result's next_offset: more issues.")] = 0,
        limit: Annotated[int, Field(ge=1, le=MAX_PAGE)] = ISSUES_SHOWN,
    ) -> TestAgentResult:
        """The issues and numbers of a finished test_agent run, a page of issues at a time."""
        report, text = await store.get_report(run_id)
        return _done(report, markdown=text if markdown else None, offset=offset, limit=limit)

    @server.tool(annotations=ToolAnnotations(readOnlyHint=False, openWorldHint=True))
    @tool_errors
    async def rerun_issue(
        run_id: Annotated[str, Field(description="The test_agent run whose issues to check.")],
        ctx: Context,
        issue_id: Annotated[str | None, Field(description="Re-run its reproducing case; default: every case.")] = None,
        target: Annotated[LooseTargetArg, Field(description="The agent, if it moved. Default: the run's.")] = None,
        max_turns: Annotated[int | None, Field(description="Default: the run's.")] = None,
        model: Annotated[str | None, Field(description="Default: the run's.")] = None,
        repeats: Annotated[int | None, Field(description="Per case. Default: the run's (3 for an intermittent "
                                                         "issue).", ge=1, le=20)] = None,
        rpm: float | None = None,  # default: the run's
        tpm: float | None = None,
    ) -> RerunResult:
        """After changing the agent: per issue, whether it reproduces, is fixed, or is inconclusive (the failing
        turn was not reached), plus new issues."""
        outcome = await rerun_issues(store, run_id, issue_id=issue_id, target=target, max_turns=max_turns,
                                     model=model, repeats=repeats, progress=_forward(ctx), workspace=workspace,
                                     rpm=rpm, tpm=tpm)
        count = {s: sum(c.status == s for c in outcome.issues) for s in ("reproduces", "fixed", "inconclusive")}
        return trim(RerunResult(run_id=outcome.run_id, rerun_of=run_id, issues=outcome.issues,
                                new_issues=outcome.new_issues, **count, resource=run_uri(outcome.run_id)),
                    ("new_issues", "new_issues_left_out"), ("issues", "issues_left_out"))

    @server.tool(name="compare_runs", annotations=ToolAnnotations(readOnlyHint=True, openWorldHint=False))
    @tool_errors
    async def compare_runs_tool(
        base: Annotated[str, Field(description="The earlier run (before the change).")],
        candidate: Annotated[str, Field(description="The later run, on the same test cases.")],
    ) -> CompareResult:
        """Better or worse between two runs of the same cases: per scorer paired pass rates, p-value and 95%
        interval; flipped cases; new and fixed issues."""
        c = await compare_runs(store, base, candidate)
        uri = compare_uri(base, candidate)
        return trim(CompareResult(base=c.base, candidate=c.candidate, regression=c.regression,
                             regression_reasons=c.regression_reasons, improvements=c.improvements, pairs=c.pairs,
                             left_out=c.left_out, scorers=c.scorers, pass_to_fail=len(c.flipped.pass_to_fail),
                             fail_to_pass=len(c.flipped.fail_to_pass),
                             first_pass_to_fail=c.flipped.pass_to_fail[:MAX_FLIPS_SHOWN], new_issues=c.issues.new,
                             fixed_issues=c.issues.fixed, persisting_issues=len(c.issues.persisting),
                             resources={"comparison": uri, "report_md": uri + "/report.md"}),
                    ("fixed_issues", "fixed_issues_left_out"), ("new_issues", "new_issues_left_out"))

    @server.tool(annotations=ToolAnnotations(readOnlyHint=False, openWorldHint=True))
    @tool_errors
    async def generate_test_cases(
        description: Annotated[str | None, Field(description="What the agent does.")] = None,
        target: Annotated[LooseTargetArg, Field(description="The agent (as in test_agent): asked to describe "
                                                            "itself; a Python agent's source is read.")] = None,
        run_id: Annotated[str | None, Field(description="Distill cases from its conversations.")] = None,
        session_ids: list[str] | None = None,
        file: Annotated[str | None, Field(description="A JSONL file of conversations to distill.")] = None,
        num_test_cases: Annotated[int, Field(description="1-50, plus one per distilled transcript.")] = 7,
        guidance: Annotated[str | None, Field(description="What to focus on.")] = None,
        adversarial: Annotated[float, Field(description="Share of red-team cases (0-1).")] = 0.0,
        ask_agent: bool = True,
        model: Annotated[str | None, Field(description="'offline': templates.")] = None,
        name: str | None = None,
        cache: CacheArg = None,
        temperature: TemperatureArg = None,
        seed: SeedArg = None,
        rpm: RpmArg = None,
        tpm: TpmArg = None,
    ) -> TestSetResult:
        """Write test cases (goal, persona, guidelines, expectations) from a description, the agent, its source
        or transcripts, and store them as a test set."""
        test_set = await build_test_set(store, description=description, target=target, run_id=run_id,
                                        session_ids=session_ids, file=file, num_test_cases=num_test_cases,
                                        guidance=guidance, adversarial=adversarial, ask_agent=ask_agent,
                                        model=model, name=name, workspace=workspace, cache=cache,
                                        temperature=temperature, seed=seed, rpm=rpm, tpm=tpm)
        return trim(TestSetResult(
            test_set_id=test_set.id, name=test_set.name, cases=test_set.cases, agent=_brief_profile(test_set.profile),
            sources=test_set.sources, offline=test_set.offline, usage=test_set.usage,
            resource=f"convsim://test-sets/{test_set.id}",
            note=f"Pass test_cases='{test_set.id}' to simulate_conversations or test_agent to run these cases."
                 + (" Written by the offline templates, not a model." if test_set.offline else ""),
        ), ("cases", "cases_left_out"))

    @server.tool(annotations=ToolAnnotations(readOnlyHint=False, openWorldHint=True))
    @tool_errors
    async def score_sessions(
        ctx: Context,
        run_id: str | None = None,
        session_ids: list[str] | None = None,
        transcripts: Annotated[list[dict[str, Any]] | None, Field(
            description="[{session_id?, messages: [{role, content, tool_calls?}], goal?, expectations?}], stored "
                        "as a new run.")] = None,
        file: Annotated[str | None, Field(description="JSONL: a convsim session or a list of OpenAI messages per "
                                                      "line.")] = None,
        scorers: Annotated[ScorersArg, Field(description="Default: the default judges (list_scorers).")] = None,
        model: Annotated[str | None, Field(description="Judges': 'provider/model' or 'offline'.")] = None,
        concurrency: Annotated[int, Field(description=f"At once: 1-{MAX_CONCURRENCY}.")] = 8,
        cache: CacheArg = None,
        temperature: TemperatureArg = None,
        seed: SeedArg = None,
        rpm: RpmArg = None,
        tpm: TpmArg = None,
    ) -> ScoreSummary:
        """Judge conversations (give one of run_id, session_ids, transcripts, file): per scorer the pass rate and
        the first failing sessions."""
        job = await prepare_scoring(store, run_id=run_id, session_ids=session_ids, transcripts=transcripts,
                                    file=file, scorers=scorers, model=model, concurrency=concurrency,
                                    workspace=workspace, cache=cache, temperature=temperature, seed=seed,
                                    rpm=rpm, tpm=tpm)

        summary = await job.run(_forward(ctx))
        return _bounded_scores(summary)

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
    async def get_run(
        run_id: str,
        offset: Annotated[int, Field(ge=0, description="A page's next_offset.")] = 0,
        limit: Annotated[int, Field(ge=1, le=MAX_PAGE)] = SESSIONS_SHOWN,
    ) -> RunView:
        """A run's status, progress, aggregates, and a page of sessions: failed, untested, running, then ok."""
        return await run_view(store, await run_summary(store, run_id, max_sessions=0), offset=offset, limit=limit)

    @server.tool(annotations=ToolAnnotations(readOnlyHint=True, openWorldHint=False))
    @tool_errors
    async def list_runs(limit: Annotated[int, Field(ge=1, le=200, description="Most recent runs to list.")] = 20) -> RunList:
        """The most recent runs, newest first."""
        runs = await store.list_runs(limit)
        return trim(RunList(runs=[
            RunBrief(run_id=r["id"], kind=r["kind"], status=RunStatus(r["status"]), created_at=r["created_at"],
                     target=describe_target(r["target"]),
                     model=r["model"], sessions_total=r["sessions_total"], resource=run_uri(r["id"]))
            for r in runs
        ]), ("runs", "left_out"))

    @server.tool(annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=False, openWorldHint=False))
    @tool_errors
    async def cancel_run(run_id: Annotated[str, Field(description="The run to stop.")]) -> RunView:
        """Stop a running run; completed turns are kept (resume_run goes on)."""
        summary = await run_summary(store, run_id, max_sessions=0)
        if summary.status != RunStatus.RUNNING:
            raise ToolError(f"run '{run_id}' is not running (status: {summary.status.value}); nothing to cancel")
        if not registry.cancel(run_id):
            raise ToolError(f"run '{run_id}' is running in another process; stop that process to cancel it")
        await registry.wait(run_id)
        return await run_view(store, await run_summary(store, run_id, max_sessions=0))

    @server.tool(annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=False, openWorldHint=True))
    @tool_errors
    async def resume_run(
        run_id: Annotated[str, Field(description="An interrupted or cancelled run.")],
        ctx: Context,
        target: Annotated[LooseTargetArg, Field(description="Only if the stored target had a secret masked. "
                                                            "Default: the run's.")] = None,
        wait: Annotated[bool, Field(description="false: return at once; poll get_run.")] = True,
    ) -> ResumeResult:
        """Continue an interrupted or cancelled run from its last stored turns (none lost or repeated), then
        score and report as the original job would."""
        check_run_id(run_id)
        if registry.is_live(run_id):
            raise ToolError(f"run '{run_id}' is running in this server; wait for it, or cancel_run it first")
        job = await prepare_resume(store, run_id, target=target, workspace=workspace)
        counts = {"continued": job.continued, "restarted": job.restarted, "kept": job.kept}
        if not wait:
            registry.start(job)
            return ResumeResult(run_id=run_id, kind=job.kind, **counts,
                                run=await run_view(store, await run_summary(store, run_id, max_sessions=0), limit=0),
                                note=f"Resuming in the background: call get_run with run_id '{run_id}' for progress"
                                     + (", then get_report." if job.kind == "test_agent" else "."))
        registry.start(job, on_progress=_forward(ctx))
        try:
            await registry.wait(run_id)
        except anyio.get_cancelled_exc_class():
            registry.cancel(run_id)
            raise
        summary = await run_summary(store, run_id, max_sessions=0)
        report, left_out = None, 0
        if job.kind == "test_agent" and summary.status == RunStatus.COMPLETED:
            full, _ = await store.get_report(run_id)
            done = _done(full, limit=RESUMED_ISSUES_SHOWN)
            report, left_out = done.report, done.left_out
        return trim(ResumeResult(run_id=run_id, kind=job.kind, **counts, run=await run_view(store, summary, limit=0),
                                 report=report, issues_left_out=left_out, note=summary.note),
                    ("report.issues", "issues_left_out"))

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

    @server.resource("convsim://runs/{run_id}/report.html", mime_type="text/html",
                     description="A test_agent run's report as one self-contained HTML page (numbers, pass-rate "
                                 "and stop-reason charts, issues, every transcript with its failing turns).")
    @resource_errors
    async def report_html_resource(run_id: str) -> str:
        return await run_report_html(store, run_id)

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

    @server.resource("convsim://compare/{base}/{candidate}/report.html", mime_type="text/html",
                     description="The comparison of two runs as one self-contained HTML page: before/after "
                                 "charts, the flipped cases with both transcripts, issues new/fixed/persisting.")
    @resource_errors
    async def compare_html_resource(base: str, candidate: str) -> str:
        return await comparison_html(store, await compare_runs(store, base, candidate))

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


PROMPT_CHARS = 300  # an agent profile's system prompt, inline (whole in the test set's resource)


def _brief_profile(profile: AgentProfile | None) -> AgentProfile | None:
    if profile is None or not profile.system_prompt:
        return profile
    return profile.model_copy(update={"system_prompt": clip(profile.system_prompt, PROMPT_CHARS)})


FAILING_SHOWN = 3  # per scorer, failing (and unscored) sessions a scoring result lists


def _bounded_scores(summary: ScoreSummary) -> ScoreSummary:
    """A scoring result within MAX_RESULT_BYTES: per scorer the first failing and unscored sessions (their
    counts stay whole: failed, unscored), fewer when many scorers would not fit; every verdict is in the
    scores resources."""
    for keep in range(FAILING_SHOWN, -1, -1):
        bounded = summary.model_copy(update={"untested_sessions": summary.untested_sessions[:keep], "scorers": [
            s.model_copy(update={"failing": s.failing[:keep], "errors": s.errors[:keep]}) for s in summary.scorers]})
        if result_bytes(bounded.model_dump(mode="json")) <= MAX_RESULT_BYTES:
            break
    listed = sum(len(s.failing) + len(s.errors) for s in bounded.scorers) + len(bounded.untested_sessions)
    whole = sum(s.failed + s.unscored for s in summary.scorers) + summary.untested
    if listed < whole:
        bounded = bounded.model_copy(update={"note": " ".join(filter(None, [
            summary.note, f"Listed {listed} of {whole} failing, unscored or untested; every verdict: "
                          f"{', '.join(summary.resources)}."]))})
    return bounded


def _forward(ctx: Context):
    """A progress callback that reports to the MCP client and outlives it (a gone client stops nothing)."""

    async def forward(p: Progress) -> None:
        try:
            await ctx.report_progress(p.done, p.total, p.message)
        except Exception:
            pass

    return forward
