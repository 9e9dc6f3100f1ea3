"""Issues: failures -> signatures -> issues (severity, evidence, reproducing case); wording; clustering."""

from __future__ import annotations

from .discovery import discover_issues, issue_signatures, sort_issues
from .failures import Failure, collect_failures, primary_causes, untestable_sessions

__all__ = [
    "Failure",
    "collect_failures",
    "discover_issues",
    "issue_signatures",
    "primary_causes",
    "sort_issues",
    "untestable_sessions",
]
