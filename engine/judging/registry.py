"""Scorer specs -> scorers; the default set; the catalogue `list_scorers` shows."""

from __future__ import annotations

import json
from typing import Any

from ..errors import InvalidOption
from ..workspace import WorkspaceArg
from .base import Scorer
from .code import CodeScorer
from .judges import JUDGE_CRITERIA, BuiltinJudge, CustomJudge

DEFAULT_SCORERS = ("goal_achievement", "conversation_completeness", "user_frustration", "knowledge_retention",
                   "tool_call_efficiency", "dialogue_coherence", "latency", "prompt_leak")


def parse_scorers(specs: list[Any] | None, *, workspace: WorkspaceArg = None) -> list[Scorer]:
    """Scorers from names, import paths or objects; the default set when none are given."""
    if specs is None:
        specs = list(DEFAULT_SCORERS)
    if isinstance(specs, (str, dict)):
        specs = [specs]
    scorers = [parse_scorer(s, workspace=workspace) for s in specs]
    names = [s.name for s in scorers]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidOption(f"scorer names must be unique; repeated: {', '.join(dupes)}")
    return scorers


def parse_scorer(spec: Any, *, workspace: WorkspaceArg = None) -> Scorer:
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("{"):
            try:
                return parse_scorer(json.loads(text), workspace=workspace)
            except json.JSONDecodeError as e:
                raise InvalidOption(f"scorer looks like JSON but does not parse: {e}") from None
            except RecursionError:
                raise InvalidOption("scorer JSON is nested too deeply to read") from None
        if text in JUDGE_CRITERIA:
            return BuiltinJudge(text)
        if ":" in text:
            return CodeScorer(text, workspace=workspace)
        raise InvalidOption(
            f"unknown scorer '{text}'; built-ins: {', '.join(JUDGE_CRITERIA)}; or a custom judge object "
            "{name, instructions, output}, or a code scorer 'pkg.mod:fn'"
        )
    if isinstance(spec, dict):
        if "instructions" in spec:
            extra = set(spec) - {"name", "instructions", "output"}
            if extra:
                raise InvalidOption(f"custom judge: unknown field(s) {sorted(extra)} (allowed: name, instructions, output)")
            return CustomJudge(spec.get("name", ""), spec["instructions"], spec.get("output"))
        if "path" in spec:
            if not isinstance(spec["path"], str) or not isinstance(spec.get("name") or "", str):
                raise InvalidOption("code scorer: 'path' must be a string ('pkg.mod:fn' or 'file.py:fn') and "
                                    "'name', if given, a string")
            return CodeScorer(spec["path"], name=spec.get("name"), workspace=workspace)
        if isinstance(spec.get("name"), str) and spec["name"] in JUDGE_CRITERIA:
            return BuiltinJudge(spec["name"], {k: v for k, v in spec.items() if k != "name"})
        raise InvalidOption(
            f"scorer object {json.dumps(spec)[:80]} is not a built-in (name), custom judge (instructions) "
            "or code scorer (path)"
        )
    raise InvalidOption(f"a scorer must be a name, an import path or an object, got {type(spec).__name__}")


def list_builtin_scorers() -> list[dict[str, Any]]:
    out = [BuiltinJudge(n, {"guidelines": ["example rule"]} if n == "guidelines" else None).describe()
           for n in JUDGE_CRITERIA]
    for d in out:
        d["default"] = d["name"] in DEFAULT_SCORERS
    return out
