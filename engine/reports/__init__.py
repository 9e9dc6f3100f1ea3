"""Reports: the Markdown report, the HTML page, the compact digest the MCP tools return, and the comparison of
two runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

if TYPE_CHECKING:
    from .comparison import Comparison, render_comparison
    from .html import comparison_html, render_comparison_html, render_html, run_report_html
    from .markdown import ReportDigest, build_report, compact_result, render_markdown

# Each name is imported from its module when first read (engine/_lazy.py).
__getattr__, __dir__ = lazy_exports(__name__, {
    "Comparison": ".comparison",
    "render_comparison": ".comparison",
    "comparison_html": ".html",
    "render_comparison_html": ".html",
    "render_html": ".html",
    "run_report_html": ".html",
    "ReportDigest": ".markdown",
    "build_report": ".markdown",
    "compact_result": ".markdown",
    "render_markdown": ".markdown",
})

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
