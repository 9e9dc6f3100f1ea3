"""Storage: SQLite for runs, test cases, sessions, messages, assessments and reports (see `sqlite`); streaming
JSONL transcript files (`jsonl`). Every text stored passes through secret redaction."""

from __future__ import annotations

from ..ids import new_run_id, new_session_id, new_test_set_id
from .sqlite import PAGE_SESSIONS, SessionRow, Store

__all__ = [
    "PAGE_SESSIONS",
    "SessionRow",
    "Store",
    "new_run_id",
    "new_session_id",
    "new_test_set_id",
]
