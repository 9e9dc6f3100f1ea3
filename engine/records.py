"""Sessions as JSON records (the export and import format), validated with errors that name the field."""

from __future__ import annotations

import time
from typing import Any

from pydantic import ValidationError

from .errors import InvalidOption
from .limits import MAX_JSON_DEPTH, MAX_MESSAGE_CHARS, MAX_MESSAGES, json_depth
from .models import Session, TestCase
from .ids import new_session_id

MAX_SESSION_ID_CHARS = 200  # an imported session id


def session_to_record(s: Session) -> dict[str, Any]:
    messages = []
    for m in s.messages:
        d = {**m.to_openai(), "content": m.content}  # null stays null (tool-call and failed turns)
        for key in ("turn", "latency_ms", "error", "history_omitted"):
            if getattr(m, key) is not None:
                d[key] = getattr(m, key)
        if m.scripted:
            d["scripted"] = True
        if m.usage:
            d["usage"] = m.usage.model_dump()
        messages.append(d)
    return {
        "session_id": s.id,
        "run_id": s.run_id,
        "test_case": s.test_case.model_dump(exclude_defaults=True) if s.test_case else None,
        "stop_reason": s.stop_reason.value if s.stop_reason else None,
        "stop_detail": s.stop_detail,
        "turns": s.turns,
        "repeat": s.repeat,
        "usage": {k: u.model_dump() for k, u in s.usage.items()},
        "metadata": s.metadata,
        **({"replayed_turns": s.replayed_turns} if s.replayed_turns else {}),
        "messages": messages,
    }


def record_to_session(record: Any, line_no: int, *, what: str = "line") -> Session:
    """Parse one record: our export object, {session_id?, messages, goal?, expectations?}, or a bare message list.

    Bounded (MAX_JSON_DEPTH, MAX_MESSAGES, MAX_MESSAGE_CHARS); errors name the record and the field,
    never the values in it (a transcript may hold secrets, and a value may be megabytes long).
    """
    where = f"{what} {line_no}"
    if json_depth(record, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise InvalidOption(f"{where}: nested more than {MAX_JSON_DEPTH} levels deep (limit MAX_JSON_DEPTH)")
    if isinstance(record, list):
        record = {"messages": record}
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise InvalidOption(f"{where}: expected an object with 'messages' (a list) or a list of messages")
    messages = record["messages"]
    if not messages:
        raise InvalidOption(f"{where}: 'messages' is empty")
    if len(messages) > MAX_MESSAGES:
        raise InvalidOption(f"{where}: 'messages' has {len(messages)} entries; at most {MAX_MESSAGES} per "
                            "transcript (MAX_MESSAGES)")
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str) and len(content) > MAX_MESSAGE_CHARS:
            raise InvalidOption(f"{where}: messages[{i}].content is {len(content)} characters long; at most "
                                f"{MAX_MESSAGE_CHARS} (MAX_MESSAGE_CHARS)")
    for key in ("session_id", "run_id"):
        value = record.get(key)
        if value is not None and (not isinstance(value, str) or len(value) > MAX_SESSION_ID_CHARS):
            raise InvalidOption(f"{where}: {key} must be a string of at most {MAX_SESSION_ID_CHARS} characters")
    metadata = record.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise InvalidOption(f"{where}: metadata must be an object")
    if record.get("test_case"):
        case_data, prefix = record["test_case"], "test_case"
    elif record.get("goal"):
        case_data, prefix = {"goal": record["goal"], "expectations": record.get("expectations") or {}}, ""
    else:
        case_data, prefix = None, ""
    now = time.time()
    try:
        case = TestCase.model_validate(case_data) if case_data is not None else None
    except ValidationError as e:
        raise InvalidOption(f"{where}: {_validation_detail(e, prefix)}") from None
    try:
        session = Session.model_validate({
            "id": record.get("session_id") or new_session_id(),
            "test_case": case,
            "messages": messages,
            "stop_reason": record.get("stop_reason") or None,
            "stop_detail": record.get("stop_detail"),
            "turns": record.get("turns") or 0,
            "repeat": record.get("repeat") or 0,
            "usage": record.get("usage") or {},
            "metadata": {**metadata, "imported_from_run": record.get("run_id")},
            "replayed_turns": record.get("replayed_turns") or [],
            "started_at": now,
            "finished_at": now,
        })
    except ValidationError as e:
        raise InvalidOption(f"{where}: {_validation_detail(e)}") from None
    if not session.turns:
        session.turns = sum(1 for m in session.messages if m.role == "user")
    return session


def _validation_detail(e: ValidationError, prefix: str = "", shown: int = 3) -> str:
    """Where and what from pydantic's errors, without the input values (str(e) would quote them)."""
    errors = e.errors(include_url=False, include_context=False, include_input=False)
    parts = []
    for err in errors[:shown]:
        loc = _location(prefix, err["loc"])
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    more = f" (and {len(errors) - shown} more)" if len(errors) > shown else ""
    return "; ".join(parts) + more


def _location(prefix: str, loc: tuple[Any, ...]) -> str:
    out = prefix
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)[:60]
    return out
