"""Reports: the Markdown report, the HTML page, the compact digest the MCP tools return, and the comparison of
two runs."""

from __future__ import annotations

from .comparison import Comparison, render_comparison
from .html import comparison_html, render_comparison_html, render_html, run_report_html
from .markdown import ReportDigest, build_report, compact_result, render_markdown

__all__ = [
    "Comparison",
    "ReportDigest",
    "build_report",
    "compact_result",
    "comparison_html",
    "render_comparison",
    "render_comparison_html",
    "render_html",
    "render_markdown",
    "run_report_html",
]
