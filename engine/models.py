"""Pydantic types shared by every part of the engine.

They are also the MCP tool schemas, so every field carries a description
written for the assistant that reads it.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .limits import MAX_COUNT, MAX_DATA_CHARS, MAX_JSON_DEPTH, MAX_LIST_ITEMS, MAX_MESSAGES, MAX_TEXT_CHARS, json_depth

# Keyword arguments convsim itself passes to a Python agent: a test case's context may not supply them.
RESERVED_CONTEXT_KEYS = ("messages", "input", "session_id", "mlflow_session_id")


class StopReason(str, enum.Enum):
    """Why a simulated conversation ended. Every session records exactly one."""

    GOAL_ACHIEVED = "goal_achieved"
    USER_ENDED = "user_ended"
    MAX_TURNS = "max_turns"
    AGENT_ERROR = "agent_error"
    AGENT_EMPTY = "agent_empty"
    SIMULATOR_ERROR = "simulator_error"
    CANCELLED = "cancelled"
    REPLAY_END = "replay_end"  # a replay ran out of recorded user messages before the conversation ended


class RunStatus(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # its process died before it finished


class Role(str, enum.Enum):
    """Who spends tokens: usage and cost are accounted per role."""

    USER = "simulated_user"
    JUDGE = "judge"
    GENERATOR = "generator"
    ANALYST = "analyst"  # issue discovery


FAILURE_KINDS = ("rate_limit", "server_error", "timeout", "connection", "auth", "invalid_output", "context_length",
                 "other")


class Usage(BaseModel):
    """Model calls, tokens and cost, summed over whatever it is attached to. Failed attempts count too."""

    calls: int = Field(0, description="Requests made to the model, failed attempts and retries included.")
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = Field(0.0, description="Sum of known costs; see cost_unknown_calls.")
    cost_unknown_calls: int = Field(0, description="Calls whose model has no known price (local or unknown models).")
    failed_calls: int = Field(0, description="Calls that gave no usable reply: an error, or a reply that did not "
                                             "match the schema (counted in calls too).")
    failures: dict[str, int] = Field(
        default_factory=dict,
        description="Failed calls by kind: rate_limit, server_error, timeout, connection, auth, invalid_output, "
                    "context_length, other.",
    )
    cache_hits: int = Field(0, description="Replies served from the response cache: no request, no tokens, no cost "
                                           "(not counted in calls).")

    def add(self, other: Usage) -> Usage:
        failures = dict(self.failures) if self.failures else {}  # never shared between two Usage objects
        for kind, n in other.failures.items():
            failures[kind] = failures.get(kind, 0) + n
        return Usage.model_construct(  # sums of valid counts: no validation to pay on every turn
            calls=self.calls + other.calls,
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            completion_tokens=self.completion_tokens + other.completion_tokens,
            cost_usd=round(self.cost_usd + other.cost_usd, 8),
            cost_unknown_calls=self.cost_unknown_calls + other.cost_unknown_calls,
            failed_calls=self.failed_calls + other.failed_calls,
            failures=failures,
            cache_hits=self.cache_hits + other.cache_hits,
        )

    def minus(self, earlier: Usage) -> Usage:
        """What was spent since `earlier` (a snapshot of the same running total)."""
        failures = {k: n - earlier.failures.get(k, 0) for k, n in self.failures.items()
                    if n != earlier.failures.get(k, 0)} if self.failures else {}
        return Usage.model_construct(
            calls=self.calls - earlier.calls,
            prompt_tokens=self.prompt_tokens - earlier.prompt_tokens,
            completion_tokens=self.completion_tokens - earlier.completion_tokens,
            cost_usd=round(self.cost_usd - earlier.cost_usd, 8),
            cost_unknown_calls=self.cost_unknown_calls - earlier.cost_unknown_calls,
            failed_calls=self.failed_calls - earlier.failed_calls,
            failures=failures,
            cache_hits=self.cache_hits - earlier.cache_hits,
        )

    @classmethod
    def failed(cls, kind: str, *, calls: int = 1) -> Usage:
        """One failed attempt of `kind` (a request that raised). An unusable reply: `calls=0`, it is already counted."""
        return cls(calls=calls, failed_calls=1, failures={kind: 1})


def add_usage(by_role: dict[str, Usage], role: str, usage: Usage) -> dict[str, Usage]:
    """Return `by_role` with `usage` added under `role` (a new dict)."""
    merged = dict(by_role)
    merged[role] = merged.get(role, Usage()).add(usage)
    return merged


class ToolCall(BaseModel):
    """A tool call made by the agent, kept structured in the transcript (OpenAI shape)."""

    id: str | None = None
    type: str = "function"
    function: dict[str, Any] = Field(description="{'name': ..., 'arguments': JSON string}")


class Message(BaseModel):
    """One message of a conversation, in OpenAI chat format plus run metadata."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    name: str | None = None
    turn: int | None = Field(None, description="1-based exchange number (user message + agent reply).")
    latency_ms: float | None = Field(None, description="Agent reply time (assistant) or simulator time (user).")
    error: str | None = Field(None, description="Set on an agent turn that failed; content is then empty.")
    scripted: bool = Field(False, description="A user message taken verbatim from scripted_turns.")
    usage: Usage | None = Field(None, description="Model usage spent producing this message (simulated user).")
    history_omitted: int | None = Field(
        None, description="Simulated user message written from a shortened history: this many earlier messages were "
                          "left out of its model's prompt because the conversation no longer fit its context window.")
    error_frames: list[str] | None = Field(
        None, description="On a failed agent turn of a Python target: the agent's own traceback frames, outermost "
                          "first, as 'path/relative/to/root.py:42 in function' (convsim, stdlib and site-packages left "
                          "out).")

    def to_openai(self) -> dict[str, Any]:
        """The plain chat-completions dict the agent under test receives (content null only beside tool calls)."""
        content = self.content if self.content is not None or self.tool_calls else ""
        out: dict[str, Any] = {"role": self.role, "content": content}
        if self.tool_calls:
            out["tool_calls"] = [tc.model_dump(exclude_none=True) for tc in self.tool_calls]
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        if self.name:
            out["name"] = self.name
        return out


class TestCase(BaseModel):
    """A conversation scenario for the simulated user (MLflow-compatible fields, plus scripted_turns and id)."""

    __test__ = False  # not a pytest class
    model_config = ConfigDict(extra="forbid")

    goal: str = Field(description="What the simulated user is trying to accomplish, ideally with the expected outcome.")
    persona: str | None = Field(None, description="Who the user is and how they talk. A default persona is used when empty.")
    simulation_guidelines: list[str] = Field(
        default_factory=list, description="Rules the simulated user follows (string or list of strings)."
    )
    context: dict[str, Any] = Field(
        default_factory=dict, description="Passed to a Python agent as keyword arguments (and to JSON HTTP templates)."
    )
    expectations: dict[str, Any] = Field(default_factory=dict, description="Expected outcomes, kept for scorers.")
    scripted_turns: list[str] = Field(
        default_factory=list, description="Fixed opening user messages, sent verbatim before the simulated user takes over."
    )
    id: str | None = Field(None, description="Your id for this case; defaults to its index.")

    @field_validator("goal")
    @classmethod
    def _goal_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must be a non-empty description of what the user wants")
        return v.strip()

    @field_validator("goal", "persona", "id")
    @classmethod
    def _text_bounded(cls, v: str | None) -> str | None:
        if v is not None and len(v) > MAX_TEXT_CHARS:
            raise ValueError(f"is {len(v)} characters long; at most {MAX_TEXT_CHARS} (MAX_TEXT_CHARS)")
        return v

    @field_validator("context", "expectations")
    @classmethod
    def _data_bounded(cls, v: dict[str, Any]) -> dict[str, Any]:
        if json_depth(v) > MAX_JSON_DEPTH:
            raise ValueError(f"is nested more than {MAX_JSON_DEPTH} levels deep (MAX_JSON_DEPTH)")
        size = len(repr(v))
        if size > MAX_DATA_CHARS:
            raise ValueError(f"is about {size} characters long; at most {MAX_DATA_CHARS} (MAX_DATA_CHARS)")
        return v

    @field_validator("context")
    @classmethod
    def _context_not_reserved(cls, v: dict[str, Any]) -> dict[str, Any]:
        reserved = [k for k in v if k in RESERVED_CONTEXT_KEYS]
        if reserved:
            raise ValueError(f"key '{reserved[0]}' is reserved: convsim passes {', '.join(RESERVED_CONTEXT_KEYS)} to "
                             "the agent itself; rename the key")
        return v

    @field_validator("simulation_guidelines", mode="before")
    @classmethod
    def _guidelines_as_list(cls, v: Any) -> Any:
        if v is None:
            return []
        if isinstance(v, str):
            return [v] if v.strip() else []
        return v

    @field_validator("scripted_turns")
    @classmethod
    def _scripted_not_blank(cls, v: list[str]) -> list[str]:
        for i, turn in enumerate(v, 1):
            if not turn.strip():
                raise ValueError(f"entry {i} is empty; every scripted turn must be a user message")
        return v

    @field_validator("simulation_guidelines", "scripted_turns")
    @classmethod
    def _list_bounded(cls, v: list[str]) -> list[str]:
        if len(v) > MAX_LIST_ITEMS:
            raise ValueError(f"has {len(v)} entries; at most {MAX_LIST_ITEMS} (MAX_LIST_ITEMS)")
        for i, item in enumerate(v, 1):
            if len(item) > MAX_TEXT_CHARS:
                raise ValueError(f"entry {i} is {len(item)} characters long; at most {MAX_TEXT_CHARS} (MAX_TEXT_CHARS)")
        return v

    tags: list[str] = Field(
        default_factory=list,
        description="Your labels for this case (e.g. 'planted_flaw:forgets_user_name'); kept with the case and its "
                    "results, never shown to the judges or the simulated user.",
    )

    @field_validator("tags")
    @classmethod
    def _tags_bounded(cls, v: list[str]) -> list[str]:
        if len(v) > MAX_LIST_ITEMS:
            raise ValueError(f"has {len(v)} entries; at most {MAX_LIST_ITEMS} (MAX_LIST_ITEMS)")
        for i, item in enumerate(v, 1):
            if not item.strip():
                raise ValueError(f"entry {i} is empty")
            if len(item) > MAX_TEXT_CHARS:
                raise ValueError(f"entry {i} is {len(item)} characters long; at most {MAX_TEXT_CHARS} (MAX_TEXT_CHARS)")
        return [item.strip() for item in v]


class TargetSpec(BaseModel):
    """The agent under test, in object form. A plain string is also accepted wherever a target is."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["python", "openai", "json"] | None = Field(
        None, description="Detected when omitted: 'python' for an import path, 'openai' for a URL."
    )
    path: str | None = Field(None, description="Python agent: 'pkg.module:func' or 'path/to/file.py:func'.")
    url: str | None = Field(None, description="HTTP agent URL (OpenAI-compatible chat completions, or a JSON endpoint).")
    model: str | None = Field(None, description="OpenAI-compatible agent: value of the request's 'model' field.")
    headers: dict[str, str] = Field(
        default_factory=dict, description="HTTP headers; values may reference environment variables as ${NAME}."
    )
    request: dict[str, Any] | None = Field(
        None,
        description="JSON agent: request body template. Placeholders: {{message}}, {{session_id}}, {{context}}, "
        "{{context.KEY}}. Default {'message': '{{message}}', 'session_id': '{{session_id}}'}.",
    )
    response_path: str | None = Field(
        None, description="JSON agent: dotted path to the reply in the response body, e.g. 'reply.text' or 'choices.0.message'."
    )
    timeout_s: float = Field(60.0, gt=0, description="Per-call timeout for the agent, in seconds.")


class Session(BaseModel):
    """One simulated (or imported) conversation."""

    id: str
    run_id: str | None = None
    case_index: int | None = None
    repeat: int = Field(0, ge=0, le=MAX_COUNT)  # bounded: an imported record's numbers go into SQLite INTEGERs
    test_case: TestCase | None = None
    messages: list[Message] = Field(default_factory=list)
    stop_reason: StopReason | None = None
    stop_detail: str | None = Field(None, description="Why, in a sentence: the simulator's reason or the error.")
    turns: int = Field(0, ge=0, le=MAX_COUNT)
    started_at: float | None = None
    finished_at: float | None = None
    usage: dict[str, Usage] = Field(default_factory=dict, description="Model usage by role.")
    metadata: dict[str, Any] = Field(default_factory=dict)
    replayed_turns: list[Annotated[int, Field(ge=1, le=MAX_COUNT)]] = Field(
        default_factory=list, max_length=MAX_MESSAGES, description="Turns whose user message was replayed verbatim from an earlier run's "
                                          "session (mode 'replay'); the other turns were played by the simulated user.")


class SessionSummary(BaseModel):
    """What an assistant needs to know about one session without reading the transcript."""

    session_id: str
    case_index: int | None
    case_id: str | None = None
    goal: str | None
    repeat: int = 0
    stop_reason: StopReason | None = Field(None, description="None while the session is still running.")
    stop_detail: str | None = None
    turns: int
    last_user_message: str | None = None
    last_agent_reply: str | None = None
    error: str | None = Field(None, description="The agent's error on the last turn, if it failed.")
    replayed_turns: list[int] = Field(default_factory=list, description="Turns replayed from an earlier run.")
    resource: str = Field(description="URI of the full transcript.")


class RunSummary(BaseModel):
    """A run's status, progress and per-session summaries, sized for an assistant's context."""

    run_id: str
    kind: str
    status: RunStatus
    created_at: float
    finished_at: float | None = None
    target: str = Field(description="The agent under test (secrets redacted).")
    model: str = Field(description="Model of the simulated user.")
    offline: bool = Field(description="True when the deterministic offline backend played the user (no real LLM).")
    temperature: float | None = Field(None, description="Sampling temperature of the run's model calls (None: the "
                                                         "provider's default).")
    seed: int | None = Field(None, description="Sampling seed sent with the run's model calls (None: none sent).")
    cache: bool = Field(False, description="Model calls went through the response cache (hits: usage.cache_hits).")
    sessions_total: int
    sessions_done: int
    turns_done: int
    progress: float = Field(description="Fraction of the run done, 0-1 (a finished session counts as all its turns).")
    stop_reasons: dict[str, int] = Field(default_factory=dict)
    untested: int = Field(0, description="Sessions that could not test the agent: the simulated user failed "
                                         "(simulator_error) or a judge's model could not give a verdict.")
    untested_sessions: list[UntestedSession] = Field(default_factory=list, description="The first of them, why.")
    usage: dict[str, Usage] = Field(default_factory=dict, description="Model usage by role.")
    error: str | None = None
    resumed: int = Field(0, description="How many times the run was resumed after an interruption or a cancel.")
    resumed_at: float | None = Field(None, description="When it was last resumed.")
    sessions: list[SessionSummary] = Field(default_factory=list)
    scores: list["ScorerSummary"] = Field(default_factory=list, description="Per-scorer results, when scored.")
    resource: str = Field(description="URI of the full run (all transcripts).")
    note: str | None = Field(None, description="What to do next, or caveats (e.g. offline backend).")
    trials: "TrialsSummary | None" = Field(
        None, description="With repeats > 1: pass^1..pass^k and, per test case, its trials, pass_hat_k and whether "
                          "it is flaky. None for a run of one trial per case.")


class CaseTrials(BaseModel):
    """One test case's repeated trials (sessions): how many passed, and the pass^k estimate over them.

    A trial passes when the agent never crashed or went silent and every verdict given on it passed. A trial
    that could not test the agent (the simulated user failed or broke its role, a judge's model gave no
    verdict, or it was cancelled) is not counted in `trials`; it is counted in `untested`. A session still running
    is not a trial yet.
    """

    case_index: int | None = None
    case_id: str | None = None
    trials: int = Field(description="n: the trials that tested the agent.")
    passed: int = Field(description="c: the trials that passed.")
    untested: int = Field(0, description="Trials left out of n because they could not test the agent.")
    pass_hat_k: float | None = Field(
        description="C(c, k) / C(n, k), k the run's repeats: the chance that k fresh trials all pass (tau-bench's "
                    "unbiased estimator). None when fewer than k trials tested the agent.")
    flaky: bool = Field(description="Its trials disagree: some passed and some failed.")
    failed_sessions: list[str] = Field(default_factory=list, description="The failed trials' sessions (first 5).")


class PassHat(BaseModel):
    """pass^j over the run: the mean of C(c, j) / C(n, j) over the test cases with at least j trials."""

    k: int
    value: float | None = Field(description="None when no test case has k trials that tested the agent.")
    cases: int = Field(description="Test cases averaged (those with at least k trials that tested the agent).")


class TrialsSummary(BaseModel):
    """A repeated run (repeats = k > 1) as trials: pass^1..pass^k, flaky cases, and per case pass_hat_k."""

    repeats: int = Field(description="k: sessions run per test case.")
    cases: int = Field(description="Test cases with at least one session.")
    trials: int = Field(description="Trials that tested the agent (untested ones left out).")
    passed: int
    untested: int = Field(0, description="Trials that could not test the agent; in no n and no pass^k.")
    pass_hat: list[PassHat] = Field(default_factory=list, description="pass^1 .. pass^k.")
    flaky: int = Field(0, description="Test cases whose trials disagree.")
    flaky_cases: list[str] = Field(default_factory=list, description="The first of them: case id, or '#N' (1-based).")
    case_results: list[CaseTrials] = Field(default_factory=list, description="Per test case, in case order (a "
                                                                             "summary lists the first 50).")
    definition: str = Field(
        "a trial passes when the agent never crashed or went silent and every verdict given on it passed; trials "
        "that could not test the agent are left out of n",
        description="What counts as a passing trial.")


class UntestedSession(BaseModel):
    """A session that could not test the agent: the simulated user's or a judge's model failed.

    Never a pass and never an agent issue; the CLI exits 3 when there are any (see --allow-untested).
    """

    session_id: str
    reason: str = Field(description="What failed, in one line.")


JudgedBy = Literal["model", "offline", "code"]


class Evidence(BaseModel):
    """Where a verdict comes from: a turn of the conversation and a short quote from it."""

    turn: int = Field(description="1-based turn number (the exchange of one user message and the agent's reply).")
    role: Literal["user", "assistant", "tool"] | None = Field(None, description="Whose message is quoted.")
    quote: str = Field("", description="A short verbatim excerpt (at most ~200 characters).")


class Assessment(BaseModel):
    """One scorer's verdict on one session (or on one agent turn, for per-turn code scorers)."""

    session_id: str
    scorer: str
    value: bool | int | float | str | None = Field(None, description="The verdict: bool, a number, or a label.")
    passed: bool | None = Field(None, description="None when unscored (see error) or when the scorer has no pass rule.")
    rationale: str = ""
    evidence: list[Evidence] = Field(default_factory=list)
    turn: int | None = Field(None, description="Set for per-turn scorers: the agent turn scored.")
    heuristic: bool = Field(False, description="Produced by the offline heuristic, not by a model.")
    judged_by: JudgedBy | None = Field(
        None, description="How the verdict was reached: 'model' (a model judge), 'offline' (the offline heuristic "
                          "standing in for a model), 'code' (a code scorer, or a check that never asks a model such "
                          "as latency). None on verdicts stored before this field existed.")
    error: str | None = Field(None, description="Why the session is unscored (judge failure, scorer exception).")
    error_kind: Literal["model", "scorer", "simulator"] | None = Field(
        None, description="'model': the judge's model failed or none is configured, so the session could not be "
                          "tested; 'scorer': the scorer itself raised or returned something unusable; 'simulator': "
                          "not judged, the simulated user broke its role, so the session could not be tested.")
    usage: Usage | None = None
    created_at: float | None = None


class FailingSession(BaseModel):
    session_id: str
    value: bool | int | float | str | None = None
    rationale: str = Field("", description="One line.")
    turn: int | None = Field(None, description="First turn the evidence points to.")
    quote: str | None = None


class ScorerSummary(BaseModel):
    """One scorer over many sessions: pass rate and the failures to look at."""

    scorer: str
    sessions: int = Field(description="Sessions with a verdict from this scorer (scored or unscored).")
    passed: int
    failed: int
    unscored: int = Field(description="Judge or scorer failures, recorded with their reason; never counted as passes.")
    pass_rate: float | None = Field(description="passed / (passed + failed); None when nothing was scored.")
    heuristic: bool = Field(False, description="Verdicts came from the offline heuristic, not a model.")
    judged_by: JudgedBy = Field("model", description="'model', 'offline' (the offline heuristic) or 'code' (a code "
                                                     "scorer or a check that never asks a model).")
    failing: list[FailingSession] = Field(default_factory=list)
    errors: list[FailingSession] = Field(default_factory=list, description="Unscored sessions with the reason.")

    @model_validator(mode="after")
    def _judged_by_from_heuristic(self) -> "ScorerSummary":
        """A summary built (or stored) with only `heuristic` set was judged offline."""
        if "judged_by" not in self.model_fields_set and self.heuristic:
            self.judged_by = "offline"
        return self


class ScoreSummary(BaseModel):
    """The result of scoring: per scorer, the pass rate and the failing sessions."""

    run_ids: list[str]
    sessions: int
    untested: int = Field(0, description="Sessions that could not be judged for a model reason (never passes).")
    untested_sessions: list["UntestedSession"] = Field(default_factory=list)
    scorers: list[ScorerSummary]
    usage: dict[str, Usage] = Field(default_factory=dict, description="Judge model usage (role 'judge').")
    offline: bool
    resources: list[str] = Field(description="Full assessments (rationale, evidence) per run.")
    note: str | None = None


class AgentProfile(BaseModel):
    """What the agent under test is for, gathered from a description, the agent itself, or its source."""

    name: str | None = None
    description: str = Field("", description="What the agent does, in a few sentences.")
    capabilities: list[str] = Field(default_factory=list, description="Things it is meant to help with.")
    tools: list[str] = Field(default_factory=list, description="Its tools, as 'name: what it does'.")
    limits: list[str] = Field(default_factory=list, description="Out of scope, constraints, policies.")
    system_prompt: str | None = Field(None, description="The system prompt found in its source, if any.")
    sources: list[str] = Field(default_factory=list, description="Where this came from: description, "
                                                                 "self_description, source:<path>.")


class TestSet(BaseModel):
    """Generated test cases stored under an id, reusable by simulate_conversations."""

    __test__ = False
    id: str
    name: str
    created_at: float
    cases: list[TestCase]
    profile: AgentProfile | None = None
    sources: list[str] = Field(default_factory=list)
    offline: bool = False
    usage: dict[str, Usage] = Field(default_factory=dict)


Severity = Literal["high", "medium", "low"]
Category = Literal["correctness", "memory", "adherence", "safety", "robustness", "latency", "cost"]
SEVERITY_ORDER = {"high": 0, "medium": 1, "low": 2}


class IssueEvidence(BaseModel):
    session_id: str
    turn: int | None = None
    quote: str = ""
    scorer: str | None = Field(None, description="The scorer that failed, or 'agent_error' / a stop reason.")


class Issue(BaseModel):
    """A distinct problem found in a run, with what it takes to act on it."""

    id: str = Field(description="Stable id (same failure signature, same id across runs).")
    title: str
    description: str
    severity: Severity
    severity_reason: str = Field(description="One line: why this severity.")
    category: Category
    affected_sessions: int
    total_sessions: int
    evidence: list[IssueEvidence] = Field(default_factory=list)
    suspected_cause: str = ""
    suggested_fix: str = ""
    reproduction: TestCase | None = Field(
        None, description="A minimal reproducing case: the original case plus the user turns up to the failing "
                          "turn as scripted_turns.")
    source: Literal["agent", "simulator"] = Field(
        "agent", description="'simulator': caused by the simulated user (went off-goal, broke persona), not the agent.")
    signals: list[str] = Field(default_factory=list, description="Scorers / stop reasons behind it.")
    session_ids: list[str] = Field(default_factory=list)
    signature: str = Field("", description="The root cause without per-session details (exception type and masked "
                                           "message, the reply kind, or judge:label); the id hashes it.")
    signatures: list[str] = Field(default_factory=list, description="The signatures of its failures: one, unless the "
                                  "model grouped several root causes into this issue. Re-runs match on these.")
    also_seen: list[str] = Field(default_factory=list, description="Other signals at the failing turns (or after a "
                                                                   "crash), explained by this issue's cause.")
    reproduction_shrunk_from: int | None = Field(
        None, description="The reproduction was shrunk: it had this many scripted user turns before turns the "
                          "failure does not need were dropped.")

    @property
    def frequency(self) -> str:
        return f"{self.affected_sessions} of {self.total_sessions} sessions"


IssueStatus = Literal["reproduces", "fixed", "inconclusive"]


class IssueCheck(BaseModel):
    """What happened to one issue in the re-run, and why we say so (`rerun_issues`)."""

    id: str
    title: str
    severity: str
    status: IssueStatus
    reason: str = Field(description="One line: the evidence behind the status.")
    sessions: list[str] = Field(description="The re-run sessions of the issue's case(s).")

    @property
    def reproduces(self) -> bool:
        return self.status == "reproduces"


class Report(BaseModel):
    """The outcome of test_agent: what was tested, what broke, how badly, and what it cost."""

    run_id: str
    created_at: float
    duration_s: float
    target: str
    offline: bool
    models: dict[str, str] = Field(default_factory=dict, description="Model per role.")
    agent: AgentProfile | None = None
    test_set_id: str | None = None
    test_cases: list[TestCase] = Field(default_factory=list)
    sessions: list[SessionSummary] = Field(default_factory=list)
    scores: list[ScorerSummary] = Field(default_factory=list)
    untested: int = Field(0, description="Sessions that could not test the agent (see RunSummary.untested).")
    untested_sessions: list[UntestedSession] = Field(default_factory=list)
    issues: list[Issue] = Field(default_factory=list, description="Agent issues, most severe first.")
    simulator_issues: list[Issue] = Field(default_factory=list, description="Problems of the simulated user.")
    usage: dict[str, Usage] = Field(default_factory=dict)
    note: str | None = None
    simulator_sessions: int = Field(0, description="Sessions the simulated user could not test (simulator_error, or "
                                                   "it broke its role); never agent issues.")
    trials: TrialsSummary | None = Field(None, description="With repeats > 1: pass^k, flaky test cases and per "
                                                           "case pass_hat_k (see TrialsSummary).")


RunSummary.model_rebuild()
ScoreSummary.model_rebuild()
