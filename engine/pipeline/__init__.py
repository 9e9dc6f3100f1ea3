"""The jobs, composed from the engine parts. The MCP server and the CLI call only this package.

- simulation: play simulated users against the agent (`prepare_simulation`, `simulate`, `run_summary`)
- scoring: judge conversations (`prepare_scoring`, `score_sessions`)
"""

from ._shared import MAX_CONCURRENCY, Progress, ProgressFn, run_uri, scores_uri, session_uri
from .scoring import ScoringJob, prepare_scoring, score_one, score_sessions, score_summary, summarize_scores
from .simulation import (SimulationJob, describe_target, prepare_simulation, run_summary, session_summaries, simulate,
                         summarize_session)

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
