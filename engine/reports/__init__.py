"""Reports: the Markdown report and the compact digest the MCP tools return."""

from __future__ import annotations

from .markdown import ReportDigest, build_report, compact_result, render_markdown

__all__ = [
    "ReportDigest",
    "build_report",
    "compact_result",
    "render_markdown",
]
