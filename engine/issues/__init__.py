"""Issues: failures -> signatures -> issues (severity, evidence, reproducing case); wording; clustering; trials
(repeated sessions of a test case: pass^k, flaky cases)."""

from __future__ import annotations

from .discovery import discover_issues, issue_signatures, sort_issues
from .failures import Failure, collect_failures, primary_causes, untestable_sessions
from .trials import TrialTally, pass_hat, summarize_trials, transcript_mark, trial_outcome

__all__ = [
    "Failure",
    "TrialTally",
    "collect_failures",
    "discover_issues",
    "issue_signatures",
    "pass_hat",
    "primary_causes",
    "sort_issues",
    "summarize_trials",
    "transcript_mark",
    "trial_outcome",
    "untestable_sessions",
]
