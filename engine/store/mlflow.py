"""Runs as MLflow traces, and MLflow traces as runs (the optional extra `convsim-mcp[mlflow]`).

Export writes one trace per turn (the user's message in, the agent's reply out), grouped into MLflow sessions
by the `mlflow.trace.session` metadata that MLflow's Sessions view and its multi-turn judges read, with the
simulation's goal, persona and turn on each trace and our verdicts as MLflow assessments (feedback) on the
session's first trace, the way MLflow's session-level scorers record theirs. Turn times are rebuilt from the
session's start and the stored latencies (we keep no per-message clock).

Import reads an experiment's traces grouped by `mlflow.trace.session` (traces without one are a session of
their own), orders them by time, and stores them as an import run, to score or to distill test cases from.
It understands our own export and the common shapes of trace inputs and outputs (chat messages, an OpenAI
response, a plain string, one string field).

mlflow is imported only here, on use, with its telemetry off and trace logging synchronous (so an
assessment never races its trace). A `sqlite:` or `file:` tracking URI names a file, which must lie under the
workspace roots like every file we touch; what is written passes through `secrets.redact` again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import anyio

from ..errors import InvalidOption, UserInputError
from ..models import Assessment, Session
from ..records import record_to_session
from ..secrets import redact, redact_data
from ..workspace import Workspace
from .sqlite import Store

SESSION_KEY = "mlflow.trace.session"  # mlflow.tracing.constant.TraceMetadataKey.TRACE_SESSION
PREFIX = "convsim."
MAX_METADATA_CHARS = 4000  # one metadata value (MLflow keeps metadata values short)
SEARCH_PAGE = 200
INSTALL_HINT = "install the extra: pip install 'convsim-mcp[mlflow]'"


def _mlflow() -> Any:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage reports to a server we did not name
    os.environ.setdefault("MLFLOW_ENABLE_ASYNC_TRACE_LOGGING", "false")
    try:
        import mlflow
    except ImportError as e:
        raise UserInputError(f"MLflow is not installed ({e}); {INSTALL_HINT}") from None
    return mlflow


def check_tracking_uri(uri: str, workspace: Workspace, *, must_exist: bool) -> str:
    """The tracking URI, with a local store (sqlite:///PATH, file:PATH or a directory) resolved under the roots.

    `must_exist`: importing reads a store that is there; exporting may create it (its directory must exist).
    """
    if not isinstance(uri, str) or not uri.strip():
        raise InvalidOption("--tracking-uri must be an MLflow tracking URI: sqlite:///mlflow.db, a directory, or "
                            "http(s)://host")
    parts = urlsplit(uri)
    if parts.scheme in ("http", "https", "databricks"):
        return uri
    if parts.scheme == "sqlite":
        if not uri.startswith("sqlite:///") or len(uri) == len("sqlite:///"):
            raise InvalidOption(f"--tracking-uri {uri!r}: a SQLite store is written sqlite:///PATH "
                                "(sqlite:////abs/path for an absolute one)")
        return "sqlite:///" + str(_local(uri[len("sqlite:///"):], workspace, must_exist=must_exist))
    if parts.scheme in ("", "file"):
        return _local(parts.path if parts.scheme == "file" else uri, workspace, must_exist=must_exist).as_uri()
    raise InvalidOption(f"--tracking-uri {uri!r}: expected sqlite:///PATH, file:PATH, a directory or http(s)://")


def _local(raw: str, workspace: Workspace, *, must_exist: bool) -> Path:
    """A local store's path, symlinks resolved, under a root (relative paths from the base)."""
    path = Path(raw).expanduser()
    path = (path if path.is_absolute() else workspace.base / path)
    resolved = path.resolve() if path.exists() else path.parent.resolve() / path.name
    if not any(resolved.is_relative_to(r) for r in workspace.roots):
        raise InvalidOption(f"MLflow store {raw!r} is outside the workspace roots "
                            f"({', '.join(map(str, workspace.roots))}): files are read and written only under "
                            "the roots; add its directory with --root DIR")
    if must_exist and not resolved.exists():
        raise InvalidOption(f"MLflow store {raw!r} does not exist")
    if not resolved.parent.is_dir():
        raise InvalidOption(f"MLflow store {raw!r}: directory {resolved.parent} does not exist")
    return resolved


# --- export ---------------------------------------------------------------------------------------


async def export_run(store: Store, run_id: str, *, tracking_uri: str, experiment: str) -> dict[str, int]:
    """Write a run's sessions as MLflow traces; returns counts of sessions, traces and assessments written."""
    if not isinstance(experiment, str) or not experiment.strip():
        raise InvalidOption("--experiment must name an MLflow experiment")
    mlflow = await anyio.to_thread.run_sync(_mlflow)
    run = await store.get_run(run_id)
    client = await anyio.to_thread.run_sync(_client, mlflow, tracking_uri, experiment)
    counts = {"sessions": 0, "traces": 0, "assessments": 0}
    async for page in store.iter_sessions(run_id):
        verdicts: dict[str, list[Assessment]] = {}
        for a in await store.get_assessments([s.id for s in page]):
            verdicts.setdefault(a.session_id, []).append(a)
        for s in page:
            traces, logged = await anyio.to_thread.run_sync(
                _export_session, mlflow, client, s, verdicts.get(s.id, []), run.get("kind", ""))
            counts["sessions"] += 1
            counts["traces"] += traces
            counts["assessments"] += logged
    return counts


def _client(mlflow: Any, tracking_uri: str, experiment: str) -> str:
    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.set_experiment(experiment).experiment_id  # created when missing


def _export_session(mlflow: Any, experiment_id: str, s: Session, verdicts: list[Assessment],
                    kind: str) -> tuple[int, int]:
    from mlflow.entities import AssessmentSource, SpanType

    case = s.test_case
    base = {SESSION_KEY: s.id, f"{PREFIX}run_id": s.run_id or "", f"{PREFIX}session_id": s.id,
            f"{PREFIX}case_index": "" if s.case_index is None else str(s.case_index),
            f"{PREFIX}repeat": str(s.repeat), f"{PREFIX}goal": _short(case.goal if case else ""),
            f"{PREFIX}persona": _short(case.persona if case else ""),
            f"{PREFIX}stop_reason": s.stop_reason.value if s.stop_reason else ""}
    if case is not None:
        dumped = json.dumps(case.model_dump(exclude_defaults=True), ensure_ascii=False)
        if len(dumped) <= MAX_METADATA_CHARS:
            base[f"{PREFIX}test_case"] = redact(dumped)
    clock_ns = int((s.started_at or 0) * 1e9)
    first_trace = None
    written = 0
    for turn, user, replies in _turns(s):
        start = clock_ns + int((user.latency_ms or 0) * 1e6) if user is not None else clock_ns
        agent_ms = sum(r.latency_ms or 0 for r in replies)
        end = start + max(int(agent_ms * 1e6), 1000)
        clock_ns = end
        inputs = {"messages": [{"role": "user", "content": user.content if user is not None else ""}]}
        reply = next((r for r in reversed(replies) if r.role == "assistant"), None)
        outputs = {"role": "assistant", "content": reply.content if reply is not None else None}
        if reply is not None and reply.error:
            outputs["error"] = reply.error
        tool_calls = [tc.model_dump() for r in replies for tc in (r.tool_calls or [])]
        if tool_calls:
            outputs["tool_calls"] = tool_calls
        span = mlflow.start_span_no_context(
            f"turn {turn}", span_type=SpanType.AGENT, inputs=redact_data(inputs), start_time_ns=start,
            experiment_id=experiment_id,
            metadata={**base, f"{PREFIX}turn": str(turn)}, tags={f"{PREFIX}run_id": s.run_id or "",
                                                                  f"{PREFIX}kind": kind},
            attributes={f"{PREFIX}latency_ms": agent_ms})
        span.set_outputs(redact_data(outputs))
        if reply is not None and reply.error:
            span.set_status("ERROR")
        span.end(end_time_ns=end)
        first_trace = first_trace or span.trace_id
        written += 1
    logged = 0
    for a in verdicts if first_trace else []:
        value = a.value if a.value is not None else a.passed
        if value is None:  # unscored: nothing to record as feedback
            continue
        source = AssessmentSource(source_type="CODE" if a.judged_by in ("code", "offline") else "LLM_JUDGE",
                                  source_id=f"convsim:{a.judged_by or 'judge'}")
        evidence = "; ".join(f"turn {e.turn}: {e.quote}" for e in a.evidence)
        mlflow.log_feedback(trace_id=first_trace, name=a.scorer, value=value, source=source,
                            rationale=redact(a.rationale + (f" Evidence: {evidence}" if evidence else "")),
                            metadata={SESSION_KEY: s.id, f"{PREFIX}passed": str(a.passed),
                                      **({f"{PREFIX}turn": str(a.turn)} if a.turn is not None else {})})
        logged += 1
    return written, logged


def _turns(s: Session) -> Iterator[tuple[int, Any, list[Any]]]:
    """(turn, the user message, the messages answering it) for each exchange; an opening agent message is turn 0."""
    turn, user, replies = 0, None, []
    for m in s.messages:
        if m.role == "system":
            continue
        if m.role == "user":
            if user is not None or replies:
                yield turn, user, replies
            turn, user, replies = turn + 1, m, []
        else:
            replies.append(m)
    if user is not None or replies:
        yield turn, user, replies


def _short(text: str | None) -> str:
    text = redact(text or "")
    return text if len(text) <= MAX_METADATA_CHARS else text[: MAX_METADATA_CHARS - 1] + "…"


# --- import ---------------------------------------------------------------------------------------


async def import_experiment(store: Store, *, tracking_uri: str, experiment: str) -> str:
    """Store an experiment's traces, grouped by session, as a new import run; returns its id."""
    if not isinstance(experiment, str) or not experiment.strip():
        raise InvalidOption("--experiment must name an MLflow experiment")
    mlflow = await anyio.to_thread.run_sync(_mlflow)
    records = await anyio.to_thread.run_sync(_read_sessions, mlflow, tracking_uri, experiment)
    if not records:
        raise InvalidOption(f"MLflow experiment {experiment!r} at {tracking_uri} has no traces to import")
    sessions = [record_to_session(r, i, what="MLflow session") for i, r in enumerate(records, 1)]
    return await store.import_sessions(sessions, source=f"mlflow:{experiment}")


def _read_sessions(mlflow: Any, tracking_uri: str, experiment: str) -> list[dict[str, Any]]:
    mlflow.set_tracking_uri(tracking_uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        raise InvalidOption(f"MLflow experiment {experiment!r} does not exist at {tracking_uri}")
    client = mlflow.MlflowClient()
    grouped: dict[str, list[Any]] = {}
    token = None
    while True:
        page = client.search_traces(locations=[found.experiment_id], max_results=SEARCH_PAGE, page_token=token,
                                    order_by=["timestamp_ms ASC"])
        for trace in page:
            meta = trace.info.trace_metadata or {}
            grouped.setdefault(meta.get(SESSION_KEY) or trace.info.trace_id, []).append(trace)
        token = page.token
        if not token:
            break
    return [_record(sid, sorted(traces, key=_trace_order)) for sid, traces in grouped.items()]


def _trace_order(trace: Any) -> tuple[int, int]:
    meta = trace.info.trace_metadata or {}
    turn = meta.get(f"{PREFIX}turn")
    return (int(turn) if turn and turn.isdigit() else 1 << 30, trace.info.timestamp_ms or 0)


def _record(session_id: str, traces: list[Any]) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    for trace in traces:
        root = _root_span(trace)
        inputs = root.inputs if root is not None else _loads(trace.info.request_preview)
        outputs = root.outputs if root is not None else _loads(trace.info.response_preview)
        user = _user_text(inputs)
        if user:
            messages.append({"role": "user", "content": user})
        reply = _reply_text(outputs)
        if reply is not None:
            messages.append({"role": "assistant", "content": reply})
    meta = traces[0].info.trace_metadata or {} if traces else {}
    record: dict[str, Any] = {"session_id": session_id[:200], "messages": messages,
                              "metadata": {"mlflow_trace_ids": [t.info.trace_id for t in traces]}}
    case = _loads(meta.get(f"{PREFIX}test_case"))
    if isinstance(case, dict) and case.get("goal"):
        record["test_case"] = case
    elif meta.get(f"{PREFIX}goal"):
        record["goal"] = meta[f"{PREFIX}goal"]
    return record


def _root_span(trace: Any) -> Any:
    spans = getattr(getattr(trace, "data", None), "spans", None) or []
    return next((s for s in spans if s.parent_id is None), spans[0] if spans else None)


def _loads(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


_TEXT_KEYS = ("content", "text", "output", "response", "answer", "bot_response", "result")
_INPUT_KEYS = ("input", "question", "query", "user_input", "prompt", "request", "message", "text")


def _user_text(inputs: Any) -> str | None:
    """The user's message of a turn: the last user message of a chat input, else the one string given."""
    if isinstance(inputs, str):
        return inputs or None
    if isinstance(inputs, list):
        users = [m for m in inputs if isinstance(m, dict) and m.get("role") == "user"]
        return _text(users[-1].get("content")) if users else None
    if isinstance(inputs, dict):
        for key in ("messages", "input"):
            if isinstance(inputs.get(key), list):
                return _user_text(inputs[key])
        for key in _INPUT_KEYS:
            if isinstance(inputs.get(key), str):
                return inputs[key]
        strings = [v for v in inputs.values() if isinstance(v, str)]
        return strings[0] if len(strings) == 1 else None
    return None


def _reply_text(outputs: Any) -> str | None:
    """The agent's reply: a string, an assistant message, an OpenAI response, or one string field."""
    if outputs is None:
        return None
    if isinstance(outputs, str):
        return outputs
    if isinstance(outputs, list):
        replies = [m for m in outputs if isinstance(m, dict) and m.get("role") == "assistant"]
        return _text(replies[-1].get("content")) if replies else None
    if isinstance(outputs, dict):
        choices = outputs.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            return _text((choices[0].get("message") or {}).get("content"))
        if isinstance(outputs.get("messages"), list):
            return _reply_text(outputs["messages"])
        for key in _TEXT_KEYS:
            if key in outputs and (outputs[key] is None or isinstance(outputs[key], (str, list))):
                return _text(outputs[key]) if outputs[key] is not None else ""
        strings = [v for v in outputs.values() if isinstance(v, str)]
        return strings[0] if len(strings) == 1 else json.dumps(outputs, ensure_ascii=False)[:20_000]
    return str(outputs)


def _text(content: Any) -> str | None:
    if isinstance(content, str) or content is None:
        return content
    if isinstance(content, list):  # content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict)) or None
    return str(content)
