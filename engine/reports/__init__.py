"""Reports: the Markdown report, the compact digest the MCP tools return, and the comparison of two runs."""

from __future__ import annotations

from .comparison import Comparison, render_comparison
from .markdown import ReportDigest, build_report, compact_result, render_markdown

__all__ = [
    "Comparison",
    "ReportDigest",
    "build_report",
    "compact_result",
    "render_comparison",
    "render_markdown",
]
