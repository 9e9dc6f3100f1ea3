"""Code scorers: a Python function under the workspace roots, session-level or per turn."""

from __future__ import annotations

import inspect
from typing import Any

from pydantic import ValidationError

from ..errors import InvalidOption
from ..llm import LLM
from ..models import Assessment, Evidence, Session
from ..threads import run_sync
from ..transcript import turn_numbers
from ..workspace import WorkspaceArg, as_workspace
from ..records import session_to_record
from .base import Scorer

TURN_PARAMS = {"inputs", "outputs", "turn"}


class CodeScorer(Scorer):
    """A Python function. Session-level with a `session` parameter, per-turn with inputs/outputs/turn."""

    kind = "code"

    def __init__(self, path: str, *, name: str | None = None, workspace: WorkspaceArg = None):
        self.fn = as_workspace(workspace).load_callable(path, what="scorer")
        self.name = name or getattr(self.fn, "__name__", path.rpartition(":")[2])
        params = inspect.signature(self.fn).parameters
        self._var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        names = set(params)
        if "session" in names and names & TURN_PARAMS:
            raise InvalidOption(
                f"scorer '{path}': a 'session' parameter makes it session-level; it cannot also take "
                f"{sorted(names & TURN_PARAMS)} (per-turn parameters). Split it into two scorers."
            )
        if "session" in names:
            self.level = "session"
        elif names & TURN_PARAMS:
            self.level = "turn"
        else:
            raise InvalidOption(
                f"scorer '{path}' must take 'session' (session-level) or any of inputs/outputs/turn (per-turn); "
                f"it takes: {', '.join(params) or 'nothing'}"
            )
        self._accepted = names
        self._is_async = inspect.iscoroutinefunction(self.fn)

    async def _call(self, **offered: Any) -> Any:
        kwargs = offered if self._var_kw else {k: v for k, v in offered.items() if k in self._accepted}
        if self._is_async:
            return await self.fn(**kwargs)
        return await run_sync(lambda: self.fn(**kwargs), what="scorer")

    async def score(self, session: Session, llm: LLM) -> list[Assessment]:
        expectations = session.test_case.expectations if session.test_case else {}
        if self.level == "session":
            record = _session_record(session)
            return [await self._assess(session, None, session=record, expectations=expectations)]
        results = []
        history: list[dict[str, Any]] = []
        for m, turn in zip(session.messages, turn_numbers(session)):
            if m.role == "assistant" and (m.content or m.error) and not m.tool_calls:
                inputs = {"messages": list(history),
                          "last_user_message": next((h["content"] for h in reversed(history) if h["role"] == "user"), "")}
                results.append(await self._assess(session, turn, inputs=inputs, outputs=m.content or "",
                                                  turn=turn, expectations=expectations))
            history.append(m.to_openai())
        return results

    async def _assess(self, scored: Session, at_turn: int | None, /, **offered: Any) -> Assessment:
        """Call the scorer with `offered` (its own keywords may include session and turn) and wrap the result."""
        base = Assessment(session_id=scored.id, scorer=self.name, turn=at_turn, judged_by="code")
        try:
            raw = await self._call(**offered)
        except Exception as e:
            return base.model_copy(update={"error": f"scorer raised {type(e).__name__}: {e}", "error_kind": "scorer"})
        try:
            return base.model_copy(update=_from_return(raw))
        except (TypeError, ValueError, ValidationError) as e:
            return base.model_copy(update={"error": f"scorer returned an unusable value: {e}", "error_kind": "scorer"})

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "level": self.level}


def _session_record(session: Session) -> dict[str, Any]:
    return session_to_record(session)


def _from_return(raw: Any) -> dict[str, Any]:
    """A code scorer's return value: bool, number, label, or {value, passed, rationale}."""
    if isinstance(raw, bool):
        return {"value": raw, "passed": raw}
    if isinstance(raw, (int, float)):
        return {"value": float(raw), "passed": None}
    if isinstance(raw, str):
        return {"value": raw, "passed": None}
    if isinstance(raw, dict):
        unknown = set(raw) - {"value", "passed", "rationale", "evidence"}
        if unknown:
            raise ValueError(f"unknown keys {sorted(unknown)} (expected value, passed, rationale, evidence)")
        value = raw.get("value")
        passed = raw.get("passed", value if isinstance(value, bool) else None)
        evidence = [Evidence.model_validate(e) for e in raw.get("evidence") or []]
        return {"value": value, "passed": None if passed is None else bool(passed),
                "rationale": str(raw.get("rationale") or ""), "evidence": evidence}
    raise TypeError(f"got {type(raw).__name__}; return bool, a number, a string label, or a dict")

