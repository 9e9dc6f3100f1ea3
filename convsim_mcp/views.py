"""What the MCP layer sends an assistant: lean schemas, and results bounded whatever a run's size.

An assistant pays for every byte of `tools/list` and of each tool result. Here:
- `lean_schema` rewrites a published JSON schema without changing what it accepts: no pydantic
  titles, `X | None` as a type list, no `default: null`, no `additionalProperties: true`, and (for
  output schemas) no descriptions or defaults;
- `RunView` is a run for a tool result: the aggregates, then one page of sessions, those that failed or
  could not test the agent first, with how many were left out; `offset`/`limit` page on, and the run's
  resources stay complete;
- the MCP layer also publishes optional arguments without `null` (`optional_without_null`);
- `fit` and `trim` keep a result under MAX_RESULT_BYTES (structured content and its JSON text together) by listing
  fewer entries of its pages, never by cutting one.
"""

from __future__ import annotations

import json
import re
from contextlib import aclosing
from typing import Any, Literal

from pydantic import BaseModel, Field

from engine import RunStatus, RunSummary, Store, StopReason
from engine.models import Assessment, Session, Usage
from engine.text import clip, one_line

MAX_RESULT_BYTES = 8000  # a tool result as the client receives it: structured content + its JSON text
SESSIONS_SHOWN = 6  # sessions a run result lists by default (about 400 bytes each, twice)
MAX_PAGE = 50  # most entries one page may ask for
REPLY_CHARS = 160  # a listed session's last agent reply and reason, clipped
GOAL_CHARS = 80
ID_CHARS = 200  # a case id, target or model name as listed (an id may be 50,000 characters; case_index says which)
SCORERS_SHOWN = 12
CASES_SHOWN = 5  # a repeated run's per-case trials listed
PASS_HAT_SHOWN = 10  # pass^j listed for j = 1..10 and k; the rest in the run's resources


def compact_json(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def result_bytes(structured: Any) -> int:
    """What a result costs the client: its structured content plus the same JSON as text (UTF-8 bytes)."""
    return 2 * len(compact_json(structured).encode())


# --- schemas ------------------------------------------------------------------------------------

_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "contains", "if", "then", "else")


def lean_schema(schema: Any, *, descriptions: bool = True, defaults: bool = True) -> Any:
    """The same schema (it accepts the same documents), in fewer bytes; without `descriptions` or `defaults`
    (annotations only: an output schema validates, its field names say the rest)."""
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "title" or (key == "description" and not descriptions):
            continue
        if key == "default" and (value is None or not defaults):
            continue
        if key == "additionalProperties" and value is True:
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            value = {name: lean_schema(sub, descriptions=descriptions, defaults=defaults) for name, sub in value.items()}
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            value = [lean_schema(sub, descriptions=descriptions, defaults=defaults) for sub in value]
        elif key in _SCHEMA_ONE:
            value = lean_schema(value, descriptions=descriptions, defaults=defaults)
        out[key] = value
    return _merge_types(_merge_null(out))


def optional_without_null(schema: Any) -> Any:
    """An input schema whose optional fields (the tool's arguments, and those of the objects they take) drop
    `null` from their types: leaving one out is how to say "default" (the server still takes an explicit null)."""
    if isinstance(schema, list):
        return [optional_without_null(sub) for sub in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: optional_without_null(v) if k in ("items", "anyOf", "oneOf", "$defs") else v for k, v in schema.items()}
    if isinstance(schema.get("$defs"), dict):
        out["$defs"] = {name: optional_without_null(sub) for name, sub in schema["$defs"].items()}
    if isinstance(schema.get("properties"), dict):
        required = set(schema.get("required", ()))
        props = {}
        for name, sub in schema["properties"].items():
            sub = optional_without_null(sub)
            kind = sub.get("type") if isinstance(sub, dict) else None
            if name not in required and isinstance(kind, list) and "null" in kind and len(kind) > 1:
                rest = [k for k in kind if k != "null"]
                sub = sub | {"type": rest[0] if len(rest) == 1 else rest}
            elif name not in required and isinstance(sub, dict) and isinstance(sub.get("enum"), list) \
                    and None in sub["enum"]:
                sub = sub | {"enum": [v for v in sub["enum"] if v is not None]}
            props[name] = sub
        out["properties"] = props
    return out


# Keywords that constrain only instances of one type, so options of different types can share a schema.
_TYPE_KEYWORDS = {
    "array": {"items", "prefixItems", "minItems", "maxItems", "uniqueItems", "contains"},
    "object": {"properties", "required", "additionalProperties", "patternProperties", "minProperties",
               "maxProperties"},
    "string": {"minLength", "maxLength", "pattern"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"},
    "boolean": set(), "null": set(),
}


def _merge_types(schema: dict[str, Any]) -> dict[str, Any]:
    """`anyOf` of options of distinct types, each constrained only by its own type's keywords -> one schema
    with a type list (what constrains an array cannot reject a string)."""
    options = schema.get("anyOf")
    if not isinstance(options, list) or len(options) < 2:
        return schema
    types: list[str] = []
    merged = {k: v for k, v in schema.items() if k != "anyOf"}
    for option in options:
        kind = option.get("type") if isinstance(option, dict) else None
        if not isinstance(kind, str) or kind in types or kind not in _TYPE_KEYWORDS:
            return schema
        rest = set(option) - {"type"}
        if not rest <= _TYPE_KEYWORDS[kind] or rest & set(merged):
            return schema
        types.append(kind)
        merged.update({k: option[k] for k in rest})
    return merged | {"type": types}


def _merge_null(schema: dict[str, Any]) -> dict[str, Any]:
    """`anyOf: [{type: T, ...}, {type: null}]` -> `{type: [T, null], ...}`; an enum takes null as a member."""
    options = schema.get("anyOf")
    if not isinstance(options, list) or len(options) != 2 or {"type": "null"} not in options:
        return schema
    other = options[0] if options[1] == {"type": "null"} else options[1]
    if not isinstance(other, dict) or set(other) & set(schema) - {"anyOf"}:
        return schema
    merged = {k: v for k, v in schema.items() if k != "anyOf"}
    if "enum" in other and set(other) <= {"enum", "type", "description"}:
        merged.update({k: v for k, v in other.items() if k != "type"})
        merged["enum"] = [*other["enum"], None]
        return merged
    kind = other.get("type")
    if isinstance(kind, str) and kind != "null" and "enum" not in other and "const" not in other:
        merged.update(other)
        merged["type"] = [kind, "null"]
        return merged
    return schema


# --- runs ---------------------------------------------------------------------------------------

SessionStatus = Literal["failed", "untested", "running", "ok"]
_ORDER = {"failed": 0, "untested": 1, "running": 2, "ok": 3}


class SessionLine(BaseModel):
    """One session in a run result."""

    session_id: str
    case_index: int | None = None
    case_id: str | None = None
    repeat: int = 0
    goal: str | None = None
    status: SessionStatus = Field(description="failed: the agent crashed, went silent or a verdict failed; "
                                              "untested: the simulated user or a judge's model failed; ok: neither.")
    stop_reason: StopReason | None = None
    turns: int
    failed: list[str] = Field(default_factory=list, description="The failed scorers, or the stop reason.")
    why: str | None = Field(None, description="One line: the error, the first failed verdict's rationale, or why "
                                              "it could not be tested.")
    last_agent_reply: str | None = Field(None, description="Clipped.")
    replayed_turns: list[int] = Field(default_factory=list, description="Turns replayed from an earlier run.")
    resource: str = Field(description="The transcript.")


class ScoreLine(BaseModel):
    scorer: str
    sessions: int
    passed: int
    failed: int
    unscored: int
    pass_rate: float | None
    judged_by: str


class CaseLine(BaseModel):
    case_index: int | None = None
    case_id: str | None = None
    trials: int
    passed: int
    untested: int = 0
    pass_hat_k: float | None
    flaky: bool


class TrialsLine(BaseModel):
    repeats: int
    cases: int
    trials: int = Field(description="Trials that tested the agent.")
    passed: int
    untested: int = 0
    pass_hat: dict[str, float | None] = Field(description="pass^j by j (j = 1..k): the chance that j fresh trials "
                                                          "of a case all pass.")
    flaky: int = Field(description="Test cases whose trials disagree.")
    flaky_cases: list[str] = Field(default_factory=list, description="The first of them.")
    case_results: list[CaseLine] = Field(default_factory=list, description="Failing and flaky cases first.")
    cases_left_out: int = Field(0, description="Cases not listed (every case: get_report, or the run resource).")


class RunView(BaseModel):
    """A run: status, aggregates, then a page of sessions, failed and untested first.

    `left_out` sessions are not listed: call get_run with `offset: next_offset`, or read `resource`.
    """

    run_id: str
    kind: str
    status: RunStatus
    target: str
    model: str
    offline: bool
    temperature: float | None = None
    seed: int | None = None
    cache: bool = False
    created_at: float
    finished_at: float | None = None
    sessions_total: int
    sessions_done: int
    turns_done: int
    progress: float = Field(description="0-1.")
    stop_reasons: dict[str, int] = Field(default_factory=dict)
    failed: int = Field(0, description="Sessions with status failed.")
    untested: int = Field(0, description="Sessions that could not test the agent; never passes.")
    scores: list[ScoreLine] = Field(default_factory=list)
    scorers_left_out: int = 0
    trials: TrialsLine | None = Field(None, description="With repeats > 1.")
    usage: dict[str, Usage] = Field(default_factory=dict, description="By role.")
    error: str | None = None
    resumed: int = 0
    sessions: list[SessionLine] = Field(default_factory=list, description="This page: failed, untested, running, "
                                                                          "then ok; run order within each.")
    offset: int = 0
    next_offset: int | None = Field(None, description="Pass as offset for the next page; None: none left.")
    left_out: int = Field(0, description="Sessions not in this page.")
    resource: str = Field(description="The whole run: every session's transcript.")
    resources: dict[str, str] = Field(default_factory=dict)
    note: str | None = None


class _Row:
    """A session as a run result ranks it: status, failed scorers and a reason, without its transcript."""

    __slots__ = ("head", "failed", "why", "untested")

    def __init__(self, head: Session):
        self.head = head
        self.failed: list[str] = []
        self.why: str | None = None
        self.untested: str | None = None

    @property
    def status(self) -> SessionStatus:
        if self.failed:
            return "failed"
        if self.untested:
            return "untested"
        return "running" if self.head.stop_reason is None else "ok"


AGENT_FAILURES = (StopReason.AGENT_ERROR, StopReason.AGENT_EMPTY)


async def session_rows(store: Store, run_id: str) -> list[_Row]:
    """Every session of a run, ranked for listing: failed, untested, running, ok (run order within each).

    Reads session rows and verdicts only, never a transcript. (One function, so a store query for per-session
    summaries can replace its body.)
    """
    rows = [_Row(s) for s in await store.get_sessions(run_id, with_messages=False)]
    by_id = {r.head.id: r for r in rows}
    for r in rows:
        s = r.head
        if s.stop_reason in AGENT_FAILURES:
            r.failed.append(s.stop_reason.value)
            r.why = s.stop_detail
        elif s.stop_reason == StopReason.SIMULATOR_ERROR:
            r.untested = f"the simulated user failed: {s.stop_detail or 'no detail'}"
    async with aclosing(store.iter_assessments(list(by_id))) as pages:
        async for page in pages:
            for a in page:
                _note_verdict(by_id.get(a.session_id), a)
    rows.sort(key=lambda r: _ORDER[r.status])  # stable: run order within a status
    return rows


def _note_verdict(row: _Row | None, a: Assessment) -> None:
    if row is None:
        return
    if a.error_kind == "model":
        row.untested = row.untested or f"judge {a.scorer} could not give a verdict: {a.error}"
    elif a.error_kind == "simulator":
        row.untested = row.untested or f"the simulated user broke its role: {(a.error or '').removeprefix('not judged: ')}"
    elif a.passed is False and a.scorer not in row.failed:
        row.failed.append(a.scorer)
        row.why = row.why or a.rationale


def _line(row: _Row, reply: str | None, run_uri: str) -> SessionLine:
    s = row.head
    status = row.status
    why = row.why if status == "failed" else row.untested if status == "untested" else None
    return SessionLine(
        session_id=s.id, case_index=s.case_index, repeat=s.repeat,
        case_id=clip(s.test_case.id, ID_CHARS) if s.test_case and s.test_case.id else None,
        goal=one_line(s.test_case.goal, GOAL_CHARS) if s.test_case else None,
        status=status, stop_reason=s.stop_reason, turns=s.turns, failed=row.failed,
        why=one_line(why, REPLY_CHARS) if why else None,
        last_agent_reply=one_line(reply, REPLY_CHARS) if reply else None, replayed_turns=s.replayed_turns,
        resource=f"{run_uri}/sessions/{s.id}",
    )


def _trials(summary: RunSummary) -> TrialsLine | None:
    t = summary.trials
    if t is None:
        return None
    shown = [p for p in t.pass_hat if p.k <= PASS_HAT_SHOWN or p.k == t.repeats]
    cases = sorted(t.case_results, key=lambda c: 0 if c.flaky or (c.pass_hat_k or 0) < 1 else 1)
    return TrialsLine(repeats=t.repeats, cases=t.cases, trials=t.trials, passed=t.passed, untested=t.untested,
                      pass_hat={str(p.k): p.value for p in shown}, flaky=t.flaky, flaky_cases=[clip(c, ID_CHARS) for c in t.flaky_cases[:5]],
                      case_results=[CaseLine(**c.model_dump(include=set(CaseLine.model_fields))
                                             | {"case_id": clip(c.case_id, ID_CHARS) if c.case_id else None})
                                    for c in cases[:CASES_SHOWN]],
                      cases_left_out=max(0, t.cases - min(len(cases), CASES_SHOWN)))


_SHOWING = re.compile(r"\s*Showing \d+ of \d+ sessions; read \S+ for all\.")


def _note(summary: RunSummary) -> str | None:
    """The summary's note without its count of listed sessions (a view lists its own page, and says so)."""
    return _SHOWING.sub("", summary.note or "").strip() or None


async def run_view(store: Store, summary: RunSummary, *, offset: int = 0, limit: int = SESSIONS_SHOWN,
                   resources: dict[str, str] | None = None, budget: int = MAX_RESULT_BYTES) -> RunView:
    """`summary` for a tool result: its aggregates and sessions[offset:offset + limit] in ranked order,
    fewer if the page would not fit in `budget`."""
    rows = await session_rows(store, summary.run_id)
    page = rows[offset:offset + max(0, min(limit, MAX_PAGE))]
    replies: dict[str, str | None] = {}
    if page:
        for s in await store.get_sessions_by_ids([r.head.id for r in page]):
            last = next((m for m in reversed(s.messages) if m.role == "assistant"), None)
            replies[s.id] = last.content if last else None
    scores = [ScoreLine(scorer=x.scorer, sessions=x.sessions, passed=x.passed, failed=x.failed, unscored=x.unscored,
                        pass_rate=x.pass_rate, judged_by=x.judged_by) for x in summary.scores]
    run_uri = summary.resource
    view = RunView(
        run_id=summary.run_id, kind=summary.kind, status=summary.status, target=clip(summary.target, ID_CHARS),
        model=clip(summary.model, ID_CHARS), offline=summary.offline, temperature=summary.temperature, seed=summary.seed,
        cache=summary.cache, created_at=summary.created_at,
        finished_at=summary.finished_at, sessions_total=summary.sessions_total,
        sessions_done=summary.sessions_done, turns_done=summary.turns_done, progress=summary.progress,
        stop_reasons=summary.stop_reasons, failed=sum(r.status == "failed" for r in rows),
        untested=sum(r.status == "untested" for r in rows), scores=scores[:SCORERS_SHOWN],
        scorers_left_out=max(0, len(scores) - SCORERS_SHOWN), trials=_trials(summary), usage=summary.usage,
        error=one_line(summary.error, 500) if summary.error else None, resumed=summary.resumed,
        sessions=[_line(r, replies.get(r.head.id), run_uri) for r in page], offset=offset,
        resource=run_uri, resources={"scores": f"{run_uri}/scores", **(resources or {})},
        note=_note(summary),
    )
    return fit(view, "sessions", total=len(rows), budget=budget)


def fit(view: Any, field: str, *, total: int, budget: int = MAX_RESULT_BYTES) -> Any:
    """`view` with its page `field` (a dotted path: 'report.issues') shortened from the end until the result
    fits in `budget`; sets `next_offset` and `left_out` from what is listed (so paging loses and repeats
    nothing). A page keeps at least one entry, so paging always moves on; every entry is clipped, so one fits."""
    items = list(_get(view, field))
    offset = view.offset
    while True:
        shown = len(items)
        end = offset + shown
        candidate = _set(view, field, items).model_copy(update={
            "left_out": max(0, total - shown), "next_offset": end if end < total else None})
        if shown <= 1 or result_bytes(candidate.model_dump(mode="json")) <= budget:  # one entry always goes
            return candidate
        items.pop()


def trim(model: Any, *fields: tuple[str, str], budget: int = MAX_RESULT_BYTES) -> Any:
    """`model` with its lists (field, left-out counter) shortened from the end, the first pair's list first,
    until the result fits in `budget`; each counter grows by the entries dropped from its list."""
    for field, counter in fields:
        items = list(_get(model, field) or ())  # a list under a None (a report not made yet) is no list
        while items and result_bytes(model.model_dump(mode="json")) > budget:
            items.pop()
            model = _set(model, field, items).model_copy(update={counter: getattr(model, counter) + 1})
    return model


def cap(items: list[Any], keep: int) -> tuple[list[Any], int]:
    """The first `keep` items, and how many were left out."""
    return items[:keep], max(0, len(items) - keep)


def _get(model: Any, path: str) -> Any:
    for name in path.split("."):
        model = getattr(model, name) if model is not None else None
    return model


def _set(model: Any, path: str, value: Any) -> Any:
    head, _, rest = path.partition(".")
    return model.model_copy(update={head: _set(getattr(model, head), rest, value) if rest else value})
