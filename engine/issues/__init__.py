"""Issues: failures -> signatures -> issues (severity, evidence, reproducing case); wording; clustering."""

from __future__ import annotations

from .discovery import collect_failures, discover_issues, sort_issues

__all__ = [
    "collect_failures",
    "discover_issues",
    "sort_issues",
]
