"""Scorers: judge whole conversations.

Three kinds, one interface (`Scorer.score(session, llm) -> [Assessment]`):

- built-in judges (`BUILTIN_JUDGES`): one model call per session, with the
  conversation rendered once, compactly, between delimiters the judge is told
  to treat as data. With the offline backend each uses its deterministic
  heuristic from `judging.offline` and says so.
- custom judges: `{name, instructions, output}`, instructions using
  `{{ conversation }}` and optionally `{{ goal }}` / `{{ expectations }}`.
- code scorers: a Python function by import path. A `session` parameter makes
  it session-level (it may also take `expectations`); `inputs` / `outputs` /
  `turn` make it per-turn, called once per agent turn.

A judge reply that cannot be parsed, or a scorer that raises, is recorded as
an unscored assessment with the reason (`passed=None`), never as a pass.
"""

from __future__ import annotations

from .base import Scorer
from .code import CodeScorer
from .judges import BuiltinJudge, CustomJudge
from .offline import is_refusal
from .registry import DEFAULT_SCORERS, list_builtin_scorers, parse_scorers

__all__ = [
    "BuiltinJudge",
    "CodeScorer",
    "CustomJudge",
    "DEFAULT_SCORERS",
    "Scorer",
    "is_refusal",
    "list_builtin_scorers",
    "parse_scorers",
]
