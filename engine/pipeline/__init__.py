"""The jobs, composed from the engine parts. The MCP server and the CLI call only this package.

- simulation: play simulated users against the agent (`prepare_simulation`, `simulate`, `run_summary`)
- scoring: judge conversations (`prepare_scoring`, `score_sessions`)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from ._shared import MAX_CONCURRENCY, Progress, ProgressFn, run_uri, scores_uri, session_uri
    from .scoring import ScoringJob, prepare_scoring, score_one, score_sessions, score_summary, summarize_scores
    from .simulation import (SimulationJob, describe_target, prepare_simulation, run_summary, session_summaries, simulate,
                             summarize_session)

# Each name is imported from its module when first read (engine/_lazy.py).
__getattr__, __dir__ = lazy_exports(__name__, {
    "MAX_CONCURRENCY": "._shared",
    "Progress": "._shared",
    "ProgressFn": "._shared",
    "run_uri": "._shared",
    "scores_uri": "._shared",
    "session_uri": "._shared",
    "ScoringJob": ".scoring",
    "prepare_scoring": ".scoring",
    "score_one": ".scoring",
    "score_sessions": ".scoring",
    "score_summary": ".scoring",
    "summarize_scores": ".scoring",
    "SimulationJob": ".simulation",
    "describe_target": ".simulation",
    "prepare_simulation": ".simulation",
    "run_summary": ".simulation",
    "session_summaries": ".simulation",
    "simulate": ".simulation",
    "summarize_session": ".simulation",
})

__all__ = [
    "MAX_CONCURRENCY",
    "Progress",
    "ProgressFn",
    "ScoringJob",
    "SimulationJob",
    "describe_target",
    "prepare_scoring",
    "prepare_simulation",
    "run_summary",
    "run_uri",
    "score_one",
    "score_sessions",
    "score_summary",
    "scores_uri",
    "session_summaries",
    "session_uri",
    "simulate",
    "summarize_scores",
    "summarize_session",
]
